"""Service settings: one frozen dataclass built from the environment and ``.env``.

This is the only module that reads the environment. The project's ``.env``
supplies defaults; a variable set in the real environment wins over it. A bad
value stops the process at start-up with exit code 2 and one line that names
the variable and the value.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import io
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream

MIN_PYTHON = (3, 11)
# Every entry point imports this module first: say what is wrong before an ImportError (StrEnum) would.
if sys.version_info < MIN_PYTHON:
    print(
        f"workerpool needs Python {'.'.join(map(str, MIN_PYTHON))} or newer, "
        f"not {'.'.join(map(str, sys.version_info[:3]))} ({sys.executable})",
        file=sys.stderr,
    )
    raise SystemExit(2)

PROJECT_ROOT = Path(__file__).resolve().parent
DOTENV_PATH = PROJECT_ROOT / ".env"  # the user's own, ignored by git; .env.example documents every variable
EXIT_BAD_CONFIG = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
MIN_TOKEN_CHARS = 16

_INT = re.compile(r"[+-]?[0-9]+")
# A decimal number as written in a setting (20, 0.5, .5, 1e3): float() alone also takes 2_0, other scripts'
# digits (١٠) and inf or nan.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# A root path (SCRIPT_NAME) as gunicorn compares it with the request path: raw, still percent-encoded.
_ROOT_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


SQLITE_PREFIX = "sqlite://"
SQLITE_SYNCHRONOUS = ("NORMAL", "FULL")
REDIS_SCHEMES = ("redis://", "rediss://")


@dataclass(frozen=True, slots=True)
class StoreSetting:
    """Where tasks live (``STORE``): this process's memory, a SQLite file several processes share,
    or a Redis database any number of instances share."""

    kind: str = "memory"  # "memory", "sqlite" or "redis"
    path: str = ""  # the SQLite file, absolute
    synchronous: str = "NORMAL"  # SQLite's durability setting (see docs/stores.md)
    url: str = dataclasses.field(default="", repr=False)  # the Redis URL; it may carry a password

    @property
    def shared(self) -> bool:
        """Whether several processes (``gunicorn -w N``, several services) may serve the same tasks."""
        return self.kind != "memory"


@dataclass(frozen=True, slots=True)
class Config:
    workers: int = 4
    queue_size: int = 64
    host: str = "127.0.0.1"
    port: int = 8080
    work_min_ms: int = 100
    work_max_ms: int = 500
    failure_rate: float = 0.2
    backoff_base_ms: int = 100
    backoff_cap_ms: int = 10_000
    default_max_retries: int = 3
    max_retries_limit: int = 20
    max_body_bytes: int = 65_536
    max_payload_chars: int = 32_768
    # POST /enqueue/batch: tasks per request, and its own body limit (1,000 tasks of ~4 KiB each).
    max_batch_tasks: int = 1000
    max_batch_body_bytes: int = 4 * 1024 * 1024
    max_delay_ms: int = 3_600_000
    max_result_bytes: int = 65_536
    # Five minutes: far above an attempt of the simulated work (0.5 s at most), between RQ's default
    # job timeout (180 s) and Dramatiq's time limit (600 s); 0 turns it off.
    attempt_timeout_s: float = 300.0
    # How long a running attempt stays owned by its process without a renewal (renewed every third of
    # it): after a crash, a shared store's other processes retry the attempt once it expires.
    lease_s: float = 30.0
    state_ttl_s: float = 3600.0
    state_max_tasks: int = 100_000
    shutdown_timeout_s: float = 20.0
    # How long a client may take to send a whole request (head and body).
    request_timeout_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    # "module:callable" run for every attempt instead of the simulated work.
    task_handler: str = ""
    store: StoreSetting = StoreSetting()
    # Empty: no token needed. A secret, so it stays out of the repr (and any log line that prints one).
    api_token: str = dataclasses.field(default="", repr=False)
    store_prefix: str = "workerpool"
    redis_password: str = dataclasses.field(default="", repr=False)
    # Under gunicorn: where the worker processes publish their metrics to be summed (empty: a
    # private temporary directory when there are several, none with one).
    metrics_dir: str = ""


# -- parsers: text -> value, raising ValueError with the reason --------------


def _integer(low: int, high: int) -> Callable[[str], int]:
    most_digits = len(str(max(abs(low), abs(high))))

    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            raise ValueError(f"must be an integer from {low} to {high}")
        # Out of range by its length alone: int() refuses more than 4300 digits with the interpreter's own
        # message (sys.set_int_max_str_digits), leading zeros included (0...08080 is 8080).
        sign, digits = text[: len(text) - len(text.lstrip("+-"))], text.lstrip("+-").lstrip("0") or "0"
        if len(digits) > most_digits:
            raise ValueError(f"must be an integer from {low} to {high}")
        value = int(sign + digits)
        if not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return value

    return parse


def _plain(bound: float) -> str:
    """``bound`` as the README writes it: 31536000, not 3.1536e+07 (``:g`` turns to exponents past 6 digits)."""
    return f"{bound:.15g}"


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    bound = f"greater than {_plain(low)}" if low_open else f"at least {_plain(low)}"
    reason = f"must be a number {bound} and at most {_plain(high)}"

    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise ValueError(reason)
        value = float(text)
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise ValueError(reason)
        return value

    return parse


def parse_host(text: str) -> str:
    """``HOST``, and ``python app.py --host``: a host name or IP address (empty would listen on every interface)."""
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a host name or IP address")
    if text.startswith("[") and text.endswith("]") and _is_ip(text[1:-1], version=6):
        # The form of a URL: the bind address would be split at its last colon, leaving "[::1".
        raise ValueError(f"must be an IPv6 address without brackets: {text[1:-1]}")
    if not _is_ip(text):
        try:  # a short form the resolver takes as an IPv4 address: "0" listens on every interface
            full = socket.inet_ntoa(socket.inet_aton(text))
        except OSError:
            return text  # a host name
        raise ValueError(f"must be an IPv4 address written in full: {text} stands for {full}")
    return text


def _is_ip(text: str, *, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


TOKEN_RULE = f"must be empty (no token) or at least {MIN_TOKEN_CHARS} visible ASCII characters, without spaces"


def _token(text: str) -> str:
    # It travels in a header: only visible ASCII reaches the service the same from every client.
    if text and (len(text) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in text)):
        raise ValueError(TOKEN_RULE)
    return text


def _store(text: str) -> StoreSetting:
    """``memory``, ``sqlite:///absolute/path.db`` with ``?synchronous=full`` optional, or
    ``redis://[:password@]host[:port][/db]`` (``rediss://`` for TLS)."""
    usage = (
        "must be memory, sqlite:///path/to/tasks.db (optionally ?synchronous=normal or full) "
        "or redis://host:port/db (rediss:// for TLS)"
    )
    if text == "memory":
        return StoreSetting()
    if text.startswith(REDIS_SCHEMES):
        return StoreSetting("redis", url=_redis_url(text))
    if text.startswith("unix://"):  # redis-py's scheme for a Redis on a local socket: the store speaks TCP only
        raise ValueError(f"{usage}: a Redis on a unix socket (unix://) is not supported: reach it over TCP")
    if not text.startswith(SQLITE_PREFIX):
        raise ValueError(usage)
    path, _, query = text[len(SQLITE_PREFIX) :].partition("?")
    if not path or path.endswith("/"):
        raise ValueError(f"{usage}: the file name is missing")
    if not path.startswith("/"):  # sqlite://host/...: nothing but a path may follow the scheme
        raise ValueError(f"{usage}: the path must be absolute (three slashes), not {path!r}")
    if path == "/:memory:":  # SQLite's private in-memory database: no other process (or connection) sees it
        raise ValueError(f"{usage}: an in-memory SQLite database cannot be shared; use STORE=memory")
    synchronous = "NORMAL"
    if query:
        name, _, value = query.partition("=")
        if name != "synchronous" or value.upper() not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"{usage}: unknown option {query!r}")
        synchronous = value.upper()
    return StoreSetting("sqlite", str(Path(path).absolute()), synchronous)


