"""Log output for the service and gunicorn alike: human-readable lines, or one JSON object per line.

Every record passes one filter that attaches ``task_id`` and ``request_id``
(from the engine's ``extra`` or the current request), so both formats can
show them. Access lines skip the logging machinery: each formatter turns an
``AccessEntry`` into one line directly (see ``service/access_log.py``). The
engine only logs; this module, called by the entry points, decides where and how.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from typing import Any, AnyStr, NamedTuple
from urllib.parse import unquote, unquote_plus

from pythonjsonlogger.json import JsonFormatter

from config import BIDI_CONTROLS, LOG_FORMATS, json_log_line
from workerpool import current_task

from . import request_id, server_errors

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
_pid = os.getpid()  # for access lines: os.getpid() is a system call on every line


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
TEXT_DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"  # gunicorn's own
ACCESS_LOGGER = "gunicorn.access"


class ContextFilter(logging.Filter):
    """Give every record ``task_id`` and ``request_id`` attributes (None when unknown): those the
    engine passed, else those of the request being handled, else those of the task whose handler
    is running (its own lines, and those of any library it calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.current()
            if record.request_id is None:
                if (answer := server_errors.current_answer()) is not None:
                    record.request_id = answer.request_id  # gunicorn's warning about a request it refuses
                elif (task := current_task()) is not None:
                    record.request_id = task.request_id
        if not hasattr(record, "task_id"):
            record.task_id = task.id if (task := current_task()) is not None else None
        return True


# Characters that end or rewrite a line in a terminal, a pager or a log shipper (str.splitlines()
# breaks on most of them): C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the
# bidi controls, which make a viewer show the rest of the line reordered (an error message quoting a
# payload with U+202E reads backwards, its request_id with it).
_LINE_BREAKERS = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]")
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord(c): f"\\u{ord(c):04x}" for c in f"\u2028\u2029{BIDI_CONTROLS}"
}


def escape(text: str) -> str:
    """``text`` with every line-breaking or control character written as a visible escape (``\\n`` -> ``\\x0a``)."""
    return text.translate(_ESCAPES) if _LINE_BREAKERS.search(text) else text


# Query parameters whose values are secrets when a client wrongly sends one in the URL: a name holding one of the
# first words, or one of the short ones as a word of its own (``pass``, ``user_pass``; not ``compass``).
_SECRET_NAME = re.compile(
    r"token|key|secret|passw|passphrase|pwd|auth|sig|credential|session|sessid|cookie|bearer|jwt"
    r"|(?<![a-z])(?:pass|pw|code|sid)(?![a-z])",
    re.IGNORECASE,
)
REDACTED = "REDACTED"
_LINE_VERSION = re.compile(r"\s+HTTP/\S*\Z")


