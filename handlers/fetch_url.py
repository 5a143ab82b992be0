"""An example task handler: fetch a URL over HTTP(S) and return what came back.

Run it with ``TASK_HANDLER=handlers.fetch_url:fetch make run`` (or set
``TASK_HANDLER`` in the container's environment), then submit::

    curl -d '{"payload": {"url": "https://example.com/"}}' http://127.0.0.1:8080/enqueue

The payload is the URL, or ``{"url": ..., "timeout_s": ...}``. The result is
``{"url", "status", "content_type", "bytes", "sha256", "text"}``: the final
URL after redirects, the body's size and digest, and its first characters.

Whoever can submit a task chooses the URL and reads the answer back from the
task, so ``fetch`` connects only to public addresses: a host that resolves to
a loopback, private, link-local (169.254.169.254, the cloud metadata
service), shared, multicast or reserved address fails the task for good (an
IPv4 one inside an IPv6 address too; the local-use NAT64 prefix and site-local
fec0::/10 whole), at
every redirect too, and redirects go to http and https only. Its error names the
host only: what a name resolves to is logged, not handed to whoever submitted it. The address is
checked as the connection is made, to the address connected to (a name that
resolves to another address later gains nothing), and proxies (``http_proxy``
and the like) are not used, since through one the handler would not know the
address. A handler for internal addresses is ``fetcher(allow_address=...)``,
deployed with ``API_TOKEN`` set: without it anyone who reaches the service
reads what the service can reach.

How the handler talks to the pool:

- it returns the result (a JSON value, at most ``MAX_RESULT_BYTES`` as JSON);
- it raises ``PermanentFailure`` for what no retry can fix: a bad payload, a
  URL that is not http(s) or holds a space, a control character, a user name
  or a password, a redirect it does not follow (to another scheme, a loop), a
  4xx answer (except 408 and 429), a body too large;
- any other exception (a 5xx, 408 or 429 answer, DNS failure, refused
  connection, socket timeout) fails the attempt, and the task is retried with
  backoff while it has retries left;
- it stops with ``AttemptCancelled`` when its ``cancel`` event is set (the
  task is cancelled with ``DELETE /tasks/<id>``, its attempt times out,
  ``ATTEMPT_TIMEOUT_S``, or shutdown abandons it), within ``WATCH_POLL_S``:
  a watcher shuts the connection down, whatever the handler waits for (the
  name's resolution, the status line, the headers, the TLS handshake, a
  piece of the body);
- ``timeout_s`` bounds each wait for the server (the socket timeout) and the
  whole fetch: name resolution, redirects, the answer's status line, headers
  and body: a server that sends them a byte at a time, each within the
  socket timeout, would otherwise hold the worker thread for hours (until
  ``ATTEMPT_TIMEOUT_S``, at every retry), and a slow DNS server as long as
  the system's resolver retries. Past it the attempt fails
  (``TimeoutError``) and is retried.

Names are resolved (``getaddrinfo``, which nothing can interrupt) in a thread
of their own, which the fetch waits for only until it is cancelled or
late; a resolution given up on ends in its thread when the system's
resolver gives up (``resolv.conf``'s ``timeout`` and ``attempts``). At most
``MAX_RESOLVING`` names are resolved at once in a process, those given up on
included: a fetch past them waits for one to end, within its ``timeout_s``,
so that names whose DNS server never answers cannot pile up threads without
end (each attempt leaving one behind).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import ipaddress
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workerpool import AttemptCancelled, PermanentFailure, Task

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
MAX_BODY_BYTES = 10 * 1024 * 1024
PREVIEW_CHARS = 200
_READ_BYTES = 64 * 1024
# How often the watcher of a fetch looks at its cancel event and at the deadline of the answer's head.
WATCH_POLL_S = 0.05
MAX_RESOLVING = 32  # names resolved at once in this process (see _resolve)
_RETRYABLE_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests: trying again later may work
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses reached through a NAT64 gateway
# Never judged public, though Python's is_global says they are: the rest of ::/8 (IPv4-compatible
# ::a.b.c.d, SIIT's IPv4-translated ::ffff:0:a.b.c.d), the local-use NAT64 prefix, whose operator chooses
# where the IPv4 address sits (RFC 8215: a NAT64 reaching the private network), and the deprecated
# site-local fec0::/10, which some networks still route inside.
_NOT_PUBLIC_V6 = tuple(ipaddress.ip_network(net) for net in ("::/8", "64:ff9b:1::/48", "fec0::/10"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Handler = Callable[[Task, threading.Event], dict[str, Any]]
# socket.getaddrinfo's signature: (host, port, family, type) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[[str, int, int, int], list[tuple[Any, ...]]]


def is_public(address: Address) -> bool:
    """Whether ``address`` is a unicast address of the public internet (an IPv4 one inside IPv6 judged as itself)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.teredo is not None:
            return False  # a tunnel to an address of its own choosing
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if any(address in network for network in _NOT_PUBLIC_V6):
            return False
    return address.is_global and not address.is_multicast


