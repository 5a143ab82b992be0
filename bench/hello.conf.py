"""gunicorn.conf.py's worker settings (1 worker, gthread, 8 threads) without the app, its hooks or an
access log: the bare references (bench/hello.py, bench/bare_flask.py) run on them."""

bind = ["127.0.0.1:0"]
workers = 1
worker_class = "gthread"
threads = 8
preload_app = False
max_requests = 0
control_socket_disable = True
errorlog = "-"
loglevel = "info"
