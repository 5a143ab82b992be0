"""The compose files describe what the service needs; no Docker engine runs here, so they are read, not run."""

from __future__ import annotations

import re
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml
from http_fixtures import PROJECT_ROOT

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
    assert "client_max_body_size 0;" in conf  # the service's own 413 problem documents, not nginx's


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_load_balancers_configuration(tmp_path):
    conf = PROJECT_ROOT / REDIS["services"]["lb"]["volumes"][0].split(":")[0]
    result = subprocess.run(
        ["nginx", "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
