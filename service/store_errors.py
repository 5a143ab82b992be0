"""What /healthz may say of a store that cannot be used: the reason, without where the store is.

/healthz is open to anyone who reaches the service (probes need no token),
and a store's reason names its place: the SQLite file's path ("/srv/x/tasks.db:
the task file was removed..."), the Redis server's address ("Error 111
connecting to 10.0.3.7:6379"), or another node of its Redis Cluster. Those are
replaced by what they stand for; the log keeps them whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from config import StoreSetting

# A Redis Cluster node the store's reason names besides STORE's: the one its slot moved to (see redis_store).
_CLUSTER_NODE = re.compile(r"the cluster node \S+?(?=[,:;]\s)")


def public_reason(reason: str, store: StoreSetting) -> str:
    """``reason`` with the store's path or address replaced by what it is."""
    for place, name in _places(store):
        # "/srv/tasks.db: the task file was removed" says it once: not "the task file: the task file ...".
        reason = reason.replace(f"{place}: {name}", name).replace(place, name)
    return _CLUSTER_NODE.sub("another cluster node", reason)


def _places(store: StoreSetting) -> list[tuple[str, str]]:
    """The texts that say where ``store`` is, longest first (a directory is part of its file's path)."""
    places: dict[str, str] = {}
    if store.kind == "sqlite" and store.path:
        for path in (store.path, str(Path(store.path))):
            places[path] = "the task file"
            places[os.path.dirname(path)] = "the task file's directory"
    elif store.kind == "redis" and store.url:
        url = urlsplit(store.url)  # redis:// or rediss://, as config.py takes them
        if url.hostname:
            places[f"{url.hostname}:{url.port or 6379}"] = "the Redis server"
            # Quoted alone by a TLS name check ("certificate is not valid for '10.0.3.7'"); a bare name is left,
            # which may be a word of the reason ("redis: ..." for a host named redis).
            for quote in "'\"":
                places[f"{quote}{url.hostname}{quote}"] = "the Redis server's host"
    return sorted(((p, n) for p, n in places.items() if p and p != "/"), key=lambda pair: -len(pair[0]))
