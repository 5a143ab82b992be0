"""gunicorn's gthread worker, made to start the pool's drain at the first stop signal.

gunicorn owns the worker's signal handlers (an app that replaces them stops
gunicorn's own shutdown from working), so the drain is started by overriding
the worker's handlers rather than installing new ones. Both only hand the
signal to the ShutdownController, which is safe inside a signal handler.
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker

from .lifecycle import ShutdownController


class DrainingThreadWorker(ThreadWorker):
    controller: ShutdownController | None = None  # set by the post_worker_init hook
    _stopping = False

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: gunicorn's graceful stop; the pool closes admission at once."""
        self._stopping = True
        self._notify(sig)
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame) -> None:
        """SIGINT/SIGQUIT: gunicorn's quick stop, which raises SystemExit in this thread.

        Only the first one goes on to gunicorn: a SystemExit raised while the
        worker_exit hook waits for the drain would cut the drain's report short,
        and gthread's own quit handler deadlocks when re-entered (a Ctrl-C
        sends SIGINT to this worker and SIGQUIT from the arbiter together).
        """
        first = not self._stopping
        self._stopping = True
        self._notify(sig)
        if first:
            # Stop listening now: the drain runs after this, and until the
            # process ends new connections would wait in the backlog unanswered.
            for listener in self.sockets:
                listener.close()
            super().handle_quit(sig, frame)

    def _notify(self, sig: int) -> None:
        if self.controller is not None:
            self.controller.request_stop(sig)
