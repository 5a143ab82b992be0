"""The service's gunicorn worker settings (1 worker, gthread, 8 threads) for the bare Flask reference.

No access log: the reference is the floor, what the service's own logging is measured against.
"""

bind = ["127.0.0.1:0"]
workers = 1
worker_class = "gthread"
threads = 8
preload_app = False
max_requests = 0
control_socket_disable = True
errorlog = "-"
loglevel = "info"
