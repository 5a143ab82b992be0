"""gunicorn.conf.py's server settings without the app or its hooks, for the bare reference."""

bind = ["127.0.0.1:0"]
workers = 1
worker_class = "gthread"
threads = 8
preload_app = False
max_requests = 0
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