def redact_target(target: str, *, refused: bool) -> str:
    """A request target fit for a log: values of secret-looking query parameters replaced, and the
    whole query of a refused request (401, 403), whose client may have put its token anywhere."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    if refused:
        return f"{path}?{REDACTED}"
    return f"{path}?{'&'.join(_redact_parameter(p) for p in query.split('&'))}"


def redact_request_line(line: str) -> str:
    """A request line that could not be parsed, fit for a log: all of it from the first ``?`` on replaced but an HTTP
    version ending it, since where its target ends is unknown (``GET /tasks?REDACTED HTTP/1.1``)."""
    path, mark, rest = line.partition("?")
    if not mark:
        return line
    version = _LINE_VERSION.search(rest)
    return f"{path}?{REDACTED}{version.group() if version else ''}"


def _redact_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    return f"{name}={REDACTED}" if equals and _SECRET_NAME.search(unquote_plus(name)) else parameter


def without_token(text: str, token: str) -> str:
    """``text`` (a request line, target or path) with the API token ``token`` replaced wherever a client put it:
    in the path, as a bare query or a parameter of any name. One the client percent-encoded is found decoded,
    and the text is then shown decoded."""
    if not token:
        return text
    if token in text:
        text = text.replace(token, REDACTED)
    if "%" in text:
        decoded = unquote(text)
        if token in decoded:
            return decoded.replace(token, REDACTED)
    return text


def without_token_in_any_case(text: AnyStr, token: str) -> AnyStr:
    """``text`` (a value a server quotes from a refused head) with the API token ``token`` replaced, whatever the case
    of its letters: a quoted field value (a transfer coding) may have been lowercased first."""
    if not token:
        return text
    if isinstance(text, bytes):
        return re.sub(re.escape(token.encode()), REDACTED.encode(), text, flags=re.IGNORECASE)
    return re.sub(re.escape(token), REDACTED, text, flags=re.IGNORECASE)


def is_refused(status: int | None) -> bool:
    return status in (401, 403)


class AccessEntry(NamedTuple):
    """One HTTP request as its access line reports it."""

    created: float  # time.time() when the line is written
    remote_addr: str
    method: str
    path: str  # without the query
    request_line: str  # method, target (secrets redacted) and protocol
    status: int | None
    response_bytes: int | None
    duration_ms: int
    user_agent: str
    request_id: str | None

    @property
    def message(self) -> str:
        """gunicorn's access layout: ``127.0.0.1 "POST /enqueue HTTP/1.1" 202 236 2ms "curl/8.5.0"``."""
        return (
            f'{self.remote_addr} "{_quoted(self.request_line)}" {self.status} {self.response_bytes} '
            f'{self.duration_ms}ms "{_quoted(self.user_agent)}"'
        )


def _quoted(text: str) -> str:
    # A quote inside a quoted field would let a client shift the fields after it.
    return text.replace("\\", "\\\\").replace('"', '\\"') if '"' in text or "\\" in text else text


class TextFormatter(logging.Formatter):
    """gunicorn's line layout plus the logger name, with ``task_id=...`` and ``request_id=...`` appended when known.

    One record is one line: control characters and line separators in the
    message and the ids are escaped, so a task id or an exception message
    cannot end the line or forge another. A traceback keeps its lines, each
    indented, so none of them can pass for a record either.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, TEXT_DATE_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    def access_line(self, entry: AccessEntry) -> str:
        """The access line as ``format`` would write it for a record of ``entry.message``."""
        second, text = self._second
        if second != int(entry.created):  # a race only formats the same second twice
            second, text = int(entry.created), time.strftime(TEXT_DATE_FORMAT, self.converter(entry.created))
            self._second = (second, text)
        line = f"{text} [{_pid}] [INFO] {ACCESS_LOGGER}: {escape(entry.message)}"
        return line if entry.request_id is None else f"{line} request_id={escape(entry.request_id)}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape(self.formatMessage(record))
        # The task's id even where the message names it: a handler's lines (and those of the libraries it calls) do not,
        # and one request id is shared by every task of a batch.
        tid = getattr(record, "task_id", None)
        if tid is not None:
            line = f"{line} task_id={escape(_field_value(str(tid)))}"
        rid = getattr(record, "request_id", None)
        if rid is not None:
            line = f"{line} request_id={escape(str(rid))}"
        # Not logging's cached record.exc_text: another formatter may have written it unindented.
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line


# A task id may hold spaces, quotes and "=": written bare, "a request_id=b" would read as task a of request b.
_BARE_FIELD_VALUE = re.compile(r'[^\s"=\\]+')


def _field_value(value: str) -> str:
    """``value`` as a ``name=value`` field of a text line: bare, or as a JSON string if it would read as more."""
    return value if _BARE_FIELD_VALUE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


def _indented(block: str) -> str:
    return "\n".join("    " + escape(line) for line in block.split("\n"))


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: timestamp (UTC, ISO 8601), level, logger, message, task_id,
    request_id, the process id, and for gunicorn's access lines the request's method, path, status and duration."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message", "task_id", "request_id"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            json_ensure_ascii=False,
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["pid"] = record.process  # which of several worker processes (-w N) wrote it, as text lines show

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        return json_log_line(super().jsonify_log_record(log_data))

    def access_line(self, entry: AccessEntry) -> str:
        """The access line as ``format`` would write it, plus the request's fields."""
        return json_log_line(
            json.dumps(
                {
                    "level": "INFO",
                    "logger": ACCESS_LOGGER,
                    "message": entry.message,
                    "task_id": None,
                    "request_id": entry.request_id,
                    "timestamp": datetime.datetime.fromtimestamp(entry.created, tz=datetime.UTC).isoformat(),
                    "pid": os.getpid(),
                    "remote_addr": entry.remote_addr,
                    "method": entry.method,
                    "path": entry.path,
                    "status": entry.status,
                    "response_bytes": entry.response_bytes,
                    "duration_ms": entry.duration_ms,
                },
                ensure_ascii=False,
            )
        )


