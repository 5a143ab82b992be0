"""Configuration errors found at start-up stop gunicorn and `python app.py` before they listen: exit 2, one line."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from http_fixtures import LISTENING, PROJECT_ROOT, ServerProcess, clean_environment, wait_until

from app import check_listen, check_listen_together
from config import ConfigError

pytestmark = pytest.mark.e2e

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
APP = [sys.executable, "app.py", "--port", "0"]
RUN_GUNICORN = [sys.executable, "run_gunicorn.py", "-b", "127.0.0.1:0"]  # `make run` and the container image


def start(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a server that must refuse to start; a server that starts is killed by the timeout."""
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=clean_environment(**env), capture_output=True, text=True, timeout=60
    )


HANDLERS = {
    "missing module": ("no_such_module_anywhere:run", "No module named 'no_such_module_anywhere'"),
    "missing attribute": ("json:no_such_function", "module 'json' has no attribute 'no_such_function'"),
}


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
@pytest.mark.parametrize(("handler", "reason"), HANDLERS.values(), ids=HANDLERS.keys())
def test_a_task_handler_that_does_not_resolve_stops_start_up(command, handler, reason):
    result = start(command, TASK_HANDLER=handler)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output == f"configuration error: TASK_HANDLER={handler!r} is invalid: {reason}\n"


