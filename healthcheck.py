"""The container image's HEALTHCHECK: exit 0 if the server answers ``/healthz`` with 200, else 1.

It asks the address the server listens on, found as gunicorn.conf.py and gunicorn find it: the first ``-b``
(``--bind``) in ``GUNICORN_CMD_ARGS``, else ``HOST`` and ``PORT``, from the environment or else ``.env`` as
config.py reads them (a ``.env`` the server cannot read is unhealthy: it did not start); a wildcard host
(``0.0.0.0``, ``::``) is asked on loopback. Probing ``127.0.0.1:$PORT`` alone marked a container whose address
came from ``-b``, or from a ``HOST`` naming one address of the container, unhealthy for ever (and Swarm replaced
it in a loop). A ``-b`` given on the command (``docker run workerpool python run_gunicorn.py -b ...``) is not seen
by this process: pass the address as an argument then (``--health-cmd 'python healthcheck.py 127.0.0.1:9000'``).

The request goes under the root path (``SCRIPT_NAME``: every path outside it is a 404) and never through a proxy
the environment names (``http_proxy``, which Docker may pass to every container). This script runs beside the
server, in a process of its own, so it reads the environment the server was started with, not config.py's checks
of each value: a bad setting has already stopped the server.
"""

from __future__ import annotations

import http.client
import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import config

TIMEOUT_S = 2  # below the HEALTHCHECK's --timeout=3s, so that a hung server is reported by this script
# Where a server listening on every address of a family is asked.
_LOOPBACK = {"": ("127.0.0.1",), "0.0.0.0": ("127.0.0.1",), "::": ("::1", "127.0.0.1")}  # [::] takes IPv4 too


def addresses(environ: Mapping[str, str], given: Sequence[str] = ()) -> list[tuple[str, int] | str | int]:
    """Where the server listens: (host, port) pairs, unix socket paths and file descriptors, as gunicorn parses them."""
    binds = list(given) or _binds_in(environ.get("GUNICORN_CMD_ARGS", ""))
    if not binds:  # gunicorn.conf.py's `bind`; gunicorn is not imported (a third of a second of CPU each time)
        port = environ.get("PORT", "8080")
        if not (port.isascii() and port.isdigit()):
            raise ValueError(f"PORT={port!r} is not a port number")
        return [(environ.get("HOST", "127.0.0.1"), int(port))]
    from gunicorn.util import parse_address  # the parser gunicorn applies to each -b

    where = []
    for bind in binds:
        try:
            where.append(parse_address(bind))
        except (RuntimeError, ValueError) as error:  # "'x' is not a valid port number."
            raise ValueError(f"the address {bind!r} cannot be read: {error}") from None
    return where


def _binds_in(args: str) -> list[str]:
    """The ``-b`` values of ``GUNICORN_CMD_ARGS``, read with gunicorn's own parser; ValueError if it cannot read them
    (its usage and exit code 2, which a HEALTHCHECK must not give: only 0 and 1 are its answers)."""
    if not args.strip():
        return []
    from gunicorn.config import Config

    parser = Config().parser()

    def refuse(message: str) -> NoReturn:
        raise ValueError(f"GUNICORN_CMD_ARGS cannot be read: {message}")

    parser.error = refuse  # type: ignore[method-assign]  # argparse's error() prints its usage and exits 2
    try:
        words = shlex.split(args)
    except ValueError as error:  # "No closing quotation"
        refuse(str(error))
    return parser.parse_args(words).bind or []


def probe(address: tuple[str, int] | str | int, path: str, *, timeout: float = TIMEOUT_S) -> str | None:
    """None if ``address`` answers ``GET path`` with 200, else what it answered or why it could not."""
    if isinstance(address, int):
        return f"cannot ask file descriptor {address} (fd://): give the address as an argument"
    if isinstance(address, str):
        connections = {f"unix:{address}": _UnixConnection(address, timeout)}
    else:
        host, port = address
        connections = {
            f"[{ask}]:{port}" if ":" in ask else f"{ask}:{port}": http.client.HTTPConnection(ask, port, timeout=timeout)
            for ask in _LOOPBACK.get(host, (host,))
        }
    failure = None
    for where, connection in connections.items():
        try:
            connection.request("GET", path, headers={"Connection": "close"})
            status = connection.getresponse().status
        except TimeoutError:
            return f"{where}{path} did not answer within {timeout:g} s"
        except OSError as error:  # refused, or no such address (::1 with IPv6 off): the next loopback, if any
            failure = f"{where}{path}: {error}"
            continue
        finally:
            connection.close()
        return None if status == 200 else f"{where}{path} answered {status}"
    return failure


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket (gunicorn's ``-b unix:/path``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def main(argv: Sequence[str], environ: Mapping[str, str], dotenv_path: Path | None = config.DOTENV_PATH) -> int:
    path = environ.get("SCRIPT_NAME", "").rstrip("/") + "/healthz"
    try:
        where = addresses(config.read_environment(dotenv_path, environ), argv)
    except ValueError as error:  # ConfigError (.env) too; unhealthy (1), said in one line: not 2, which Docker reserves
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    failure = probe(where[0], path) if where else "no address to ask"
    if failure is None:
        return 0
    print(f"unhealthy: {failure}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
