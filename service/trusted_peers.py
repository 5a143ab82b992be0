"""gunicorn's check of the peer against ``forwarded_allow_ips``, answered once per address.

For every request gunicorn looks the peer up in ``forwarded_allow_ips``
(whether it may set ``X-Forwarded-*`` and the scheme headers): three settings
read through its ``Config.__getattr__``, the address parsed by ``ipaddress``,
then tested against each network. The answer depends on the address alone
while the worker runs (its settings are fixed once it has started), so it is
kept here for the last addresses seen; a kept-alive connection, or a proxy
in front, pays the lookup once.
"""

from __future__ import annotations

import functools
from typing import Any

from gunicorn.http import message

CACHED_PEERS = 1024  # addresses remembered; a bound, as clients' addresses are not


def install(cfg: Any) -> None:
    """Make gunicorn's requests use the cached answer for the settings of ``cfg`` (one worker's, fixed)."""
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
