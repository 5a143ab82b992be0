"""gunicorn's forwarded_allow_ips check and Date header, cached: the same answers as gunicorn's own."""

from __future__ import annotations

import pytest
from doubles import FakeClock
from gunicorn import util
from gunicorn.config import Config as GunicornConfig
from gunicorn.http import message

from service import gunicorn_caches

PEERS = [
    ("127.0.0.1", 1),
    ("10.1.2.3", 2),
    ("192.168.0.9", 3),
    ("::1", 4),
    ("fe80::1", 5),
    ("not an ip", 6),
    "/run/g.sock",
]


class Peer(message.HeaderPolicy):
    def __init__(self, cfg: GunicornConfig, peer_addr: object) -> None:
        self.cfg = cfg
        self.peer_addr = peer_addr


@pytest.mark.parametrize("allowed", ["127.0.0.1,::1", "*", "10.0.0.0/8,fe80::/10", "192.168.0.9"])
def test_the_cached_check_answers_as_gunicorn_does(monkeypatch, allowed):
    original = message.HeaderPolicy._peer_is_trusted_proxy
    monkeypatch.setattr(message.HeaderPolicy, "_peer_is_trusted_proxy", original)  # restored afterwards
    cfg = GunicornConfig()
    cfg.set("forwarded_allow_ips", allowed)
    expected = [original(Peer(cfg, peer)) for peer in PEERS]
    assert any(expected) and (allowed == "*" or not all(expected))

    gunicorn_caches.install_trusted_peers(cfg)
    assert [Peer(cfg, peer)._peer_is_trusted_proxy() for peer in PEERS * 2] == expected * 2  # cached or not
    trusted, ignored = Peer(cfg, ("10.1.2.3", 2))._peer_trusted_for_forwarded(), ({}, [])
    assert (trusted == ignored) is (not expected[1])


def test_the_date_header_is_formatted_once_a_second_and_reads_as_gunicorns():
    clock = FakeClock(epoch=1_764_000_000.25)
    calls: list[float] = []

    def http_date(timestamp: float | None = None) -> str:
        calls.append(timestamp)
        return util.http_date(timestamp)

    cached = gunicorn_caches.cached_http_date(http_date, clock.time)
    assert cached() == util.http_date(1_764_000_000.25) == "Mon, 24 Nov 2025 16:00:00 GMT"
    clock.advance(0.7)
    assert cached() == "Mon, 24 Nov 2025 16:00:00 GMT"
    assert len(calls) == 1
    clock.advance(0.1)  # 16:00:01.05
    assert cached() == "Mon, 24 Nov 2025 16:00:01 GMT"
    assert cached(0.0) == "Thu, 01 Jan 1970 00:00:00 GMT"  # an explicit time is formatted as asked
    assert len(calls) == 3
    assert gunicorn_caches.cached_http_date(cached) is cached  # installing twice wraps once


def test_copied_settings_read_as_gunicorns_and_follow_a_later_set():
    cfg, reference = GunicornConfig(), GunicornConfig()
    for c in (cfg, reference):
        c.set("keepalive", 7)
        c.set("certfile", "")
    gunicorn_caches.copy_settings(cfg)
    gunicorn_caches.copy_settings(cfg)  # a second time changes nothing
    for name in reference.settings:
        assert getattr(cfg, name) == getattr(reference, name), name
    assert "keepalive" in vars(cfg) and "is_ssl" not in vars(cfg)  # properties stay the class's
    cfg.set("keepalive", 9)
    cfg.set("certfile", "/etc/cert.pem")
    assert (cfg.keepalive, cfg.certfile, bool(cfg.is_ssl)) == (9, "/etc/cert.pem", True)
