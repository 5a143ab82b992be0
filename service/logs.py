"""Log output for the service and gunicorn alike: human-readable lines, or one JSON object per line.

Every record passes one filter that attaches ``task_id`` and ``request_id``
(from the engine's ``extra``, the current request, or gunicorn's access
atoms), so both formats can show them. The engine only logs; this module,
called by the entry points, decides where and how.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from config import LOG_FORMATS

from . import request_id

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
TEXT_DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"  # gunicorn's own
# gunicorn access lines: the text formatter adds time, pid and request id around them.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms "%(a)s"'
ACCESS_LOGGER = "gunicorn.access"
_ACCESS_REQUEST_ID = f"{{{request_id.HEADER.lower()}}}o"  # the response header, as gunicorn names it


class ContextFilter(logging.Filter):
    """Give every record ``task_id`` and ``request_id`` attributes (None when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        access = _access_atoms(record)
        if access is not None:
            echoed = access.get(_ACCESS_REQUEST_ID)
            record.request_id = echoed if echoed not in (None, "-") else None
        elif not hasattr(record, "request_id"):
            record.request_id = request_id.current()
        if not hasattr(record, "task_id"):
            record.task_id = None
        return True


# Characters that end or rewrite a line in a terminal, a pager or a log shipper (str.splitlines()
# breaks on most of them): C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_LINE_BREAKERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape(text: str) -> str:
    """``text`` with every line-breaking or control character written as a visible escape (``\\n`` -> ``\\x0a``)."""
    return text.translate(_ESCAPES) if _LINE_BREAKERS.search(text) else text


class TextFormatter(logging.Formatter):
    """gunicorn's line layout plus the logger name, with ``request_id=...`` appended when known.

    One record is one line: control characters and line separators in the
    message and the ids are escaped, so a task id or an exception message
    cannot end the line or forge another. A traceback keeps its lines, each
    indented, so none of them can pass for a record either.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, TEXT_DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape(self.formatMessage(record))
        rid = getattr(record, "request_id", None)
        if rid is not None:
            line = f"{line} request_id={escape(str(rid))}"
        # Not logging's cached record.exc_text: another formatter may have written it unindented.
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line


def _indented(block: str) -> str:
    return "\n".join("    " + escape(line) for line in block.split("\n"))


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: timestamp (UTC, ISO 8601), level, logger, message, task_id,
    request_id, and for gunicorn's access lines the request's method, path, status and duration."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message", "task_id", "request_id"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            json_ensure_ascii=False,
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        access = _access_atoms(record)
        if access is not None:
            log_data.update(
                remote_addr=access.get("h"),
                method=access.get("m"),
                path=access.get("U"),
                status=_int_or_none(access.get("s")),
                response_bytes=access.get("B"),
                duration_ms=access.get("M"),
            )


def _access_atoms(record: logging.LogRecord) -> Mapping[str, Any] | None:
    # gunicorn logs each request as (access_log_format, atoms): a single mapping argument.
    if record.name == ACCESS_LOGGER and isinstance(record.args, Mapping):
        return record.args
    return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the app and gunicorn: app and error lines to stderr,
    access lines to stdout, all in ``log_format`` ("text" or "json")."""
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
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "line",
                "filters": ["context"],
            },
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "line",
                "filters": ["context"],
            },
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            ACCESS_LOGGER: {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        },
    }
