"""The TLS files given to gunicorn (``--certfile``, ``--keyfile``, ``--ca-certs``), checked before it listens.

gunicorn checks only that the certificate and key files exist, in a
traceback that ends the start with exit code 1 once the app is loaded, and
builds its TLS context for each connection: an empty file, a key that does
not match the certificate, or a file it may not read started a server that
failed every connection ("[SSL] PEM lib" per connection in the log). The
context is built here once, as gunicorn builds it (its ``ssl_context`` hook
included), so that such files stop the start in one line.
"""

from __future__ import annotations

import re
from typing import Any

from gunicorn import sock

from config import ConfigError, unreadable

# "[SSL] PEM lib (_ssl.c:3905)": the source line of CPython's ssl module tells an operator nothing.
_SOURCE_LINE = re.compile(r" \(_ssl\.c:\d+\)$")


def check_tls(cfg: Any) -> None:
    """Raise ConfigError if gunicorn's settings ``cfg`` ask for TLS with files it could not serve it with."""
    if not getattr(cfg, "is_ssl", False):  # or settings without TLS's (another gunicorn)
        return
    given = {"--certfile": cfg.certfile, "--keyfile": cfg.keyfile, "--ca-certs": cfg.ca_certs}
    for option, path in given.items():
        if path and (why := unreadable(path)) is not None:
            raise ConfigError(f"{option} {path!r} cannot be read: {why}")
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