BROKEN_MODULES = {
    "syntax-error": ("def run(task, cancel:\n    pass\n", "SyntaxError: '(' was never closed (broken.py, line 1)"),
    "raises-at-import": ('raise RuntimeError("no config\\nfound")\n', "RuntimeError: no config found"),
    # A script reused as a handler: sys.exit() or argparse at module level (gunicorn printed the message alone).
    "exits-at-import": ('import sys\nsys.exit("no config file")\n', "SystemExit: no config file"),
    "interrupts-its-import": ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
}


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
@pytest.mark.parametrize(("source", "reason"), BROKEN_MODULES.values(), ids=BROKEN_MODULES.keys())
def test_a_task_handler_module_that_fails_to_import_stops_start_up_in_one_line(tmp_path, command, source, reason):
    """Only ImportError and AttributeError were named: a module with a syntax error, or one that raised while it
    was imported, ended the start in a traceback with exit code 1."""
    (tmp_path / "broken.py").write_text(source)
    result = start(command, TASK_HANDLER="broken:run", PYTHONPATH=str(tmp_path))
    assert result.returncode == 2
    assert result.stdout + result.stderr == (
        f"configuration error: TASK_HANDLER='broken:run' is invalid: importing it raised {reason}\n"
    )


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "gunicorn", "-c", str(PROJECT_ROOT / "gunicorn.conf.py"), "-b", "127.0.0.1:0"],
        [sys.executable, str(PROJECT_ROOT / "app.py"), "--port", "0"],
    ],
    ids=["gunicorn", "python app.py"],
)
def test_a_task_handler_module_in_the_working_directory_is_found_by_both_servers(tmp_path, command):
    # gunicorn imported it, python app.py said "No module named ...": one rule on both.
    (tmp_path / "cwdhandler.py").write_text("raise RuntimeError('imported from the working directory')\n")
    result = subprocess.run(
        command, cwd=tmp_path, env=clean_environment(TASK_HANDLER="cwdhandler:run"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "importing it raised RuntimeError: imported from the working directory" in result.stderr, result.stderr


def test_gunicorn_refuses_several_worker_processes_sharing_no_store():
    result = start([*GUNICORN, "-w", "3"])
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "configuration error: 3 worker processes would each keep their own tasks with STORE=memory" in output
    assert "Listening at" not in output
    assert "Traceback" not in output


def test_gunicorn_refuses_zero_worker_processes(tmp_path):
    """gunicorn takes -w 0 and WEB_CONCURRENCY=0 (a shared store lets the latter set the processes) and listened
    with no process to answer: every request waited. The line names what said 0."""
    shared = {"STORE": f"sqlite:///{tmp_path / 'tasks.db'}"}
    for command, args, env, said in (
        (GUNICORN, ["-w", "0"], {}, "0 worker processes would answer no request: run at least one (-w/--workers)"),
        (GUNICORN, [], {"WEB_CONCURRENCY": "0", **shared}, "WEB_CONCURRENCY='0' is invalid: must be an integer from 1"),
        (RUN_GUNICORN, [], {"WEB_CONCURRENCY": "0", **shared}, "WEB_CONCURRENCY='0' is invalid"),
        (RUN_GUNICORN, [], {"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY='0' is invalid"),  # memory: no longer "not taken"
    ):
        result = start([*command, *args], **env)
        assert result.returncode == 2, (args, env)
        output = result.stdout + result.stderr
        assert f"configuration error: {said}" in output, output
        assert "Listening at" not in output and "Traceback" not in output


def test_gunicorn_refuses_zero_request_threads():
    """gunicorn takes --threads 0 and listened, then the worker failed to boot: a traceback, exit code 3."""
    for command, args, env in (
        (GUNICORN, ["--threads", "0"], {}),
        (GUNICORN, [], {"GUNICORN_CMD_ARGS": "--threads 0"}),
        (RUN_GUNICORN, ["--threads", "0"], {}),
    ):
        result = start([*command, *args], **env)
        assert result.returncode == 2, (command, args, env)
        output = result.stdout + result.stderr
        assert output.startswith("configuration error: --threads 0 would leave no thread to answer a request"), output
        assert "Listening at" not in output and "Traceback" not in output


def _self_signed(directory, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command: the paths of both."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test's certificates")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def test_gunicorn_refuses_tls_files_it_could_not_serve_with(tmp_path):
    """A missing file ended the start in gunicorn's traceback (exit 1); an empty one, or a key of another
    certificate, started a server that failed every connection ("[SSL] PEM lib" in the log)."""
    cert, key = _self_signed(tmp_path, "one")
    other_key = _self_signed(tmp_path, "other")[1]
    empty = tmp_path / "empty.pem"
    empty.touch()
    for command, args, env, said in (
        (GUNICORN, ["--certfile", "/no/such.pem", "--keyfile", key], {}, "--certfile '/no/such.pem' cannot be read"),
        (GUNICORN, [], {"GUNICORN_CMD_ARGS": f"--certfile {cert} --keyfile /no/such.key"}, "--keyfile '/no/such.key'"),
        (RUN_GUNICORN, ["--certfile", str(empty), "--keyfile", str(empty)], {}, "PEM lib"),
        (GUNICORN, ["--certfile", cert, "--keyfile", other_key], {}, "key values mismatch"),
        (GUNICORN, ["--certfile", cert], {}, f"TLS cannot be served with --certfile {cert!r}: "),  # no key
        (GUNICORN, ["--keyfile", key], {}, "is given without --certfile"),
    ):
        result = start([*command, *args], **env)
        assert result.returncode == 2, (args, env, result.stderr)
        output = result.stdout + result.stderr
        assert output.startswith("configuration error: ") and said in output, output
        assert output.count("\n") == 1 and "Listening at" not in output and "Traceback" not in output


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root starts workers as another user (--user)"
)
def test_gunicorn_reads_the_tls_files_as_the_user_its_workers_run_as(tmp_path):
    """Checked as the arbiter's user (root), a key only root may read passed, and the workers (--user nobody), which
    build the TLS context, failed every connection with PermissionError in the log."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run the workers as")
    shared = Path(tempfile.mkdtemp(prefix="tls-"))  # tmp_path's parents are root's alone: nobody reads nothing there
    try:
        shared.chmod(0o755)
        cert, key = _self_signed(shared, "root-only")
        Path(key).chmod(0o600)
        result = start([*GUNICORN, "--certfile", cert, "--keyfile", key, "--user", "nobody"])
        assert result.returncode == 2, result.stderr
        output = result.stdout + result.stderr
        assert output == (
            f"configuration error: --keyfile {key!r} cannot be read by the workers' user 'nobody' "
            f"(uid {nobody.pw_uid}, gid 0: --user, --group): Permission denied\n"
        )
        Path(key).chmod(0o644)  # readable by the workers: the server starts, and serves
        server = ServerProcess([*GUNICORN[1:], "--certfile", cert, "--keyfile", key, "--user", "nobody"],
                               log_path=tmp_path / "server.log", env=clean_environment())  # fmt: skip
        try:
            port = server.wait_for_port(LISTENING.replace("http:", "https:"))
            # Any answer: the handshake took the key. (Which one depends on the machine: an interpreter installed where
            # only root may read, /root/.pyenv, fails nobody's workers at a module imported late, answering 500.)
            assert _healthz_over_tls(port, cert).startswith(b"HTTP/1.1 ")
        finally:
            server.stop()
    finally:
        shutil.rmtree(shared)


def _healthz_over_tls(port: int, cert: str) -> bytes:
    """The start of the first answer to GET /healthz over TLS, trusting ``cert``."""
    context = ssl.create_default_context(cafile=cert)

    def healthz() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            return tls.recv(65536)

    return wait_until(healthz, timeout=20, what="/healthz over TLS")


def test_gunicorn_serves_tls_with_a_certificate_and_its_key(tmp_path):
    cert, key = _self_signed(tmp_path, "served")
    pattern = LISTENING.replace("http:", "https:")
    server = ServerProcess([*GUNICORN[1:], "--certfile", cert, "--keyfile", key], log_path=tmp_path / "server.log",
                           env=clean_environment())  # fmt: skip
    try:
        assert _healthz_over_tls(server.wait_for_port(pattern), cert).startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()


def test_gunicorn_refuses_recycling_a_worker_that_cannot_be_replaced(tmp_path):
    """--max-requests (on the command line or in GUNICORN_CMD_ARGS) overrode gunicorn.conf.py's max_requests = 0:
    on STORE=memory the worker restarted every N requests and forgot every task it had accepted."""
    for args, env in ((["--max-requests", "4"], {}), ([], {"GUNICORN_CMD_ARGS": "--max-requests 3"})):
        result = start([*GUNICORN, *args], **env)
        assert result.returncode == 2, (args, env)
        output = result.stdout + result.stderr
        assert "configuration error: --max-requests " in output
        assert "with STORE=memory each restart forgets every task" in output
        assert "Listening at" not in output and "Traceback" not in output


def test_gunicorn_refuses_preloading_the_app(tmp_path):
    """--preload (on the command line or in GUNICORN_CMD_ARGS) overrode gunicorn.conf.py's preload_app = False: the
    pool was built in the arbiter, so every worker process had the arbiter's lease owner, and a worker that stopped
    abandoned the running tasks of the others."""
    for args, env in (
        (["--preload"], {}),
        ([], {"GUNICORN_CMD_ARGS": "--preload", "STORE": f"sqlite:///{tmp_path / 'tasks.db'}", "WEB_CONCURRENCY": "2"}),
    ):
        result = start([*GUNICORN, *args], **env)
        assert result.returncode == 2, (args, env)
        output = result.stdout + result.stderr
        assert "configuration error: --preload would build the task pool in the arbiter" in output
        assert "Listening at" not in output and "Traceback" not in output


def test_gunicorn_refuses_its_code_reloader(tmp_path):
    """--reload restarted the worker at each edit of a watched file: with STORE=memory every task was forgotten, and
    the new worker still ran the code the arbiter had loaded at its start."""
    for args, env, memory in (
        (["--reload"], {}, True),
        ([], {"GUNICORN_CMD_ARGS": "--reload", "STORE": f"sqlite:///{tmp_path / 'tasks.db'}"}, False),
    ):
        result = start([*GUNICORN, *args], **env)
        assert result.returncode == 2, (args, env)
        output = result.stdout + result.stderr
        assert "configuration error: --reload would restart the worker processes" in output
        assert ("with STORE=memory each restart would forget every task" in output) is memory
        assert "Listening at" not in output and "Traceback" not in output


GUNICORN_VARIABLES = {
    "not-a-number": ("WEB_CONCURRENCY", "abc", "must be an integer from 1 to 256 (or unset)"),
    "a-fraction": ("WEB_CONCURRENCY", "2.5", "must be an integer from 1 to 256 (or unset)"),
    "empty": ("WEB_CONCURRENCY", "", "must be an integer from 1 to 256 (or unset)"),
    "negative": ("WEB_CONCURRENCY", "-3", "must be an integer from 1 to 256 (or unset)"),
    "too-many": ("WEB_CONCURRENCY", "100000", "must be an integer from 1 to 256 (or unset)"),
    "listen-fds": ("LISTEN_FDS", "x", "must be an integer (systemd sets it; or unset)"),
    "listen-pid": ("LISTEN_PID", "1.5", "must be an integer (systemd sets it; or unset)"),
    "forwarded-allow-ips": (
        "FORWARDED_ALLOW_IPS",
        "127.0.0.1,proxy",
        "'proxy' does not appear to be an IPv4 or IPv6 network (it must list IP addresses or networks, or be *)",
    ),
}


@pytest.mark.parametrize(("variable", "value", "reason"), GUNICORN_VARIABLES.values(), ids=GUNICORN_VARIABLES.keys())
def test_a_bad_variable_gunicorn_reads_itself_stops_make_run_in_one_line(variable, value, reason):
    """gunicorn reads WEB_CONCURRENCY and FORWARDED_ALLOW_IPS before gunicorn.conf.py: `abc` ended the start in a
    traceback, a negative count or a bad address in a line that did not name the variable, with exit code 1."""
    result = start(RUN_GUNICORN, **{variable: value})
    assert result.returncode == 2
    assert result.stdout + result.stderr == f"configuration error: {variable}={value!r} is invalid: {reason}\n"


@pytest.mark.parametrize(
    ("variable", "value"), [("WEB_CONCURRENCY", "300"), ("LISTEN_FDS", "x")], ids=["too-many", "listen-fds"]
)
def test_a_bad_variable_gunicorn_reads_after_its_settings_stops_gunicorn_in_one_line(tmp_path, variable, value):
    """Started by hand, gunicorn gets as far as gunicorn.conf.py with these: 300 worker processes were forked on a
    shared store, and LISTEN_FDS=x ended the start in a traceback."""
    result = start(GUNICORN, **{variable: value, "STORE": f"sqlite:///{tmp_path / 'tasks.db'}"})
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output.startswith(f"configuration error: {variable}={value!r} is invalid: ")
    assert len(output.splitlines()) == 1, output


def test_make_run_passes_its_arguments_to_gunicorn_in_the_same_process():
    result = start([*RUN_GUNICORN, "-w", "3"], WEB_CONCURRENCY="1")  # refused by gunicorn.conf.py's on_starting
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "configuration error: 3 worker processes would each keep their own tasks with STORE=memory" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("command", [GUNICORN, RUN_GUNICORN, APP], ids=["gunicorn", "run_gunicorn.py", "python app.py"])
def test_a_start_up_error_is_a_json_line_with_log_format_json(command, tmp_path):
    """With LOG_FORMAT=json every line but the exit-2 ones was JSON: those were plain text, unreadable to a shipper
    that parses each line."""
    for env, message in (
        ({"WORKERS": "abc"}, "configuration error: WORKERS='abc' is invalid: must be an integer from 1 to 256"),
        ({"STORE": f"sqlite://{tmp_path}"}, f"store error: STORE cannot be used: {tmp_path}: "),
    ):
        result = start(command, LOG_FORMAT="json", **env)
        assert result.returncode == 2, result.stderr
        lines = (result.stdout + result.stderr).splitlines()
        assert len(lines) == 1, lines
        line = json.loads(lines[0])
        assert line["message"].startswith(message), line
        assert (line["level"], line["task_id"], line["request_id"]) == ("ERROR", None, None)
        assert set(line) == {"level", "logger", "message", "task_id", "request_id", "timestamp", "pid"}


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_refuses_a_worker_class_that_does_not_drain(worker_class):
    """gunicorn's own workers would stop without draining the pool and serve slow clients on request threads."""
    result = start([*GUNICORN, "-k", worker_class])
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "configuration error: worker class gunicorn.workers.gthread.ThreadWorker does not run this service" in output
    assert "Listening at" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
def test_a_bad_redis_url_option_stops_start_up_in_one_line_without_the_password(command):
    result = start(command, STORE="redis://:hunter2@127.0.0.1:1/0?socket_timeout=abc")
    assert result.returncode == 2
    assert result.stdout + result.stderr == (
        "configuration error: STORE='redis://<credentials not shown>@127.0.0.1:1/0?socket_timeout=abc' is invalid: "
        "is not a Redis URL: invalid value for 'socket_timeout' in connection URL\n"
    )


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
def test_a_missing_tls_file_stops_start_up_in_one_line_naming_it_without_the_password(command):
    # It was a store error at the first connection: "Error 2 connecting to 127.0.0.1:1. No such file or directory."
    result = start(command, STORE="rediss://:hunter2@127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem")
    assert result.returncode == 2
    assert result.stdout + result.stderr == (
        "configuration error: STORE='rediss://<credentials not shown>@127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem' "
        "is invalid: ssl_ca_certs='/nonexistent/ca.pem' cannot be read: No such file or directory\n"
    )


@pytest.fixture
def echo_port():
    """A server that sends back whatever it is sent: not Redis, though redis-py's checks pass once it has a password."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
@pytest.mark.parametrize("where", ["url", "REDIS_PASSWORD"])
def test_a_store_url_to_a_server_that_is_not_redis_stops_start_up_in_one_line(command, echo_port, where):
    # Given a password, it ended in a traceback ("too many values to unpack") and exit code 1.
    password = "pw1234567-hunter2"
    if where == "url":
        result = start(command, STORE=f"redis://:{password}@127.0.0.1:{echo_port}/0")
    else:
        result = start(command, STORE=f"redis://127.0.0.1:{echo_port}/0", REDIS_PASSWORD=password)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output.startswith(
        f"store error: STORE cannot be used: redis: the server at 127.0.0.1:{echo_port} does not answer as a Redis "
        "server ("
    ), output
    assert output.count("\n") == 1 and password not in output


# -- an address that cannot be listened on ------------------------------------------

# 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine. .invalid never resolves (RFC 2606).
UNLISTENABLE = {
    "unresolvable": ("nohost.invalid", "HOST='nohost.invalid' cannot be listened on: the name does not resolve"),
    "not-this-machine": ("192.0.2.1", "HOST='192.0.2.1' cannot be listened on: it is not an address of this machine"),
}


@pytest.mark.parametrize("command", ["gunicorn", "python app.py"])
@pytest.mark.parametrize(("host", "message"), UNLISTENABLE.values(), ids=UNLISTENABLE.keys())
def test_a_host_that_cannot_be_listened_on_stops_start_up_at_once_in_one_line(command, host, message):
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"] if command == "gunicorn" else APP
    result = start(argv, HOST=host, PORT="0")
    assert result.returncode == 2  # gunicorn alone retries for 5 s, then exits 1 after five error lines
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines  # not gunicorn's "Starting gunicorn" line before it
    assert lines[0].startswith(f"configuration error: {message}")


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
def test_a_port_in_use_stops_start_up_at_once_in_one_line(command):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = command[:-2]  # no -b or --port: the address comes from HOST and PORT
        result = start(argv, HOST="127.0.0.1", PORT=str(port))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert f"configuration error: PORT={port} is already in use on 127.0.0.1: another server listens there\n" in output
    assert "Retrying" not in output and "Can't connect" not in output and "Traceback" not in output


@pytest.mark.parametrize("taken_by", ["another server", "not this machine"])
def test_an_address_given_with_b_that_cannot_be_listened_on_is_named_as_given(taken_by):
    # -b overrides HOST and PORT: the line names the address it gave, not variables that hold another one.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}" if taken_by == "another server" else "192.0.2.1:18999"
        result = start([*GUNICORN[:-1], address], HOST="127.0.0.1", PORT="8080")
    assert result.returncode == 2
    reason = "is already in use: another server listens there" if taken_by == "another server" else (
        "cannot be listened on: it is not an address of this machine")  # fmt: skip
    expected = f"configuration error: -b {address} (gunicorn's --bind, which overrides HOST and PORT) {reason}\n"
    assert expected in result.stdout + result.stderr


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def _ipv6_covers_ipv4() -> bool:
    """Whether ``[::]`` also takes IPv4 on this machine (Linux's default, net.ipv6.bindv6only=0)."""
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as setting:
            return socket.has_ipv6 and setting.read().strip() == "0"
    except OSError:
        return False


COLLIDING_BINDS = {
    "the same address twice": ("127.0.0.1", "127.0.0.1"),
    "a name for the same address": ("127.0.0.1", "localhost"),
    "IPv4 then IPv6 wildcards": ("0.0.0.0", "[::]"),
    "a wildcard then one address": ("0.0.0.0", "127.0.0.1"),
    "one address then a wildcard": ("127.0.0.1", "0.0.0.0"),
}


@pytest.mark.parametrize(("first", "second"), COLLIDING_BINDS.values(), ids=COLLIDING_BINDS.keys())
def test_two_b_addresses_that_cannot_both_be_listened_on_stop_start_up_naming_both(first, second):
    # gunicorn listens on the first, then retried the second for 5 s with ten ERROR lines and exited 1.
    if "::" in second and not _ipv6_covers_ipv4():
        pytest.skip("[::] does not take IPv4 on this machine")
    port = _free_port()
    binds = [f"{first}:{port}", f"{second}:{port}"]
    result = start([*RUN_GUNICORN[:-2], "-b", binds[0], "-b", binds[1]], HOST="127.0.0.1", PORT="8080")
    assert result.returncode == 2
    assert (result.stdout + result.stderr).startswith(
        f"configuration error: -b {binds[0]} and -b {binds[1]} (gunicorn's --bind) cannot both be listened on: "
        "the first already holds that port for the second ("
    )
    assert len((result.stdout + result.stderr).splitlines()) == 1


def test_check_listen_together_lets_addresses_that_do_not_collide_through_and_leaves_nothing_bound():
    port = _free_port()
    check_listen_together([("127.0.0.1", port), ("127.0.0.2", port), ("127.0.0.1", port + 1)])
    check_listen_together([("127.0.0.1", 0), ("127.0.0.1", 0)])  # two ports the kernel chooses
    check_listen_together([("127.0.0.1", port), ("127.0.0.1", port)], reuse_port=True)  # gunicorn listens on both
    with pytest.raises(ConfigError, match=f"-b 127.0.0.1:{port} and -b 127.0.0.1:{port} "):
        check_listen_together([("127.0.0.1", port), ("127.0.0.1", port)])
    with pytest.raises(ConfigError, match=r"\(the same address, or one covering the other: 0\.0\.0\.0 covers"):
        check_listen_together([("127.0.0.1", port), ("0.0.0.0", port)])  # the wider one second: still said why
    with socket.create_server(("127.0.0.1", port)):  # nothing the checks made still holds the port
        pass


@pytest.mark.parametrize("taken_by", ["another server", "not this machine"])
def test_an_address_given_with_app_py_flags_that_cannot_be_listened_on_is_named_as_given(taken_by):
    # --host and --port override HOST and PORT: the line names the flag that gave the value, not a variable
    # that holds another one.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        flags = ["--port", str(port)] if taken_by == "another server" else ["--host", "192.0.2.1", "--port", "0"]
        result = start([sys.executable, "app.py", *flags], HOST="127.0.0.1", PORT="1234")
    assert result.returncode == 2
    expected = (
        f"--port {port} is already in use on 127.0.0.1: another server listens there"
        if taken_by == "another server"
        else "--host 192.0.2.1 cannot be listened on: it is not an address of this machine"
    )
    assert result.stdout + result.stderr == f"configuration error: {expected}\n"


def test_check_listen_names_what_is_wrong():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"PORT={port} is already in use"):
            check_listen("127.0.0.1", port)
    with pytest.raises(ConfigError, match="not an address of this machine"):
        check_listen("192.0.2.1", 0)
    check_listen("127.0.0.1", 0)  # a free one: no error, nothing left bound


# -- Python older than 3.11 ---------------------------------------------------------


def test_an_old_python_is_named_at_start_up():
    pretend = "import sys; sys.version_info = (3, 10, 13, 'final', 0); import config"
    result = subprocess.run(
        [sys.executable, "-c", pretend],
        cwd=PROJECT_ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == f"workerpool needs Python 3.11 or newer, not 3.10.13 ({sys.executable})\n"


def test_make_refuses_an_old_python_before_creating_the_venv(tmp_path):
    old_python = tmp_path / "python3.10"  # fails the version check and says what it is, like Python 3.10 would
    old_python.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.10.13"; fi\nexit 1\n')
    old_python.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-s", f"PYTHON={old_python}", f"VENV={venv}", f"{venv}/bin/python"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"workerpool needs Python 3.11 or newer; {old_python} is Python 3.10.13" in result.stderr
    assert not venv.exists()


def test_every_package_make_installs_goes_through_sudo_without_questions():
    """make bench called a bare apt-get: as a user other than root it failed on apt's lock."""
    calls = re.findall(r"(?:\S+ ){0,2}apt-get (?:update|install)", (PROJECT_ROOT / "Makefile").read_text())
    assert len(calls) >= 8, calls
    for call in calls:
        install = "DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install"
        assert call.endswith(install if "install" in call else "$(SUDO) apt-get update"), call


# -- TASK_HANDLER modules in the container image --------------------------------


def test_a_handler_in_the_handlers_package_is_in_the_container_image(tmp_path):
    from test_shutdown import _lay_out_image  # what the Dockerfile's COPY lines put in the image

    workdir = tmp_path / "app"
    workdir.mkdir()
    _lay_out_image(workdir)
    check = "import app, config; app.load_handler(config.Config(task_handler='handlers.example:log_payload'))"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=workdir, env=clean_environment(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
