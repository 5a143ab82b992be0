"""The tests' private redis-server: it is ours that answers, never another process's on the same port."""

from __future__ import annotations

import signal

import pytest
import redis_server
from redis_server import NotOurServer, RedisServer, running_redis


def test_a_port_another_redis_server_holds_is_never_taken_for_ours(tmp_path, monkeypatch):
    # start() returned once anything answered PING on the port: the tests then changed the other server
    # (CONFIG SET maxmemory, DEBUG SLEEP, CLIENT PAUSE) while their own redis-server had exited.
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with running_redis(tmp_path / "a") as other:
        other.client().set("owner", "other")
        given = RedisServer(tmp_path / "b", port=other.port)  # a port given is kept: refused
        with pytest.raises(NotOurServer):
            given.start()
        assert given.process is None  # ours was stopped
        real_free_port = redis_server.free_port
        picks = iter([other.port])  # the free port picked is taken before redis-server binds it
        monkeypatch.setattr(redis_server, "free_port", lambda: next(picks, None) or real_free_port())
        picked = RedisServer(tmp_path / "c")
        assert picked.port == other.port
        picked.start()
        try:
            assert picked.port != other.port
            assert picked.client().info("server")["process_id"] == picked.process.pid
            assert picked.client().get("owner") is None
        finally:
            picked.stop(signal.SIGKILL)
        assert other.client().get("owner") == b"other"
