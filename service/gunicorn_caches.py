"""Answers gunicorn works out again for every request, kept once they are known.

- Whether the peer is in ``forwarded_allow_ips`` (whether it may set
  ``X-Forwarded-*`` and the scheme headers): three settings read through
  gunicorn's ``Config.__getattr__``, the address parsed by ``ipaddress``, then
  tested against each network. The answer depends on the address alone while
  the worker runs (its settings are fixed once it has started), so it is kept
  for the last addresses seen: a kept-alive connection, or a proxy in front,
  pays the lookup once.
- The ``Date`` header: ``email.utils.formatdate`` of the current time, a few
  microseconds on every response, for a text that changes once a second.
- Every setting: gunicorn's ``Config`` answers ``cfg.name`` through
  ``__getattr__`` (a miss, then a dict lookup and a ``Setting.get()`` call);
  its parser and response read about twenty settings per request that way.
  Their values are copied into the worker's ``Config`` instance, where an
  attribute read finds them at once; ``cfg.set`` keeps the copy current.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from gunicorn import util
from gunicorn.http import message

CACHED_PEERS = 1024  # addresses remembered; a bound, as clients' addresses are not


def install(cfg: Any) -> None:
    """Make gunicorn use the caches, for the settings of ``cfg`` (one worker's, fixed while it runs)."""
    install_trusted_peers(cfg)
    util.http_date = cached_http_date(util.http_date)
    copy_settings(cfg)


def copy_settings(cfg: Any) -> None:
    """Copy each setting's value into ``cfg``'s instance dict, where ``cfg.name`` finds it without
    ``Config.__getattr__``; the class's properties (``is_ssl``, ``address``, ...) still take precedence."""
    settings = cfg.settings
    if not isinstance(settings, dict) or "set" in vars(cfg):  # another gunicorn, or copied already
        return
    for name, setting in settings.items():
        if not hasattr(type(cfg), name):
            vars(cfg)[name] = setting.get()
    set_setting = cfg.set

    def set_and_copy(name: str, value: Any) -> None:
        set_setting(name, value)
        if name in settings and not hasattr(type(cfg), name):
            vars(cfg)[name] = settings[name].get()

    vars(cfg)["set"] = set_and_copy


def install_trusted_peers(cfg: Any) -> None:
    if not hasattr(message.HeaderPolicy, "_peer_is_trusted_proxy"):  # another gunicorn: keep its own check
        return
    allow_list, networks = list(cfg.forwarded_allow_ips), cfg.forwarded_allow_networks()

    @functools.lru_cache(maxsize=CACHED_PEERS)
    def trusted(address: str) -> bool:
        return message._ip_in_allow_list(address, allow_list, networks)

    def peer_is_trusted_proxy(self: message.HeaderPolicy) -> bool:
        """Whether the peer may set forwarding and scheme headers (gunicorn's own rule)."""
        return not isinstance(self.peer_addr, tuple) or trusted(self.peer_addr[0])

    message.HeaderPolicy._peer_is_trusted_proxy = peer_is_trusted_proxy


def cached_http_date(http_date: Callable[..., str], clock: Callable[[], float] = time.time) -> Callable[..., str]:
    """``http_date`` (gunicorn's), formatting the current time once per second of ``clock``."""
    if getattr(http_date, "cached", False):  # installed already
        return http_date
    last: tuple[int, str] = (-1, "")

    def cached(timestamp: float | None = None) -> str:
        nonlocal last
        if timestamp is not None:
            return http_date(timestamp)
        now = clock()
        second, text = last
        if second != int(now):  # two threads at a new second both format it: the same text
            second, text = int(now), http_date(now)
            last = (second, text)
        return text

    cached.cached = True  # type: ignore[attr-defined]
    return cached
