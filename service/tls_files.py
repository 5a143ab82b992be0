"""The TLS files given to gunicorn (``--certfile``, ``--keyfile``, ``--ca-certs``), checked before it listens.

gunicorn checks only that the certificate and key files exist, in a
traceback that ends the start with exit code 1 once the app is loaded, and
builds its TLS context for each connection: an empty file, a key that does
not match the certificate, or a file it may not read started a server that
failed every connection ("[SSL] PEM lib" per connection in the log). The
context is built here once, as gunicorn builds it (its ``ssl_context`` hook
included), so that such files stop the start in one line. The workers build
it, as the user ``--user``/``--group`` make them: the files are read as that
user, in a process that took its ids as the workers take them (a key only
root may read passed a check made as root, and every connection failed).
"""

from __future__ import annotations

import os
import pwd
import re
from typing import Any

from gunicorn import sock, util

from config import ConfigError, unreadable

# "[SSL] PEM lib (_ssl.c:3905)": the source line of CPython's ssl module tells an operator nothing.
_SOURCE_LINE = re.compile(r" \(_ssl\.c:\d+\)$")


def check_tls(cfg: Any) -> None:
    """Raise ConfigError if gunicorn's settings ``cfg`` ask for TLS with files it could not serve it with."""
    if not getattr(cfg, "is_ssl", False):  # or settings without TLS's (another gunicorn)
        return
    given = {"--certfile": cfg.certfile, "--keyfile": cfg.keyfile, "--ca-certs": cfg.ca_certs}
    if (refusal := _unreadable_by_the_workers(cfg, given)) is not None:
        raise ConfigError(refusal)
    if not cfg.certfile:
        raise ConfigError(
            f"--keyfile {cfg.keyfile!r} is given without --certfile: TLS needs the certificate too "
            "(--certfile, a file that may hold the key as well)"
        )
    try:
        sock.ssl_context(cfg)
    except Exception as error:  # noqa: BLE001  (a gunicorn ssl_context hook of one's own may raise anything)
        files = " and ".join(f"{option} {path!r}" for option, path in given.items() if path)
        reason = _SOURCE_LINE.sub("", str(error)) or type(error).__name__
        raise ConfigError(
            f"TLS cannot be served with {files}: {reason} (it takes a PEM certificate and the private key that "
            "matches it; or terminate TLS at a proxy)"
        ) from None


def _first_unreadable(given: dict[str, str | None], reader: str = "") -> str | None:
    """Why the first of the ``given`` files cannot be read (by ``reader``), or None if all can."""
    for option, path in given.items():
        if path and (why := unreadable(path)) is not None:
            return f"{option} {path!r} cannot be read{reader}: {why}"
    return None


def _unreadable_by_the_workers(cfg: Any, given: dict[str, str | None]) -> str | None:
    """Why a ``given`` file cannot be read by the worker processes, which may run as another user: or None."""
    uid, gid, initgroups = cfg.uid, cfg.gid, bool(getattr(cfg, "initgroups", False))
    if (uid, gid) == (os.getuid(), os.getgid()) and not initgroups:
        return _first_unreadable(given)
    try:
        user = repr(pwd.getpwuid(uid).pw_name)
    except KeyError:
        user = f"uid {uid}"
    reader = f" by the workers' user {user} (uid {uid}, gid {gid}: --user, --group)"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # only reads files and writes to the pipe: nothing the arbiter's threads may hold a lock of
        status = 1
        try:
            os.close(read_end)
            util.set_owner_process(uid, gid, initgroups=initgroups)  # as gunicorn's Worker.init_process does
            os.write(write_end, (_first_unreadable(given, reader) or "").encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        said = answer.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:  # the ids could not be taken: the workers say so when they boot
        return _first_unreadable(given)
    return said or None
