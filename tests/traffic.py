"""Load for the real-server tests: client threads sending a random mix of good, bad and broken requests.

Every request opens its own connection, so each outcome belongs to one
request: an HTTP status (``"202"``, ``"503 queue-full"``, ...) or what
happened to the connection (``"refused"``, ``"reset"``, ``"closed"`` without
an answer, ``"cut"`` in the middle of one, ``"timeout"``). ``EXPECTED`` lists what the README documents for
each kind of request while the service is up.
"""

from __future__ import annotations

import errno
import http.client
import io
import itertools
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

TIMEOUT_S = 10.0  # per request; far above any answer time when things work
BYTE_PAUSE_S = 0.002  # between the bytes of a slowly sent request head

EXPECTED: dict[str, frozenset[str]] = {
    kind: frozenset(results)
    for kind, results in {
        "enqueue": {"202", "503 queue-full"},
        "duplicate": {"409"},
        "malformed": {"400"},
        "wrong_types": {"400"},
        "oversized": {"413"},
        "unknown_route": {"404"},
        "wrong_method": {"405"},
        "get_task": {"200"},
        "get_missing": {"404"},
        "list_tasks": {"200"},
        "bad_query": {"400"},
        "health": {"200"},
        "metrics": {"200"},
        "slow_head": {"200"},
        "short_body": {"400"},
        "silent": {"closed"},
    }.items()
}
WEIGHTS = {
    "enqueue": 30,
    "duplicate": 6,
    "malformed": 6,
    "wrong_types": 6,
    "oversized": 4,
    "unknown_route": 4,
    "wrong_method": 4,
    "get_task": 6,
    "get_missing": 3,
    "list_tasks": 2,
    "bad_query": 3,
    "health": 3,
    "metrics": 1,
    "slow_head": 2,
    "short_body": 3,
    "silent": 2,
}
# Not one of these is a valid task.
MALFORMED = (
    b"",
    b"{",
    b"not json",
    b'{"id": "m", "payload": ""',
    b"[1, 2]",
    b'"a string"',
    b"null",
    b'{"id": "m", "id": "n", "payload": ""}',
    b'{"id": "m", "payload": NaN}',
    b'{"id": "m", "payload": ""} {}',
    b"\xff\xfe{}",
)
WRONG_TYPES: tuple[Callable[[str], object], ...] = (
    lambda tid: {"id": 5, "payload": ""},
    lambda tid: {"id": tid, "payload": 10**101},  # any JSON value, but no integer of more than 100 digits
    lambda tid: {"id": tid},
    lambda tid: {"id": tid, "payload": "", "max_retries": "3"},
    lambda tid: {"id": tid, "payload": "", "max_retries": True},
    lambda tid: {"id": tid, "payload": "", "max_retries": 2.5},
    lambda tid: {"id": tid, "payload": "", "max_retries": -1},
    lambda tid: {"id": tid, "payload": "", "max_retries": 1_000_000},
    lambda tid: {"id": tid, "payload": "", "max_retry": 2},
    lambda tid: {"id": "", "payload": ""},
    lambda tid: {"id": tid + "/", "payload": ""},
    lambda tid: {"id": None, "payload": ""},  # an id may be left out, but not null
)
UNKNOWN_ROUTES = (("GET", "/nope"), ("POST", "/enqueue/x"), ("GET", "/task/1"), ("DELETE", "/"), ("GET", "/healthz/x"))
WRONG_METHODS = (
    ("GET", "/enqueue"),
    ("PUT", "/enqueue"),
    ("PUT", "/tasks/x"),
    ("POST", "/healthz"),
    ("PATCH", "/tasks"),
    ("POST", "/metrics"),
)
BAD_QUERIES = (
    "/tasks?state=bogus",
    "/tasks?limit=0",
    "/tasks?limit=x",
    "/tasks?limit=1001",
    "/tasks?color=red",
    "/tasks?state=done&state=failed",
)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    result: str
    started: float  # time.time(), comparable with the log's timestamps
    ended: float