def fetcher(*, allow_address: Callable[[Address], bool] = is_public, resolve: Resolver = socket.getaddrinfo) -> Handler:
    """A handler like ``fetch`` that connects to the addresses ``allow_address`` accepts (``fetch``: public ones),
    finding a host's addresses with ``resolve``."""
    return functools.partial(_fetch, allow_address=allow_address, resolve=resolve)


def _fetch(
    task: Task,
    cancel: threading.Event,
    *,
    allow_address: Callable[[Address], bool],
    resolve: Resolver = socket.getaddrinfo,
) -> dict[str, Any]:
    url, timeout = _parse(task.payload)
    if cancel.is_set():
        raise AttemptCancelled("cancelled before the request was sent")
    request = urllib.request.Request(url, headers={"User-Agent": "workerpool-example/1.0"})
    watch = _Watch(cancel, deadline=time.monotonic() + timeout)
    connecting = _Connecting(allow_address, functools.partial(_resolve, resolve, watch=watch), watch.add)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),  # the environment's proxies: through one, the address is not known here
        _CheckedHTTPHandler(connecting),
        _CheckedHTTPSHandler(connecting),
        _HTTPRedirectHandler(),
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            watch.head_received()
            size, digest, head = _read_body(response, cancel, url)
            watch.check(url, timeout)  # a body without a length ends as the watcher shuts the connection down
            return {
                "url": response.url,
                "status": response.status,
                "content_type": response.headers.get_content_type(),
                "bytes": size,
                "sha256": digest,
                "text": _preview(head, response.headers.get_content_charset()),
            }
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection open; the status and reason are all that is needed
        if 300 <= exc.code < 500 and exc.code not in _RETRYABLE_4XX:
            # A 3xx here is a redirect urllib would not follow (to file: or data:, a loop, no Location).
            raise PermanentFailure(f"{url} answered {exc.code} {' '.join(str(exc.reason).split())}") from None
        raise  # 5xx, 408, 429: retried while retries are left
    except Exception:  # what reading a connection the watcher shut down raised, or not
        watch.check(url, timeout)
        raise
    finally:
        watch.close()


def fetch(task: Task, cancel: threading.Event) -> dict[str, Any]:
    """Fetch the URL of ``task.payload`` from a public address; the result describes the answer."""
    return _fetch(task, cancel, allow_address=is_public)


_CANCELLED, _HEAD_LATE, _BODY_LATE = "cancelled", "head late", "body late"


class _Watch:
    """Shuts the connections of one fetch down once its ``cancel`` is set, or once its deadline has passed.

    A read blocked on a connection (the TLS handshake, the status line, a
    header, a piece of the body) then ends at once, and the fetch tells why
    from ``stopped``; so does a wait for a name's resolution (see
    ``wake_when_stopped``). It shuts down a duplicate of each connection's
    socket, which it owns: shutting down acts on the connection, and the
    duplicate's descriptor cannot be closed and reused for another file
    meanwhile.
    """

    def __init__(self, cancel: threading.Event, *, deadline: float) -> None:
        self._cancel = cancel
        self._deadline = deadline  # of the whole fetch, the body included
        self._head_in = False  # the status line and headers have arrived (for the error's words)
        self._lock = threading.Lock()  # guards _sockets, _waits and stopped
        self._sockets: list[socket.socket] = []
        self._waits: list[threading.Event] = []
        self.stopped: str | None = None  # why the connections were shut down
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-url-watch", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        """Watch a connection just made (the first, or a redirect's)."""
        duplicate = sock.dup()
        with self._lock:
            if self.stopped is None:
                self._sockets.append(duplicate)
                return
        _shut_down(duplicate)  # stopped already: this connection must not wait either
        duplicate.close()

    def wake_when_stopped(self, wait: threading.Event) -> None:
        """Set ``wait`` once the fetch is stopped (at once if it is already)."""
        with self._lock:
            if self.stopped is None:
                self._waits.append(wait)
                return
        wait.set()

    def head_received(self) -> None:
        self._head_in = True

    def check(self, url: str, timeout: float) -> None:
        """Raise why the connections were shut down, if they were."""
        if self.stopped == _CANCELLED:
            raise AttemptCancelled(f"cancelled while fetching {url}")
        if self.stopped == _HEAD_LATE:
            raise TimeoutError(f"{url} did not send the status line and headers of its answer within {timeout:g} s")
        if self.stopped == _BODY_LATE:
            raise TimeoutError(f"{url} did not send the whole body of its answer within {timeout:g} s")

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        for duplicate in self._sockets:
            duplicate.close()

    def _run(self) -> None:
        while not self._closed.wait(WATCH_POLL_S):
            if self._cancel.is_set():
                why = _CANCELLED
            elif time.monotonic() >= self._deadline:
                why = _BODY_LATE if self._head_in else _HEAD_LATE
            else:
                continue
            with self._lock:
                self.stopped = why
                sockets, waits = list(self._sockets), list(self._waits)
            for duplicate in sockets:
                _shut_down(duplicate)
            for wait in waits:
                wait.set()
            return


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed by the server already
        sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True, slots=True)
