"""The gunicorn worker's request threads are all started with its pool, not one per busy moment."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from service.gunicorn_worker import start_every_thread


def test_every_request_thread_is_started_with_the_pool():
    before = set(threading.enumerate())
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        start_every_thread(pool, 8)
        assert len(set(threading.enumerate()) - before) == 8

        pool.submit(lambda: None).result(timeout=10)  # an idle thread serves it: no ninth
        assert len(set(threading.enumerate()) - before) == 8
    finally:
        pool.shutdown(wait=True)