ENCODE_CREDENTIALS = (
    "is not a Redis URL: an '@' comes after the host: a user name or password holding / ? # or @ must have them "
    "percent-encoded (%2F %3F %23 %40, and % itself as %25), or the password go in REDIS_PASSWORD"
)


def _redis_url(text: str) -> str:
    """``text`` once checked. The checks read it with its credentials replaced (``_without_credentials``), so no
    reason they give can quote a password, or a piece of one."""
    masked = _without_credentials(text)
    try:
        url = urlsplit(masked)
        port, database = url.port, url.path.lstrip("/")
    except ValueError as exc:  # a port that is not a number
        raise ValueError(f"is not a Redis URL: {exc}") from None
    if not url.hostname:
        raise ValueError("is not a Redis URL: the host is missing")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(f"is not a Redis URL: the database must be a number, not {database!r}")
    if port == 0:
        raise ValueError("is not a Redis URL: port 0")
    _check_redis_options(masked)
    return text


def _without_credentials(text: str) -> str:
    """A Redis URL with its user name and password (in the URL's user information or as options) replaced by
    placeholders; ValueError (naming nothing of them) if the user information cannot be told from the rest.

    The user information ends at the first / ? or #: a password holding one of them, unencoded, would have its
    first piece read as the host or port (and a parser's reason would quote it) and the rest as the database.
    """
    text = _URL_PASSWORD_OPTION.sub(r"\1x", text)
    scheme_end = text.index("://") + 3  # the caller checked the scheme
    authority = re.match(r"[^/?#]*", text[scheme_end:])[0]
    rest = text[scheme_end + len(authority) :]
    if authority and "@" in rest:
        raise ValueError(ENCODE_CREDENTIALS)
    user_information, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = user_information.partition(":")
        authority = ("user" if user else "") + (":password" if colon else "") + "@" + host
    return text[:scheme_end] + authority + rest


