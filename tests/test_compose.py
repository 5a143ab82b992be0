"""The compose files describe what the service needs; no Docker engine runs here, so they are read, not run."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from urllib.parse import urlsplit

import yaml
from http_fixtures import PROJECT_ROOT, wait_until
from redis_server import free_port

import config

SINGLE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
REDIS = yaml.safe_load((PROJECT_ROOT / "docker-compose.redis.yml").read_text())
DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()
IMAGE_PORT = int(re.search(r"\bPORT=(\d+)", DOCKERFILE).group(1))


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"expected a duration in whole seconds, got {duration!r}"
    return int(match.group(1))


def test_redis_keeps_an_append_only_file_on_a_named_volume():
    redis = REDIS["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    [volume] = redis["volumes"]
    name, _, target = volume.partition(":")
    assert target == "/data"  # the official image's working directory, where the AOF goes
    assert name in REDIS["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_the_replicas_run_the_same_image_on_the_redis_service():
    service = REDIS["services"]["workerpool"]
    single = SINGLE["services"]["workerpool"]
    assert (service["build"], service["image"]) == (single["build"], single["image"])
    assert service["deploy"]["replicas"] >= 2
    assert "ports" not in service  # replicas cannot share a host port: the load balancer reaches them
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    environment = service["environment"]
    assert set(environment) <= set(config.VARIABLES)
    settings = config.from_env(environment)  # what each replica will parse at start-up
    assert settings.store.kind == "redis"
    url = urlsplit(settings.store.url)
    assert url.hostname in REDIS["services"] and url.port == 6379


def test_the_grace_period_covers_the_drain():
    service = REDIS["services"]["workerpool"]
    settings = config.from_env(service["environment"])
    assert service["stop_signal"] == "SIGTERM"
    # gunicorn's graceful_timeout is SHUTDOWN_TIMEOUT_S + 5 s (gunicorn.conf.py); keep a margin past it.
    assert _seconds(service["stop_grace_period"]) >= settings.shutdown_timeout_s + 5 + 5


def test_the_load_balancer_publishes_the_port_and_proxies_to_the_replicas():
    lb = REDIS["services"]["lb"]
    [published] = lb["ports"]
    listened = published.rpartition(":")[2]
    [mount] = lb["volumes"]
    source, target, _ = mount.split(":")
    assert target == "/etc/nginx/nginx.conf"
    conf = (PROJECT_ROOT / source).read_text()
    assert f"listen {listened};" in conf
    assert f"http://workerpool:{IMAGE_PORT}" in conf  # the replicas' service name and the image's PORT
    bound = re.search(r"client_max_body_size (\d+)m;", conf)
    assert bound, "nginx must bound the bodies it spools to disk"
    limit = int(bound.group(1)) * 1024 * 1024
    service = config.from_env(REDIS["services"]["workerpool"]["environment"])
    assert service.max_batch_body_bytes < limit <= 2 * service.max_batch_body_bytes  # the service's limits first
    assert f"larger than {limit} bytes" in conf


def test_the_load_balancer_does_not_serve_one_random_replicas_metrics():
    """Each replica counts its own: through the round robin successive scrapes read different replicas, and
    Prometheus takes each flip for a counter reset. It answers 404 pointing at a scrape of every replica."""
    [mount] = REDIS["services"]["lb"]["volumes"]
    conf = (PROJECT_ROOT / mount.split(":")[0]).read_text()
    block = re.search(r"location = /metrics \{(.*?)\n        \}", conf, re.S)
    assert block, "nginx must answer /metrics itself"
    refusal = re.search(r"return 404 '(.*)\\n';", block.group(1))
    assert json.loads(refusal.group(1))["detail"].endswith("see docs/redis.md")
    redis_doc = (PROJECT_ROOT / "docs" / "redis.md").read_text()
    assert "dns_sd_configs" in redis_doc and "names: [workerpool]" in redis_doc


def _nginx() -> str:
    """The nginx binary (Debian's, outside a user's PATH), which `make test` installs: a missing one fails the tests
    of deploy/nginx.conf rather than skip them, so that a broken configuration never passes unseen."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "nginx is not installed: `make test` installs it (apt-get install nginx)"
    return found


def test_nginx_refuses_a_body_past_its_bound_with_a_problem_document_before_taking_it(tmp_path):
    # With no bound it spooled a body of any size to its disk, then passed it on for the service to refuse.
    conf = (PROJECT_ROOT / REDIS["services"]["lb"]["volumes"][0].split(":")[0]).read_text()
    port, nowhere = free_port(), free_port()  # nothing listens on the replica's port: a request passed on is a 502
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("http://workerpool:8080", f"http://127.0.0.1:{nowhere}")
    conf = conf.replace("error_log /dev/stderr warn;", f"error_log {tmp_path}/error.log warn;")
    conf = conf.replace("access_log /dev/stdout;", f"access_log {tmp_path}/access.log;")
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        conf = conf.replace("http {", f"http {{\n    {name}_temp_path {tmp_path}/{name};", 1)
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(
        [_nginx(), "-e", f"{tmp_path}/error.log", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
         "-g", f"daemon off; pid {tmp_path}/nginx.pid;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers in its process group: killed with it
    )  # fmt: skip
    try:
        wait_until(lambda: _listening(port), timeout=20, what="nginx to listen")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.putrequest("POST", "/enqueue/batch")
        connection.putheader("Content-Length", str(6 * 1024 * 1024))
        connection.endheaders()  # the head alone: nginx answers from it, before any of the body
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status == 413, body
        assert response.getheader("Content-Type") == "application/problem+json"
        assert json.loads(body) == {
            "type": "about:blank", "title": "Request Entity Too Large", "status": 413,
            "detail": "the request body is larger than 5242880 bytes",
        }  # fmt: skip
        small = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        small.request("POST", "/enqueue", body=b'{"payload": 1}')
        assert small.getresponse().status == 502  # under the bound: passed on, to no replica here
        small.close()
    finally:
        os.killpg(nginx.pid, signal.SIGKILL)
        nginx.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_nginx_accepts_the_load_balancers_configuration(tmp_path):
    conf = PROJECT_ROOT / REDIS["services"]["lb"]["volumes"][0].split(":")[0]
    result = subprocess.run(
        [_nginx(), "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_the_image_runs_as_a_numeric_user_that_owns_a_data_directory():
    """USER workerpool (a name) made Kubernetes' runAsNonRoot refuse the pod, and the user could write nowhere a
    volume for the SQLite store could go: the documented STORE=sqlite:///data/tasks.db stopped every start."""
    uid = re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE).group(1)
    gid = re.search(r"groupadd [^\n]*--gid (\d+)", DOCKERFILE).group(1)
    assert re.search(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE).group(1) == f"{uid}:{gid}"
    assert f"--gid {gid}" in re.search(r"useradd [^\n]*", DOCKERFILE).group()
    assert re.search(rf"mkdir /data && chown {uid}:{gid} /data", DOCKERFILE)
    assert config.from_env({"STORE": "sqlite:///data/tasks.db"}).store.path == "/data/tasks.db"
