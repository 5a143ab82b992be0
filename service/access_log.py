"""gunicorn's access line, written cheaply: one formatted line per request, secrets left out.

gunicorn's own ``Logger.access`` builds a dict of every request header,
response header and environ variable, then a LogRecord that goes through
the filters and formatters, for every request, even when only a handful of
fields end up in the line (and whatever the log level, once a logging
configuration is given). This subclass reads the few fields the line shows
and hands them to the formatter of each access handler (``service.logs``),
which writes one line in the chosen LOG_FORMAT. ``accesslog = None`` in the
gunicorn settings (``ACCESS_LOG=off``) turns the lines off.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from gunicorn.glogging import Logger

from . import logs, request_id, server_errors

_REQUEST_ID = request_id.HEADER.lower()
_clock = time.monotonic  # the event loop's clock (service/request_reader.py), which stamps when a request began


# The line gunicorn's arbiter logs as it starts (Arbiter.start), before its first hook, on_starting.
START_LINE = "Starting gunicorn %s"


class AccessLogger(Logger):
    """gunicorn's logger, with an access line that costs a few microseconds.

    It also holds gunicorn's start line until on_starting has checked the settings only a hook sees
    (``-b``, ``-w``, METRICS_DIR): a start refused there wrote "Starting gunicorn" before its one
    configuration line, the only start error that took two.
    """

    # The API token, set in each worker as it starts (post_worker_init): a client may put it in the target,
    # where the access line would show it.
    token = ""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.writes_access = cfg.accesslog is not None
        self._start_checked = False
        self._held_start_line: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg == START_LINE and not self._start_checked:
            self._held_start_line = (args, kwargs)
            return
        super().info(msg, *args, **kwargs)

    def start_checked(self) -> None:
        """The start passed on_starting's checks: the start line gunicorn logged before them is written now."""
        self._start_checked = True
        if self._held_start_line is not None:
            (args, kwargs), self._held_start_line = self._held_start_line, None
            super().info(START_LINE, *args, **kwargs)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        answer = server_errors.current_answer()  # gunicorn's own error answer, not yet written
        if answer is not None:
            answer.logged = True
        elif not getattr(resp, "headers_sent", True):
            # The application failed before any of its response left: gunicorn answers the error
            # itself (a 500) and logs that answer's line; this response was never sent.
            return
        if not self.writes_access or not self.access_log.isEnabledFor(logging.INFO):
            return
        began = getattr(req, "began_arriving", None)  # read on the event loop before a thread had the request
        if began is not None:
            request_time = timedelta(seconds=_clock() - began)
        try:
            entry = access_entry(resp, environ, request_time, req, self.token)
            if answer is not None:  # written by error_answered, once the answer's size is known
                answer.line = entry._replace(request_id=entry.request_id or answer.request_id)
                return
            logs.write_access(self.access_log, entry)
        except Exception:
            self.exception("cannot write the access line")

    def error_answered(self, addr: Any, answer: server_errors.ErrorAnswer) -> None:
        """The access line of an error gunicorn answered: the one it asked for, with the bytes written,
        or for a request it could not parse (it asks for none), one made here."""
        if answer.line is not None:
            entry, answer.line = answer.line, None
            self._write(entry._replace(response_bytes=answer.sent or 0))
            return
        if answer.logged or answer.status is None:
            return
        answer.logged = True
        if not self.writes_access or not self.access_log.isEnabledFor(logging.INFO):
            return
        remote = addr[0] if isinstance(addr, tuple | list) and addr and addr[0] else "-"
        entry = logs.AccessEntry(
            created=time.time(),
            remote_addr=str(remote),
            method="-",
            path="",
            request_line="-",  # unparsable: what the client sent is in the warning before, cut and quoted
            status=answer.status,
            response_bytes=answer.sent,
            duration_ms=int((time.monotonic() - answer.began) * 1000),
            user_agent="-",
            request_id=answer.request_id,
        )
        self._write(entry)

    def _write(self, entry: logs.AccessEntry) -> None:
        try:
            logs.write_access(self.access_log, entry)
        except Exception:
            self.exception("cannot write the access line")


def access_entry(
    resp: Any, environ: dict[str, Any], request_time: timedelta, req: Any, token: str = ""
) -> logs.AccessEntry:
    """What the access line shows of one request, from gunicorn's response, WSGI environ and parsed request.

    An error gunicorn answers before the app (a path outside the root path, a bad header) comes
    with an environ of the request line only: the path and user agent are then read from ``req``.
    The API token ``token`` is left out wherever the client put it in the target or the user agent.
    """
    status = _status_code(resp.status)
    method = environ.get("REQUEST_METHOD", "-")
    target = logs.without_token(logs.redact_target(environ.get("RAW_URI", ""), refused=logs.is_refused(status)), token)
    return logs.AccessEntry(
        created=time.time(),
        remote_addr=environ.get("REMOTE_ADDR", "-"),
        method=method,
        # As the client asked for it, as in the request line: PATH_INFO lacks the root path (SCRIPT_NAME).
        path=logs.without_token(getattr(req, "path", None) or environ.get("RAW_URI", "").partition("?")[0], token),
        request_line=f"{method} {target} {environ.get('SERVER_PROTOCOL', '-')}",
        status=status,
        response_bytes=getattr(resp, "sent", None),
        duration_ms=request_time // _MILLISECOND,
        user_agent=logs.without_token(environ.get("HTTP_USER_AGENT") or _header(req, "USER-AGENT") or "-", token),
        request_id=response_request_id(resp),
    )


def response_request_id(resp: Any) -> str | None:
    """The request id a gunicorn response carries (its X-Request-ID header), if any."""
    return next((value for name, value in resp.headers if name.lower() == _REQUEST_ID), None)


_MILLISECOND = timedelta(milliseconds=1)


def _header(req: Any, name: str) -> str | None:
    """The first value of header ``name`` (upper case, as gunicorn keeps them) of a parsed request."""
    return next((value for key, value in getattr(req, "headers", None) or () if key == name), None)


def _status_code(status: object) -> int | None:
    # "202 ACCEPTED" from the app, or an int; None before the app started its response.
    try:
        return int(str(status).split(None, 1)[0])
    except (ValueError, IndexError):
        return None