def write_access(logger: logging.Logger, entry: AccessEntry) -> None:
    """Write ``entry`` to each handler of ``logger``: straight to the stream when the handler's
    formatter is one of ours, as an ordinary record otherwise."""
    for handler in logger.handlers:
        access_line = getattr(handler.formatter, "access_line", None)
        if access_line is not None and isinstance(handler, logging.StreamHandler):
            _write_line(handler, access_line(entry) + handler.terminator)
        else:
            fields = {"name": logger.name, "levelno": logging.INFO, "levelname": "INFO", "msg": entry.message}
            handler.handle(logging.makeLogRecord({**fields, "request_id": entry.request_id}))


class LineHandler(logging.StreamHandler):
    """A StreamHandler that writes each record as one line in one ``write()``, without the handler's lock.

    The stock ``Handler.handle`` holds the handler's lock through formatting
    and the system call; the pool's worker threads log a line per finished
    task, and queued behind each other (and behind the HTTP threads) on that
    lock whenever its holder lost the GIL mid-write. A line written by one
    call never mixes with another (see ``_write_line``).
    """

    def handle(self, record: logging.LogRecord) -> bool:
        accepted = self.filter(record)
        if isinstance(accepted, logging.LogRecord):  # Python 3.12+: a filter may hand back a replacement
            record = accepted
        if accepted:
            self.emit(record)
        return bool(accepted)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self, self.format(record) + self.terminator)
        except RecursionError:  # as StreamHandler.emit: never swallowed
            raise
        except Exception:
            self.handleError(record)


def _write_line(handler: logging.StreamHandler, line: str) -> None:
    stream = handler.stream
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: a test's buffer
        with handler.lock:  # type: ignore[union-attr]  # set by Handler.__init__
            stream.write(line)
            stream.flush()
        return
    # One write() per line, without the handler's lock: holding it through the system call made
    # every request thread queue behind a slow disk or pipe. A line is written whole by one call
    # (appends to a file are atomic; a pipe takes up to PIPE_BUF bytes at once), so lines never mix.
    data = line.encode(getattr(stream, "encoding", None) or "utf-8", getattr(stream, "errors", None) or "strict")
    while data:
        data = data[os.write(fd, data) :]


def logging_config(level: str, log_format: str, *, access_log: bool = True) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the app and gunicorn: app and error lines to stderr,
    access lines to stdout, all in ``log_format`` ("text" or "json"). Without ``access_log`` the
    development server's request lines (logger ``werkzeug``, INFO) are left out too."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {log_format!r}")
    formatter = JsonLineFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"line": {"()": formatter}},
        "handlers": {
            "stderr": {
                "()": LineHandler,
                "stream": "ext://sys.stderr",
                "formatter": "line",
                "filters": ["context"],
            },
            "stdout": {
                "()": LineHandler,
                "stream": "ext://sys.stdout",
                "formatter": "line",
                "filters": ["context"],
            },
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            ACCESS_LOGGER: {"level": "INFO", "handlers": ["stdout"], "propagate": False},
            **({} if access_log else {"werkzeug": {"level": "WARNING"}}),
        },
    }
