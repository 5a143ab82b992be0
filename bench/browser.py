"""A real headless Chromium (Debian's package, driven by Playwright) and an app served on a thread for it.

Shared by the dashboard's browser tests and its benchmark figure.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

CHROMIUM = "/usr/bin/chromium"  # Debian's; never a browser Playwright downloads
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def chromium(*, width: int = 1280, height: int = 900) -> Iterator[object]:
    """A browser context with a fresh profile, removed afterwards; fails if Chromium is not installed."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        raise AssertionError(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            context.close()


@dataclass
class ServedApp:
    server: BaseWSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"


@contextmanager
def served(app: Flask) -> Iterator[ServedApp]:
    """``app`` on werkzeug's threaded server at 127.0.0.1 on a free port, stopped and joined afterwards."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="dashboard-test-server", daemon=True)
    thread.start()
    try:
        yield ServedApp(server, thread)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