MAX_CONNECTIONS_REFUSED = (
    "max_connections cannot be set: every thread keeps a connection of its own (WORKERS, the HTTP threads and "
    "a few more), and a pool at its cap refuses the next thread's commands (Too many connections) instead of waiting"
)


def _check_redis_options(text: str) -> None:
    """Build (not connect) the client's first connection, so a bad option (``?socket_timeout=abc``) stops
    the start instead of the first command; the client's messages name the option, never the password."""
    import redis  # only a Redis store needs it, and its import costs the other stores' start-ups

    try:
        pool = redis.ConnectionPool.from_url(text)
        connection = pool.make_connection()
    except TypeError as exc:  # an option the connection does not take
        unknown = re.search(r"argument '(\w+)'", str(exc))
        name = unknown[1] if unknown else str(exc)
        tls = " (TLS options need rediss://)" if name.startswith("ssl_") and text.startswith("redis://") else ""
        raise ValueError(f"is not a Redis URL: unknown option {name}{tls}") from None
    except (ValueError, redis.RedisError) as exc:
        reason = str(exc).rstrip(".")
        raise ValueError(f"is not a Redis URL: {reason[:1].lower()}{reason[1:]}") from None
    if "max_connections" in redis.connection.parse_url(text):
        # The store's pool has no cap (see redis_store.connect): each thread keeps a connection of its own.
        raise ValueError(MAX_CONNECTIONS_REFUSED)
    # The store decodes what it reads: answers as text failed every claim. redis-py keeps the option's text, so
    # "decode_responses=false" decodes too.
    if "decode_responses" in pool.connection_kwargs:
        raise ValueError(
            "is not a Redis URL: decode_responses is not supported: the store reads Redis' answers as bytes"
        )
    for option in ("encoding", "encoding_errors"):  # another encoding loaded the scripts under other digests
        if option in pool.connection_kwargs:
            raise ValueError(f"is not a Redis URL: {option} is not supported: the store talks to Redis in UTF-8")
    url = urlsplit(text)
    if url.path.lstrip("/") and "db" in parse_qs(url.query):
        # redis-py takes the option over the path: the database config.py checked was not the one used.
        raise ValueError("is not a Redis URL: the database is given twice (the path and ?db=): keep the path's")
    _check_redis_timeouts(connection)
    _check_redis_tls_files(connection)


# The shortest socket_timeout taken. A step that changes tasks must reach Redis within half of it (a second
# before it from 2 s on, see RedisStore): 0.1 s left 50 ms, and a busy moment of Redis or of this host then
# refused submissions and claims as late at random (0.01 s: 15 of 100 submissions) while /healthz said ok.
MIN_REDIS_SOCKET_TIMEOUT_S = 1


def _check_redis_timeouts(connection: object) -> None:
    """Stop the start on a timeout that is not a number of seconds (at least MIN_REDIS_SOCKET_TIMEOUT_S for
    socket_timeout, above 0 for socket_connect_timeout): nan and inf are no timeout at all to the kernel, or
    fail to set."""
    seconds = getattr(connection, "socket_timeout", None)
    if seconds is not None and not (math.isfinite(seconds) and seconds >= MIN_REDIS_SOCKET_TIMEOUT_S):
        raise ValueError(
            f"is not a Redis URL: socket_timeout={seconds!r} must be a number of seconds, at least"
            f" {MIN_REDIS_SOCKET_TIMEOUT_S}: each step that changes tasks must reach Redis within half of it"
        )
    seconds = getattr(connection, "socket_connect_timeout", None)
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"is not a Redis URL: socket_connect_timeout={seconds!r} must be a number of seconds above 0")