class _Connecting:
    """How a fetch connects: to the addresses ``allow_address`` accepts, found by ``resolve(host, port)``,
    each connection handed to ``connected`` before anything is sent or read on it."""

    allow_address: Callable[[Address], bool]
    resolve: Callable[[str, int], list[tuple[Any, ...]]]
    connected: Callable[[socket.socket], None]


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connecting: _Connecting) -> None:
        super().__init__()
        self._connecting = connecting

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_checked(http.client.HTTPConnection, self._connecting), req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connecting: _Connecting) -> None:
        super().__init__()
        self._connecting = connecting

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_checked(http.client.HTTPSConnection, self._connecting), req, context=self._context)


class _HTTPRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only (urllib's own follows them to ftp too)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        scheme = urllib.parse.urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            fp.close()
            raise PermanentFailure(f"{req.full_url} redirected to {newurl!r}: only http and https URLs are fetched")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _checked(
    connection_class: type[http.client.HTTPConnection], connecting: _Connecting
) -> Callable[..., http.client.HTTPConnection]:
    """``connection_class``, connecting as ``connecting`` says (TLS still checks the name)."""

    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        connection = connection_class(host, **kwargs)
        connection._create_connection = functools.partial(_connect, connecting=connecting)  # type: ignore[attr-defined]
        return connection

    return make


def _resolve(resolve: Resolver, host: str, port: int, *, watch: _Watch) -> list[tuple[Any, ...]]:
    """``resolve(host, port, 0, SOCK_STREAM)`` in a thread of its own, waited for until ``watch`` stops the fetch.

    ``getaddrinfo`` cannot be interrupted: a slow DNS server would hold the
    worker thread past the attempt's cancel and ``timeout_s``. A resolution
    given up on ends in its thread, holding nothing of the fetch's but its
    place among the ``MAX_RESOLVING``.
    """
    places = _resolving
    while not places.acquire(timeout=WATCH_POLL_S):
        if watch.stopped is not None:  # the fetch tells why (see _Watch.check)
            raise OSError(f"resolving {host} was given up: {MAX_RESOLVING} names were being resolved already")
    done = threading.Event()
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(resolve(host, port, 0, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the fetch, which raises it
            outcome.append(exc)
        finally:
            places.release()
            done.set()

    try:
        threading.Thread(target=run, name="fetch-url-resolve", daemon=True).start()
    except BaseException:
        places.release()
        raise
    watch.wake_when_stopped(done)
    done.wait()
    if not outcome:  # the fetch was stopped first: it tells why (see _Watch.check)
        raise OSError(f"resolving {host} was given up: the fetch was stopped")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


# Each taken until its resolution ends, in the fetch or after the fetch gave up on it.
_resolving = threading.BoundedSemaphore(MAX_RESOLVING)


def _connect(
    address: tuple[str, int],
    timeout: float | object = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: tuple[str, int] | None = None,
    *,
    connecting: _Connecting,
) -> socket.socket:
    """``socket.create_connection``, trying only the addresses of ``address``'s host that ``connecting`` allows.

    PermanentFailure if none is: the host is no place to send a task's request to.
    """
    host, port = address
    found = connecting.resolve(host, port)
    allowed = [info for info in found if connecting.allow_address(ipaddress.ip_address(info[4][0]))]
    if not allowed:
        addresses = ", ".join(sorted({info[4][0] for info in found}))
        if addresses != host:
            # For the operator only: in the task's error, whoever submits tasks would read what internal
            # names resolve to, the service their resolver of the private network.
            log.warning("%s resolves to %s, not a public address: no request is sent there", host, addresses)
        raise PermanentFailure(f"{host} is not a public address: no request is sent there")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in allowed:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)  # type: ignore[arg-type]
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
            connecting.connected(sock)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


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
    if any(char <= " " or char == "\x7f" for char in url):
        raise PermanentFailure(f"the URL {url!r} holds a space or control character: encode it (%20...)")
    if parts.username is not None or parts.password is not None:
        raise PermanentFailure("the URL holds a user name or password: they are not sent, and would not be kept secret")
    timeout = payload.get("timeout_s", DEFAULT_TIMEOUT_S)
    if type(timeout) not in (int, float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise PermanentFailure(f"timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}")
    return url, float(timeout)


def _preview(head: bytes, charset: str | None) -> str:
    """The first characters of a body, decoded as its ``charset`` says when Python reads that as text, else as
    UTF-8: the server names the codec, and a name Python does not know (or ``base64``) raised, while
    ``unicode_escape`` turned ``\\ud800`` in the body into a lone surrogate no JSON client can read."""
    if charset:
        try:
            text = head.decode(charset, "replace")
        except (LookupError, ValueError):  # not a codec, not one of text, or one without "replace" (idna)
            pass
        else:
            if _LONE_SURROGATE.search(text) is None:
                return text[:PREVIEW_CHARS]
    return head.decode("utf-8", "replace")[:PREVIEW_CHARS]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