def connection_failure(exc: BaseException) -> str:
    """Name what went wrong with a connection."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, http.client.IncompleteRead):  # the server went away in the middle of its answer
        return "cut"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
        # shutdown() on a socket the server has reset already (its listener closed at a stop signal)
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"error {type(exc).__name__}: {exc}"


def describe_response(status: int, headers: http.client.HTTPMessage, body: bytes) -> str:
    """The status, and for a 503 which one: a full queue (with Retry-After: 1), shutdown, or draining health."""
    if status != 503:
        return str(status)
    try:
        document = json.loads(body)
    except ValueError:
        return "503 without a JSON body"
    if document.get("status") == "draining":
        return "503 draining"
    kind = str(document.get("type", "")).rpartition(":")[2]
    if kind == "queue-full" and headers.get("Retry-After") != "1":
        return "503 queue-full without Retry-After: 1"
    return f"503 {kind}"


class Traffic:
    """Client threads sending random requests to 127.0.0.1:``port`` until ``stop()``.

    ``accepted`` holds every id answered 202; ``refused`` ids that were sent
    in a request that must never be accepted; ``unanswered`` the ids of valid
    tasks whose connection ended without an answer (stored or not: unknown).
    """

    def __init__(self, port: int, *, max_body_bytes: int, seed: int, weights: dict[str, int] = WEIGHTS) -> None:
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.seed = seed
        self._kinds = list(weights)
        self._weights = list(weights.values())
        self._ids = itertools.count()
        self._lock = threading.Lock()  # must be held while changing accepted or refused
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.unanswered: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outcomes: list[list[Outcome]] = []

    # -- running ------------------------------------------------------------

    def start(self, clients: int) -> None:
        for n in range(clients):
            outcomes: list[Outcome] = []
            self._outcomes.append(outcomes)
            rng = random.Random(self.seed * 1000 + n)
            thread = threading.Thread(target=self._client, args=(rng, outcomes), name=f"client-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> list[Outcome]:
        """Stop the clients (idempotent); every outcome, in the order the requests were sent."""
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT_S * 3)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck"
        return sorted(itertools.chain.from_iterable(self._outcomes), key=lambda o: o.started)

    def so_far(self) -> list[Outcome]:
        """The outcomes recorded until now, while the clients keep running."""
        return [outcome for outcomes in self._outcomes for outcome in list(outcomes)]

    def _client(self, rng: random.Random, outcomes: list[Outcome]) -> None:
        while not self._stop.is_set():
            kind = rng.choices(self._kinds, self._weights)[0]
            started = time.time()
            kind, result = getattr(self, f"_{kind}")(rng)
            outcomes.append(Outcome(kind, result, started, time.time()))

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{self.seed}-{next(self._ids)}"

    def _known_id(self, rng: random.Random) -> str | None:
        with self._lock:
            return rng.choice(self.accepted) if self.accepted else None

    def _refuse(self, task_id: str) -> None:
        with self._lock:
            self.refused.append(task_id)

    # -- sending ------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, *, chunked: bool = False) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        try:
            if chunked:
                connection.request(method, path, body=iter([body or b""]), encode_chunked=True)
            else:
                connection.request(method, path, body=body)
            response = connection.getresponse()
            return describe_response(response.status, response.headers, response.read())
        except (OSError, http.client.HTTPException) as exc:
            return connection_failure(exc)
        finally:
            connection.close()

    def raw(self, chunks: list[bytes], *, pause: float = 0.0, read: bool = True) -> str:
        """Send ``chunks`` on a plain socket (``pause`` between them), end the stream and read the answer's status.

        Without ``read`` the socket is closed at once and the result is "closed".
        """
        wait = threading.Event()  # never set: wait() paces the sending
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT_S) as sock:
                for chunk in chunks:
                    sock.sendall(chunk)
                    if pause:
                        wait.wait(pause)
                if not read:
                    return "closed"
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while len(answer) < 65536 and (data := sock.recv(65536)):
                    answer += data
        except OSError as exc:
            return connection_failure(exc)
        if not answer:
            return "closed"
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line, _, header_lines = head.partition(b"\r\n")
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            return f"error: bad status line {status_line[:40]!r}"
        return describe_response(int(parts[1]), http.client.parse_headers(io.BytesIO(header_lines + b"\r\n")), body)

    def _enqueue(self, rng: random.Random) -> tuple[str, str]:
        task_id = self._new_id("t")
        body = json.dumps({"id": task_id, "payload": "p", "max_retries": rng.randint(0, 3)}).encode()
        result = self.request("POST", "/enqueue", body)
        if result == "202":
            with self._lock:
                self.accepted.append(task_id)
        elif not result[0].isdigit():
            with self._lock:
                self.unanswered.append(task_id)
        return "enqueue", result

    def _duplicate(self, rng: random.Random) -> tuple[str, str]:
        task_id = self._known_id(rng)
        if task_id is None:
            return self._enqueue(rng)
        body = json.dumps({"id": task_id, "payload": "again"}).encode()
        return "duplicate", self.request("POST", "/enqueue", body)

    def _malformed(self, rng: random.Random) -> tuple[str, str]:
        return "malformed", self.request("POST", "/enqueue", rng.choice(MALFORMED))

    def _wrong_types(self, rng: random.Random) -> tuple[str, str]:
        task_id = self._new_id("w")
        self._refuse(task_id)
        body = json.dumps(rng.choice(WRONG_TYPES)(task_id)).encode()
        return "wrong_types", self.request("POST", "/enqueue", body)

    def _oversized(self, rng: random.Random) -> tuple[str, str]:
        task_id = self._new_id("o")
        self._refuse(task_id)
        size = rng.choice((self.max_body_bytes, self.max_body_bytes * 4, 100_000))
        body = json.dumps({"id": task_id, "payload": "x" * size}).encode()
        return "oversized", self.request("POST", "/enqueue", body, chunked=rng.random() < 0.5)

    def _unknown_route(self, rng: random.Random) -> tuple[str, str]:
        return "unknown_route", self.request(*rng.choice(UNKNOWN_ROUTES))

    def _wrong_method(self, rng: random.Random) -> tuple[str, str]:
        return "wrong_method", self.request(*rng.choice(WRONG_METHODS))

    def _get_task(self, rng: random.Random) -> tuple[str, str]:
        task_id = self._known_id(rng)
        if task_id is None:
            return self._health(rng)
        return "get_task", self.request("GET", f"/tasks/{task_id}")

    def _get_missing(self, rng: random.Random) -> tuple[str, str]:
        return "get_missing", self.request("GET", f"/tasks/{self._new_id('never')}")

    def _list_tasks(self, rng: random.Random) -> tuple[str, str]:
        return "list_tasks", self.request("GET", rng.choice(("/tasks?limit=20", "/tasks?state=done&limit=5")))

    def _bad_query(self, rng: random.Random) -> tuple[str, str]:
        return "bad_query", self.request("GET", rng.choice(BAD_QUERIES))

    def _health(self, rng: random.Random) -> tuple[str, str]:
        return "health", self.request("GET", rng.choice(("/healthz", "/health")))

    def _metrics(self, rng: random.Random) -> tuple[str, str]:
        return "metrics", self.request("GET", "/metrics")

    def _slow_head(self, rng: random.Random) -> tuple[str, str]:
        """A complete request whose head arrives one byte at a time."""
        head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nConnection: close\r\n\r\n".encode()
        return "slow_head", self.raw([head[i : i + 1] for i in range(len(head))], pause=BYTE_PAUSE_S)

    def _short_body(self, rng: random.Random) -> tuple[str, str]:
        """A valid task, but fewer bytes than the Content-Length promised, then the end of the stream."""
        task_id = self._new_id("s")
        self._refuse(task_id)
        body = json.dumps({"id": task_id, "payload": ""}).encode()
        head = f"POST /enqueue HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body) + 16}\r\n\r\n".encode()
        return "short_body", self.raw([head, body])

    def _silent(self, rng: random.Random) -> tuple[str, str]:
        """Connect, send nothing, close."""
        return "silent", self.raw([], read=rng.random() < 0.5)


def tally(outcomes: list[Outcome]) -> dict[str, Counter[str]]:
    """Results by kind of request."""
    table: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        table.setdefault(outcome.kind, Counter())[outcome.result] += 1
    return table


def unexpected(outcomes: list[Outcome], expected: dict[str, frozenset[str]] = EXPECTED) -> dict[str, Counter[str]]:
    """Results not in ``expected`` for their kind, by kind."""
    return {
        kind: Counter({result: n for result, n in results.items() if result not in expected[kind]})
        for kind, results in tally(outcomes).items()
        if set(results) - expected[kind]
    }
