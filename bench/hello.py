"""The smallest WSGI app: the floor for start-up and shutdown latency under the same gunicorn settings."""


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
