"""An example task handler: fetch a URL over HTTP(S) and return what came back.

Run it with ``TASK_HANDLER=handlers.fetch_url:fetch make run`` (or set
``TASK_HANDLER`` in the container's environment), then submit::

    curl -d '{"payload": {"url": "https://example.com/"}}' http://127.0.0.1:8080/enqueue

The payload is the URL, or ``{"url": ..., "timeout_s": ...}``. The result is
``{"url", "status", "content_type", "bytes", "sha256", "text"}``: the final
URL after redirects, the body's size and digest, and its first characters.

How the handler talks to the pool:

- it returns the result (a JSON value, at most ``MAX_RESULT_BYTES`` as JSON);
- it raises ``PermanentFailure`` for what no retry can fix: a bad payload, a
  URL that is not http(s), a 4xx answer (except 408 and 429), a body too large;
- any other exception (a 5xx, 408 or 429 answer, DNS failure, refused
  connection, socket timeout) fails the attempt, and the task is retried with
  backoff while it has retries left;
- it checks its ``cancel`` event between reads, set when the task is cancelled
  (``DELETE /tasks/<id>``), its attempt times out (``ATTEMPT_TIMEOUT_S``) or
  shutdown abandons it, and then stops with ``AttemptCancelled``. The socket
  timeout bounds how long one read can keep it from looking.
"""

from __future__ import annotations

import hashlib
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from workerpool import AttemptCancelled, PermanentFailure, Task

DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
MAX_BODY_BYTES = 10 * 1024 * 1024
PREVIEW_CHARS = 200
_READ_BYTES = 64 * 1024
_RETRYABLE_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests: trying again later may work


def fetch(task: Task, cancel: threading.Event) -> dict[str, Any]:
    """Fetch the URL of ``task.payload``; the result describes the answer."""
    url, timeout = _parse(task.payload)
    if cancel.is_set():
        raise AttemptCancelled("cancelled before the request was sent")
    request = urllib.request.Request(url, headers={"User-Agent": "workerpool-example/1.0"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            size, digest, head = _read_body(response, cancel, url)
            return {
                "url": response.url,
                "status": response.status,
                "content_type": response.headers.get_content_type(),
                "bytes": size,
                "sha256": digest,
                "text": head.decode(response.headers.get_content_charset() or "utf-8", "replace")[:PREVIEW_CHARS],
            }
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection open; the status and reason are all that is needed
        if 400 <= exc.code < 500 and exc.code not in _RETRYABLE_4XX:
            raise PermanentFailure(f"{url} answered {exc.code} {exc.reason}") from None
        raise  # 5xx, 408, 429: retried while retries are left


def _parse(payload: Any) -> tuple[str, float]:
    """The URL and socket timeout a payload asks for; PermanentFailure if it is not a valid request."""
    if isinstance(payload, str):
        payload = {"url": payload}
    if not isinstance(payload, dict) or not isinstance(payload.get("url"), str):
        raise PermanentFailure('the payload must be a URL, or an object {"url": ..., "timeout_s": ...}')
    url = payload["url"]
    # urllib also opens file:// and ftp:// URLs: a task must not read the server's own files.
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentFailure(f"only http and https URLs are fetched, not {url!r}")
    timeout = payload.get("timeout_s", DEFAULT_TIMEOUT_S)
    if type(timeout) not in (int, float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise PermanentFailure(f"timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}")
    return url, float(timeout)


def _read_body(response: Any, cancel: threading.Event, url: str) -> tuple[int, str, bytes]:
    """Read the body in pieces, looking at ``cancel`` between them: (size, SHA-256, first bytes)."""
    digest = hashlib.sha256()
    size, head = 0, b""
    # read1 returns what has arrived (up to the size asked): a slow server cannot hold off the next look.
    while chunk := response.read1(_READ_BYTES):
        if cancel.is_set():
            raise AttemptCancelled(f"cancelled after {size} bytes of {url}")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PermanentFailure(f"{url} sent more than {MAX_BODY_BYTES} bytes")
        digest.update(chunk)
        if len(head) < PREVIEW_CHARS * 4:  # enough bytes for PREVIEW_CHARS characters of UTF-8
            head += chunk[: PREVIEW_CHARS * 4 - len(head)]
    return size, digest.hexdigest(), head
