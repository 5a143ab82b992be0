"""The image's HEALTHCHECK script asks the address the server listens on (see also test_http_edges.py)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from healthcheck import addresses, main, probe


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass


class _TCPServer(http.server.ThreadingHTTPServer):
    def __init__(self, host: str, status: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.status, self.paths = status, []
        super().__init__((host, 0), _Answer)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, status: int) -> None:
        self.status, self.paths = status, []
        super().__init__(path, _Answer)

    def get_request(self):  # a unix peer has no address: http.server expects a (host, port) pair
        request, _ = super().get_request()
        return request, ("unix", 0)


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _refusing_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def test_a_host_naming_one_address_is_asked_there_under_the_root_path():
    # HOST=<one address of the container>: nothing listens on 127.0.0.1, which was always asked.
    with _serving(_TCPServer("127.0.0.2", 200)) as server:
        port = server.server_address[1]
        assert main([], {"HOST": "127.0.0.2", "PORT": str(port), "SCRIPT_NAME": "/wp"}) == 0
        assert server.paths == ["/wp/healthz"]
        assert main([], {"HOST": "127.0.0.1", "PORT": str(port)}) == 1


def test_a_wildcard_host_is_asked_on_loopback():
    with _serving(_TCPServer("0.0.0.0", 200)) as server:
        assert main([], {"HOST": "0.0.0.0", "PORT": str(server.server_address[1])}) == 0
    if not socket.has_ipv6:
        return
    try:
        ipv6 = _TCPServer("::", 200)
    except OSError:
        pytest.skip("no IPv6 here")
    with _serving(ipv6) as server:
        assert main([], {"HOST": "::", "PORT": str(server.server_address[1])}) == 0


def test_a_unix_socket_bound_in_gunicorn_cmd_args_is_asked(tmp_path):
    path = str(tmp_path / "wp.sock")
    with _serving(_UnixServer(path, 200)) as server:
        assert main([], {"GUNICORN_CMD_ARGS": f"-b unix:{path}", "PORT": str(_refusing_port())}) == 0
        assert server.paths == ["/healthz"]


def test_an_address_given_as_an_argument_beats_the_environment(capsys):
    # A -b on the container's command is not in this process's environment: --health-cmd passes it instead.
    with _serving(_TCPServer("127.0.0.2", 200)) as server:
        given = f"127.0.0.2:{server.server_address[1]}"
        assert main([given], {"GUNICORN_CMD_ARGS": f"-b 127.0.0.1:{_refusing_port()}"}) == 0
    assert addresses({"GUNICORN_CMD_ARGS": "--bind [::1]:9000 -b 0.0.0.0:9001"}) == [("::1", 9000), ("0.0.0.0", 9001)]
    assert addresses({"HOST": "::", "PORT": "9000"}) == [("::", 9000)]
    assert addresses({"GUNICORN_CMD_ARGS": "--threads 4"}) == [("127.0.0.1", 8080)]  # no -b: HOST and PORT
    assert capsys.readouterr().err == ""


def test_an_answer_other_than_200_is_unhealthy_and_says_what_it_was(capsys):
    with _serving(_TCPServer("127.0.0.1", 503)) as server:
        port = server.server_address[1]
        assert main([], {"PORT": str(port)}) == 1
    assert capsys.readouterr().err == f"unhealthy: 127.0.0.1:{port}/healthz answered 503\n"


def test_a_server_that_accepts_but_never_answers_is_unhealthy():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nothing ever reads or answers
        port = silent.getsockname()[1]
        assert probe(("127.0.0.1", port), "/healthz", timeout=0.2) == (
            f"127.0.0.1:{port}/healthz did not answer within 0.2 s"
        )
    assert probe(3, "/healthz").startswith("cannot ask file descriptor 3")


@pytest.mark.parametrize(
    ("environ", "said"),
    [
        ({"GUNICORN_CMD_ARGS": "--no-such-option"}, "GUNICORN_CMD_ARGS cannot be read: unrecognized arguments: "),
        ({"GUNICORN_CMD_ARGS": "-b"}, "GUNICORN_CMD_ARGS cannot be read: argument -b/--bind: expected one argument"),
        ({"GUNICORN_CMD_ARGS": "-b '127.0.0.1:80"}, "GUNICORN_CMD_ARGS cannot be read: No closing quotation"),
        ({"GUNICORN_CMD_ARGS": "-b 127.0.0.1:http"}, "the address '127.0.0.1:http' cannot be read: "),
        ({"PORT": "80a"}, "PORT='80a' is not a port number"),
    ],
    ids=["unknown-option", "no-value", "open-quote", "bad-port", "bad-PORT"],
)
def test_settings_it_cannot_read_are_unhealthy_in_one_line(capsys, environ, said):
    # gunicorn's parser printed its usage (60 lines) and exited 2, which Docker reserves: 1 is unhealthy.
    assert main([], environ) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"unhealthy: {said}") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_host_and_port_are_read_from_dotenv_under_the_environment_as_the_server_reads_them(tmp_path):
    # The server takes them from .env too: the probe asked 127.0.0.1:8080 and the container was unhealthy for ever.
    dotenv = tmp_path / ".env"
    with _serving(_TCPServer("127.0.0.2", 200)) as server:
        port = server.server_address[1]
        dotenv.write_text(f"HOST=127.0.0.2\nPORT={port}\n")
        assert main([], {}, dotenv) == 0
        # The environment wins, as it does for the server.
        assert main([], {"HOST": "127.0.0.1"}, dotenv) == 1
        assert main([], {"PORT": str(_refusing_port())}, dotenv) == 1


def test_a_dotenv_the_server_cannot_read_is_unhealthy_in_one_line(tmp_path, capsys):
    (tmp_path / ".env").mkdir()  # what a bind mount of a missing file makes
    assert main([], {"PORT": str(_refusing_port())}, tmp_path / ".env") == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"unhealthy: {tmp_path / '.env'} is a directory") and captured.err.count("\n") == 1
