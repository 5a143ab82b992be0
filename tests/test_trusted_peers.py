"""The cached forwarded_allow_ips check answers as gunicorn's own does, for each setting and peer."""

from __future__ import annotations

import pytest
from gunicorn.config import Config as GunicornConfig
from gunicorn.http import message

from service import trusted_peers

PEERS = [
    ("127.0.0.1", 1), ("10.1.2.3", 2), ("192.168.0.9", 3), ("::1", 4), ("fe80::1", 5), ("not an ip", 6), "/run/g.sock"
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

    trusted_peers.install(cfg)
    assert [Peer(cfg, peer)._peer_is_trusted_proxy() for peer in PEERS * 2] == expected * 2  # cached or not
    trusted, ignored = Peer(cfg, ("10.1.2.3", 2))._peer_trusted_for_forwarded(), ({}, [])
    assert (trusted == ignored) is (not expected[1])