# The files a rediss:// URL may name: its query option, the attribute of redis-py's connection that holds it.
_REDIS_TLS_FILES = (("ssl_ca_certs", "ca_certs"), ("ssl_certfile", "certfile"), ("ssl_keyfile", "keyfile"))


def unreadable(path: str) -> str | None:
    """Why the file ``path`` cannot be opened for reading (missing, a directory, no permission), or None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _check_redis_tls_files(connection: object) -> None:
    """Stop the start if a TLS file the URL names cannot be read: redis-py says only "Error 2 connecting to host:port.
    No such file or directory." at the first connection, or waits for a handshake a missing ``ssl_ca_path`` fails."""
    for option, attribute in _REDIS_TLS_FILES:
        path = getattr(connection, attribute, None)
        if path and (why := unreadable(path)) is not None:
            raise ValueError(f"{option}={path!r} cannot be read: {why}")
    directory = getattr(connection, "ca_path", None)
    if directory and not os.path.isdir(directory):
        raise ValueError(f"ssl_ca_path={directory!r} is not a directory")


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise ValueError("must be 1-64 letters, digits or _ . : -")
    return text


def _directory(text: str) -> str:
    if text and (not text.startswith("/") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)):
        raise ValueError("must be empty or an absolute directory path")
    return text


def _password(text: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("must not contain control characters")
    return text


# A URL's user information: all from its scheme to its last "@" (a password may hold "/", unencoded), and the
# values of its password and username options (redis-py takes ?password=).
_URL_CREDENTIALS = re.compile(r"\A(\s*[A-Za-z][A-Za-z0-9+.-]*:/*)(.*)@", re.DOTALL)
_URL_PASSWORD_OPTION = re.compile(r"([?&](?:password|username)=)([^&#]*)", re.IGNORECASE)
_NOT_SHOWN = "<not shown>"


# A longer value is shown by its beginning and its length: the line stays one line to read, not kilobytes.
SHOWN_CHARS = 200


def _shown(variable: str, raw: str) -> str:
    """A value as an error message may show it: secrets never, a URL's password neither, a long one cut short."""
    if variable in _SECRETS:
        return f"<{len(raw)} characters, not shown>"
    text = _URL_CREDENTIALS.sub(r"\1<credentials not shown>@", _URL_PASSWORD_OPTION.sub(r"\1" + _NOT_SHOWN, raw))
    if len(text) > SHOWN_CHARS:
        return f"{text[:SHOWN_CHARS]!r}... ({len(raw)} characters)"
    return repr(text)


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _log_format(text: str) -> str:
    if text.lower() not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return text.lower()


_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def _switch(text: str) -> bool:
    try:
        return _SWITCH[text.lower()]
    except KeyError:
        raise ValueError("must be on or off (also true/false, 1/0, yes/no)") from None


def _import_path(text: str) -> str:
    if text and not _IMPORT_PATH.fullmatch(text):
        raise ValueError("must be empty or module:callable, e.g. mytasks:run")
    return text


_DAY_MS = 86_400_000
_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    # variable: (Config field, parser)
    "WORKERS": ("workers", _integer(1, 256)),
    "QUEUE_SIZE": ("queue_size", _integer(1, 1_000_000)),
    "HOST": ("host", parse_host),
    "PORT": ("port", _integer(0, 65_535)),
    "WORK_MIN_MS": ("work_min_ms", _integer(0, _DAY_MS)),
    "WORK_MAX_MS": ("work_max_ms", _integer(0, _DAY_MS)),
    "FAILURE_RATE": ("failure_rate", _number(0.0, 1.0)),
    "BACKOFF_BASE_MS": ("backoff_base_ms", _integer(0, _DAY_MS)),
    "BACKOFF_CAP_MS": ("backoff_cap_ms", _integer(0, _DAY_MS)),
    "DEFAULT_MAX_RETRIES": ("default_max_retries", _integer(0, 1000)),
    "MAX_RETRIES_LIMIT": ("max_retries_limit", _integer(0, 1000)),
    "MAX_BODY_BYTES": ("max_body_bytes", _integer(64, 16 * 1024 * 1024)),
    "MAX_PAYLOAD_CHARS": ("max_payload_chars", _integer(0, 16 * 1024 * 1024)),
    "MAX_BATCH_TASKS": ("max_batch_tasks", _integer(1, 100_000)),
    "MAX_BATCH_BODY_BYTES": ("max_batch_body_bytes", _integer(64, 256 * 1024 * 1024)),
    "STATE_TTL_S": ("state_ttl_s", _number(0.0, 365 * 86_400.0, low_open=True)),
    "STATE_MAX_TASKS": ("state_max_tasks", _integer(1, 100_000_000)),
    "SHUTDOWN_TIMEOUT_S": ("shutdown_timeout_s", _number(0.0, 86_400.0)),
    # A client has at least a second to send a request: below, most would be cut off unanswered.
    "REQUEST_TIMEOUT_S": ("request_timeout_s", _number(1.0, 3600.0)),
    "MAX_DELAY_MS": ("max_delay_ms", _integer(0, 30 * _DAY_MS)),
    "MAX_RESULT_BYTES": ("max_result_bytes", _integer(0, 16 * 1024 * 1024)),
    "ATTEMPT_TIMEOUT_S": ("attempt_timeout_s", _number(0.0, 86_400.0)),
    "LEASE_S": ("lease_s", _number(1.0, 3600.0)),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _log_format),
    "ACCESS_LOG": ("access_log", _switch),
    "TASK_HANDLER": ("task_handler", _import_path),
    "API_TOKEN": ("api_token", _token),
    "STORE": ("store", _store),
    "STORE_PREFIX": ("store_prefix", _prefix),
    "REDIS_PASSWORD": ("redis_password", _password),
    "METRICS_DIR": ("metrics_dir", _directory),
}
VARIABLES = tuple(_FIELDS)
# Their values never appear in an error message.
_SECRETS = frozenset({"API_TOKEN", "REDIS_PASSWORD"})

