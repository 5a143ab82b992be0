"""gunicorn's gthread worker, made to start the pool's drain at the first stop signal.

gunicorn owns the worker's signal handlers (an app that replaces them stops
gunicorn's own shutdown from working), so the drain is started by extending
the worker's handlers rather than installing new ones.

Every stop signal (SIGTERM, and SIGINT/SIGQUIT, gunicorn's "quick" stop)
takes gunicorn's graceful path: stop accepting, finish requests in progress,
leave the loop, then the worker_exit hook waits for the drain. gthread's own
quick stop shuts its request thread pool down and raises SystemExit from
inside the signal handler; when the signal lands while the main thread holds
that pool's lock (it hands every new connection to the pool), the worker
deadlocks until gunicorn kills it and the queued tasks are lost. The graceful
path only sets a flag and writes a wake-up byte, which is safe at any moment.
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker

from . import server_errors
from .connection import honour_connection_close
from .lifecycle import ShutdownController


class DrainingThreadWorker(ThreadWorker):
    controller: ShutdownController | None = None  # set by the post_worker_init hook

    def handle_exit(self, sig, frame) -> None:
        if self.controller is not None:
            self.controller.request_stop(sig)  # a reentrant queue put: signal-safe
        super().handle_exit(sig, frame)  # idempotent: only the first one stops the loop

    handle_quit = handle_exit

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The app's "Connection: close" (a refused request's unread body) must close the connection.
        self.wsgi.wsgi_app = honour_connection_close(self.wsgi.wsgi_app)  # Flask's middleware slot
        server_errors.install()  # the errors gunicorn answers itself, as problem documents
