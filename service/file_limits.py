"""How many connections a worker process can hold within its open-file limit (gunicorn's ``worker_connections``).

Every connection costs a file descriptor, and running out makes gthread's
``accept()`` fail with EMFILE, on which gunicorn ends the worker: any client
able to open that many idle connections could restart it at will. Besides
the connections, a process holds up to ``MAX_LINGERING`` closing sockets, its
own files (logs, the listener, the poller, imported modules' files), and a
shared store's: SQLite opens the database and its WAL on each thread's
connection, Redis a socket per thread. The soft limit is raised toward the
hard one at the start (the soft limit is often 1024 while the hard one allows
far more); a configuration whose store leaves too few descriptors for
connections even then is refused.
"""

from __future__ import annotations

import resource

from config import Config, ConfigError
from service.lingering_close import MAX_LINGERING

MAX_CONNECTIONS = 1000
MIN_CONNECTIONS = 64  # fewer, and a few slow clients would keep everyone else waiting
RESERVED = 128  # the process's own files, a shared store's aside
# Threads that may hold a store connection besides the task threads and the request threads: the main
# thread, lease renewal, the wait for work, the metrics' and health check's.
OTHER_STORE_THREADS = 8
# Descriptors each store connection holds: SQLite's database file and its WAL (the shared-memory
# index is one per process, in RESERVED), Redis's socket.
_PER_CONNECTION = {"memory": 0, "sqlite": 2, "redis": 1}


def store_descriptors(settings: Config, request_threads: int) -> int:
    """The most descriptors the store may hold in one worker process, with every thread connected."""
    return _PER_CONNECTION.get(settings.store.kind, 1) * (settings.workers + request_threads + OTHER_STORE_THREADS)


def worker_connections(settings: Config, request_threads: int, given: int | None = None) -> int:
    """The connections one worker process holds at most, after raising the soft limit on open files as needed.

    ``given`` is a number of connections asked for (gunicorn's ``--worker-connections``): the soft limit is
    raised for it, and it is taken as is. Raises ConfigError when even the hard limit leaves fewer than
    ``MIN_CONNECTIONS`` (or fewer than ``given``).
    """
    others = MAX_LINGERING + RESERVED + store_descriptors(settings, request_threads)
    wanted = MAX_CONNECTIONS if given is None else given
    soft = _raise_soft_limit(wanted + others)
    connections = min(wanted, soft - others)
    needed = MIN_CONNECTIONS if given is None else given
    if connections < needed:
        lower = "lower WORKERS or --threads" if given is None else "give a lower --worker-connections"
        raise ConfigError(
            f"the open-file limit ({soft}, ulimit -n) leaves room for {max(connections, 0)} connections with "
            f"WORKERS={settings.workers} and {request_threads} request threads on STORE={settings.store.kind} "
            f"(each thread's store connection holds files): raise it to at least {needed + others} "
            f"(LimitNOFILE= in systemd, ulimit -n, --ulimit nofile in docker), or {lower}"
        )
    return connections


def _raise_soft_limit(wanted: int) -> int:
    """The soft limit on open files, raised toward ``wanted`` as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a hard limit above the kernel's nr_open: keep what there is
            return soft
        return target
    return soft if soft != resource.RLIM_INFINITY else max(wanted, MAX_CONNECTIONS)