# (smaller, larger): the first must not exceed the second.
_ORDERED = (
    ("WORK_MIN_MS", "WORK_MAX_MS"),
    ("BACKOFF_BASE_MS", "BACKOFF_CAP_MS"),
    ("DEFAULT_MAX_RETRIES", "MAX_RETRIES_LIMIT"),
)
# MAX_PAYLOAD_CHARS may exceed MAX_BODY_BYTES: the body limit then applies
# first (413), so lowering MAX_BODY_BYTES alone keeps working.


def from_env(environ: Mapping[str, str]) -> Config:
    """Build a Config from ``environ``; unset variables take their defaults.

    Raises ConfigError naming the first bad variable and its value.
    """
    values: dict[str, Any] = {}
    for variable, (field, parse) in _FIELDS.items():
        raw = environ.get(variable)
        if raw is None:
            continue
        try:
            if variable == "API_TOKEN" and raw and not raw.strip():
                # Set, but blank: stripped to "", it would silently mean "no token".
                raise ValueError(TOKEN_RULE)
            values[field] = parse(raw.strip())
        except ValueError as exc:
            # A reason never quotes a secret: a URL is checked without its credentials (see _redis_url).
            raise ConfigError(f"{variable}={_shown(variable, raw)} is invalid: {exc}") from None
    config = Config(**values)
    for smaller, larger in _ORDERED:
        low, high = getattr(config, _FIELDS[smaller][0]), getattr(config, _FIELDS[larger][0])
        if low > high:
            raise ConfigError(f"{smaller}={low} is invalid: must not exceed {larger}={high}")
    return config


def read_environment(
    dotenv_path: Path | None = DOTENV_PATH, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The process environment (or ``environ``) over the values in ``dotenv_path`` (if it exists)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    # Only a path that is not there at all means no .env: a directory (what a bind mount of a missing file
    # makes) or a link to nothing would leave every setting in it silently at its default.
    if dotenv_path is not None and (dotenv_path.exists() or dotenv_path.is_symlink()):
        if not dotenv_path.is_file():
            why = "is a directory" if dotenv_path.is_dir() else "is not a file"
            if not dotenv_path.exists():
                why = f"is a link to {os.readlink(dotenv_path)}, which does not exist"
            raise ConfigError(f"{dotenv_path} {why}: the settings in it cannot be read (remove it, or make it a file)")
        _check_dotenv(dotenv_path)
        # Taken as written: python-dotenv would otherwise replace ``${NAME}`` (quoted or not) with the
        # environment's value, or nothing, and start with a token or password other than the one in the file.
        literal = dotenv_values(dotenv_path, interpolate=False)
        merged.update({k: v for k, v in literal.items() if v is not None})
        _check_not_blanked(merged, dotenv_path, environ)
    merged.update(environ)
    return merged


def _check_not_blanked(dotenv: Mapping[str, str], path: Path, environ: Mapping[str, str]) -> None:
    """Raise ConfigError for a setting the environment sets empty over a value in ``.env``.

    The environment wins, so ``API_TOKEN=`` there (an ``Environment=API_TOKEN=`` of a unit, ``export
    API_TOKEN=`` in a script) silently dropped the token written in ``.env`` and opened the task
    endpoints; ``TASK_HANDLER=`` replaced the handler with the simulated work. Neither value is shown.
    """
    for name in VARIABLES:
        if dotenv.get(name, "").strip() and name in environ and not environ[name].strip():
            raise ConfigError(
                f"{name} is set but empty in the environment, which would override the value {path} gives it: "
                f"unset it there, or set it to the value meant"
            )


def _check_dotenv(path: Path) -> None:
    """Raise ConfigError at the first line that is not ``VARIABLE=value``, or sets a variable set above.

    python-dotenv only warns about a line it cannot parse and skips it, and it reads a bare name
    (``WORKERS``, ``export WORKERS``) as a variable without a value, which ``read_environment`` drops:
    either way a setting the user meant to make would be silently left at its default.

    A file that cannot be read or is not UTF-8 is named in one line too, not with a traceback.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path} cannot be read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line} is not UTF-8 text") from None
    first_lines: dict[str, int] = {}
    with io.StringIO(text) as stream:
        for binding in parse_stream(stream):
            text = binding.original.string
            line = binding.original.line + text[: len(text) - len(text.lstrip())].count("\n")  # blank lines before
            if binding.error or (binding.key is not None and binding.value is None):
                # The line's text is not shown: it may hold a secret.
                raise ConfigError(f"{path} line {line} is not VARIABLE=value")
            if binding.key is not None and binding.key not in VARIABLES and not binding.key.startswith("COMPOSE_"):
                raise ConfigError(f"{path} line {line}: {_unknown_variable(binding.key)}")
            if binding.key in VARIABLES and (first := first_lines.setdefault(binding.key, line)) != line:
                # The last line would win without a word: an appended ``API_TOKEN=`` dropped the token.
                raise ConfigError(
                    f"{path} line {line} sets {binding.key} again (first set on line {first}): "
                    f"only one would count; keep the line meant"
                )


def _unknown_variable(name: str) -> str:
    """Why ``name``, read from ``.env``, is refused: it is no setting, so its value would be dropped for the default.

    Nothing but this module reads ``.env`` (``COMPOSE_*`` names aside: ``docker compose`` reads the file too).
    """
    close = difflib.get_close_matches(name.upper(), VARIABLES, n=1, cutoff=0.75)
    meant = f" (did you mean {close[0]}?)" if close else ""
    return f"{name!r} is not a setting{meant}: .env.example lists every variable"


def load(dotenv_path: Path | None = DOTENV_PATH) -> Config:
    """Read the settings; on a bad value print one line to stderr and exit with code 2."""
    try:
        return from_env(read_environment(dotenv_path))
    except ConfigError as exc:
        exit_on_error(exc, dotenv_path)


def exit_on_error(error: ConfigError, dotenv_path: Path | None = DOTENV_PATH) -> NoReturn:
    """Write ``error`` as one line on stderr, in LOG_FORMAT, and exit with code 2."""
    write_startup_line(f"configuration error: {error}", dotenv_path=dotenv_path)
    raise SystemExit(EXIT_BAD_CONFIG) from None


def write_startup_line(message: str, level: str = "ERROR", dotenv_path: Path | None = DOTENV_PATH) -> None:
    """Write one line of a start that has no logging yet (why it stops, a warning) to stderr, in LOG_FORMAT."""
    sys.stderr.write(startup_line(message, level, dotenv_path) + "\n")
    sys.stderr.flush()


def startup_line(message: str, level: str = "ERROR", dotenv_path: Path | None = DOTENV_PATH) -> str:
    """``message`` as the service's lines look in LOG_FORMAT: as given for text, else the JSON object a log line is.

    LOG_FORMAT is read for itself, as far as it can be: the settings that failed may be its own, or
    ``.env``'s (then only the environment's value counts), and a value that is not valid means text.
    """
    try:
        environ: Mapping[str, str] = read_environment(dotenv_path)
    except Exception:  # noqa: BLE001  (the .env that cannot be read is what is being reported)
        environ = os.environ
    try:
        log_format = _log_format(environ.get("LOG_FORMAT", "text").strip())
    except ValueError:
        log_format = "text"
    if log_format == "text":
        return message
    # The fields and layout of service/logs.py's JSON lines, which this module, imported first, cannot use.
    fields = {"level": level, "logger": "config", "message": message, "task_id": None, "request_id": None}
    fields["timestamp"] = datetime.datetime.now(datetime.UTC).isoformat()
    fields["pid"] = os.getpid()
    return json_log_line(json.dumps(fields, ensure_ascii=False))


# The bidi controls (embeddings, overrides, isolates and marks; CVE-2021-42574): a viewer shows the text after one
# reordered, so a log line holding one reads as another. Log lines write them as escapes.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# JSON escapes the C0 controls but leaves DEL, the C1 controls and U+2028/U+2029 raw, and line readers (str.splitlines,
# editors, log shippers) break on some of them (U+0085 NEL, U+2028, U+2029). Outside its strings a JSON line is ASCII,
# so each is inside a string, where its \uXXXX escape keeps the line valid JSON with the same value; the bidi
# controls likewise.
_RAW_IN_JSON = re.compile(f"[\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]")


def json_log_line(text: str) -> str:
    """``text``, a JSON document dumped with ``ensure_ascii=False``, with each character that can end a line escaped."""
    return _RAW_IN_JSON.sub(_json_escape, text)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


# WEB_CONCURRENCY, gunicorn's default for -w (some platforms set it): each process runs its own WORKERS threads
# and store connections, so a count past this is taken for a mistake rather than forked.
MAX_WEB_CONCURRENCY = 256


def web_concurrency(environ: Mapping[str, str] = os.environ) -> int | None:
    """``WEB_CONCURRENCY``, gunicorn's default for its worker processes (``-w``), or None when unset.

    Raises ConfigError for a value that is not an integer from 1 to MAX_WEB_CONCURRENCY: gunicorn would take 0
    and listen with no process to answer.
    """
    raw = environ.get("WEB_CONCURRENCY")
    if raw is None:
        return None
    try:
        return _integer(1, MAX_WEB_CONCURRENCY)(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"WEB_CONCURRENCY={_shown('WEB_CONCURRENCY', raw)} is invalid: {exc} (or unset)") from None


class StoppedWhileStarting(SystemExit):
    """A stop signal ended the start (``stop_while_starting`` raises it, wherever the start was): not an
    error of whatever was being loaded, such as TASK_HANDLER's module."""


def stop_while_starting(signum: int, frame: object) -> NoReturn:
    """A stop signal before the server's own handlers are in place: end the start, before listening, and exit 0."""
    stopped = f"received {signal.Signals(signum).name} while starting: stopped before serving"
    os.write(2, f"{startup_line(stopped, 'INFO')}\n".encode())  # no print(): it may interrupt one
    raise StoppedWhileStarting(0)


def root_path(environ: Mapping[str, str] = os.environ) -> str:
    """``SCRIPT_NAME``, the root path the service is served under (gunicorn reads it itself), ``""`` when unset.

    Raises ConfigError for one no request path can begin with: it is compared
    with the raw, still percent-encoded, path of each request.
    """
    raw = environ.get("SCRIPT_NAME", "")
    if raw and not _ROOT_PATH.fullmatch(raw):
        raise ConfigError(
            f"SCRIPT_NAME={raw!r} is invalid: must begin with / and hold only letters, digits and - . _ ~ ! $ & ' "
            "( ) * + , ; = : @ / (the characters a request path carries unencoded), or be unset"
        )
    return raw


def check_gunicorn_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Raise ConfigError naming the first variable gunicorn reads for itself whose value it would fail on.

    gunicorn reads WEB_CONCURRENCY and FORWARDED_ALLOW_IPS as it imports its settings, before
    gunicorn.conf.py, and systemd's LISTEN_FDS and LISTEN_PID as it starts: a value it cannot take
    ended it with a traceback (or a line that does not name the variable) and exit code 1. It reads
    SCRIPT_NAME, the root path, for every request: one that no request path can begin with left a
    server that answered every request with an error.
    """
    web_concurrency(environ)
    root_path(environ)
    for variable in ("LISTEN_FDS", "LISTEN_PID"):  # systemd's socket activation
        raw = environ.get(variable)
        if raw is not None and not _INT.fullmatch(raw.strip()):
            raise ConfigError(f"{variable}={raw!r} is invalid: must be an integer (systemd sets it; or unset)")
    raw = environ.get("FORWARDED_ALLOW_IPS")
    if raw is not None:
        for address in (part.strip() for part in raw.strip().split(",") if part):
            try:
                if address != "*":
                    ipaddress.ip_network(address)  # strict, as gunicorn: host bits set in a network are refused
            except ValueError as exc:
                raise ConfigError(
                    f"FORWARDED_ALLOW_IPS={raw!r} is invalid: {exc} (it must list IP addresses or networks, or be *)"
                ) from None


# Variables gunicorn reads for itself as it imports its settings, before its command line is applied.
_READ_BY_GUNICORN_AT_IMPORT = ("WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS")


def check_env_options(raw_env: Iterable[str]) -> None:
    """Raise ConfigError if gunicorn's ``-e``/``--env NAME=value`` (or in ``GUNICORN_CMD_ARGS``) sets a variable
    that is read before gunicorn sets it.

    gunicorn puts these in the environment once it has loaded gunicorn.conf.py, after the settings were read
    from the environment and ``.env``: ``-e API_TOKEN=...`` ran the task endpoints with no token, and
    without a word. The values are never shown (a token, a password).
    """
    names = []
    for option in raw_env:
        name = option.split("=", 1)[0].strip()
        if (name in VARIABLES or name in _READ_BY_GUNICORN_AT_IMPORT) and name not in names:
            names.append(name)
    if names:
        given = ", ".join(f"-e {name}=..." for name in names)
        where = ", ".join(names)
        raise ConfigError(
            f"{given} would not be taken: gunicorn sets its -e/--env variables only after the settings are read, "
            f"so {where} would silently keep the value of the environment or .env; set {where} there instead "
            "and drop the -e (in GUNICORN_CMD_ARGS too)"
        )


def check_gunicorn_env_options(raw_env: Iterable[str]) -> None:
    """Raise ConfigError naming the first variable gunicorn reads for itself (SCRIPT_NAME, LISTEN_FDS, LISTEN_PID)
    that gunicorn's ``-e``/``--env NAME=value`` (or in ``GUNICORN_CMD_ARGS``) sets to a value it would fail on.

    gunicorn sets these in the environment itself, after gunicorn.conf.py ran and before it reads them: they
    are taken, but skipped the check the same variables get from the environment (see
    ``check_gunicorn_environment``). Split as gunicorn splits them (at the first ``=``, the last of a name wins).
    """
    given = {}
    for option in raw_env:
        name, separator, value = option.partition("=")
        if separator:
            given[name] = value
    try:
        check_gunicorn_environment(given)
    except ConfigError as error:
        raise ConfigError(f"-e {error}") from None


def check_binary_upgrade(config: Config, old_arbiter_pid: int) -> None:
    """Raise ConfigError if a second server (gunicorn's binary upgrade) cannot serve the same tasks as the first,
    or would not outlive it.

    Where the first server is PID 1 (a container's command, the image's CMD), the kernel ends every
    process of its PID namespace when it exits: stopping it once the new one serves, as the upgrade
    goes, would kill the new server and its workers mid-task, with no drain and no line.
    """
    if old_arbiter_pid == 1:
        raise ConfigError(
            "a binary upgrade (kill -USR2) cannot replace a server that is PID 1 (a container's command): when it "
            "exits the kernel ends every process of the container, the new server with it; not starting a second "
            "server, the first keeps serving (replace the container, or stop and start the service instead)"
        )
    if not config.store.shared:
        raise ConfigError(
            f"a binary upgrade (kill -USR2) would serve one port from two servers, each with its own tasks, "
            f"with STORE={config.store.kind}: not starting a second server, the first keeps serving "
            "(stop and start the service instead)"
        )


def check_worker_recycling(config: Config, max_requests: int) -> None:
    """Raise ConfigError if gunicorn's ``max_requests`` (``--max-requests``, or in ``GUNICORN_CMD_ARGS``) would
    recycle worker processes that cannot be replaced without harm.

    A recycled worker drains its pool before it exits, and its replacement starts at once (see
    gunicorn.conf.py): with a shared store it serves the same tasks meanwhile, but with
    ``STORE=memory`` it starts with an empty task table.
    """
    if max_requests > 0 and not config.store.shared:
        raise ConfigError(
            f"--max-requests {max_requests} would restart the worker process every {max_requests} requests or so, "
            f"and with STORE={config.store.kind} each restart forgets every task it accepted: drop --max-requests "
            "(in GUNICORN_CMD_ARGS too), or use a shared store (sqlite:///path or redis://...)"
        )


def check_server_processes(config: Config, processes: int) -> None:
    """Raise ConfigError if ``processes`` server processes cannot serve the same tasks with ``config``'s store."""
    if processes < 1:  # gunicorn takes -w 0 and listens with no process to answer
        raise ConfigError(f"{processes} worker processes would answer no request: run at least one (-w/--workers)")
    if processes > 1 and not config.store.shared:
        raise ConfigError(
            f"{processes} worker processes would each keep their own tasks with STORE={config.store.kind}: "
            "run one (drop -w/--workers; WORKERS sets the task threads)"
        )
