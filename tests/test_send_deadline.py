"""SendDeadline on real socket pairs: a response that fits is sent at once, a stalled reader times out."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from doubles import FakeClock, wait_until

from service.connection import SendDeadline, StopGrace


class RecordingSocket:
    """A real socket that records the timeouts set on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timeouts: list[float | None] = []

    def settimeout(self, value: float | None) -> None:
        self.timeouts.append(value)
        self.sock.settimeout(value)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield server, client
    server.close()
    client.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(65536)):
        data += chunk
    return data


def test_a_response_that_fits_the_buffer_is_sent_without_touching_the_timeout(pair):
    server, client = pair
    recording = RecordingSocket(server)
    SendDeadline(recording, 5.0).sendall(b"HTTP/1.1 202 Accepted\r\n\r\n{}")
    assert read_exactly(client, 27) == b"HTTP/1.1 202 Accepted\r\n\r\n{}"
    assert recording.timeouts == []
    assert server.gettimeout() is None


def test_a_response_larger_than_the_buffer_reaches_a_reader_whole(pair):
    server, client = pair
    data = bytes(range(256)) * 4096  # 1 MiB
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_exactly(client, len(data))))
    reader.start()
    SendDeadline(server, 10.0).sendall(data)
    reader.join(timeout=30)
    assert received == [data]
    assert server.gettimeout() is None  # blocking again afterwards


def test_a_reader_that_takes_nothing_times_the_send_out(pair):
    server, _ = pair
    with pytest.raises(TimeoutError):
        SendDeadline(server, 0.2).sendall(b"x" * (4 << 20))
    assert server.gettimeout() is None


class SendCounting:
    """A real socket that counts the send calls made on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def send(self, data, *flags) -> int:
        self.sends += 1
        return self.sock.send(data, *flags)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


HEAD = b"HTTP/1.1 202 ACCEPTED\r\nContent-Length: 2\r\n\r\n"


def test_a_held_head_leaves_with_the_first_body_bytes_in_one_send(pair):
    server, client = pair
    counting = SendCounting(server)
    sending = SendDeadline(counting, 5.0, hold_head=True)
    sending.sendall(HEAD)
    assert counting.sends == 0
    sending.sendall(b"{}")
    sending.flush()  # nothing left to send
    assert counting.sends == 1
    assert read_exactly(client, len(HEAD) + 2) == HEAD + b"{}"


def test_an_empty_write_leaves_the_head_held_until_body_bytes(pair):
    server, client = pair
    counting = SendCounting(server)
    sending = SendDeadline(counting, 5.0, hold_head=True)
    sending.sendall(HEAD)
    sending.sendall(b"")  # a streaming app's empty first chunk
    assert (counting.sends, sending.holds_head) == (0, True)
    sending.sendall(b"{}")
    assert (counting.sends, sending.holds_head) == (1, False)
    assert read_exactly(client, len(HEAD) + 2) == HEAD + b"{}"


def test_a_dropped_head_is_never_sent(pair):
    server, _ = pair
    counting = SendCounting(server)
    sending = SendDeadline(counting, 5.0, hold_head=True)
    sending.sendall(HEAD)
    sending.drop_head()
    sending.flush()
    assert (counting.sends, sending.holds_head) == (0, False)


def test_a_held_head_without_a_body_is_sent_by_flush(pair):
    server, client = pair
    sending = SendDeadline(server, 5.0, hold_head=True)
    sending.sendall(b"HTTP/1.1 204 NO CONTENT\r\n\r\n")
    sending.flush()
    assert read_exactly(client, 27) == b"HTTP/1.1 204 NO CONTENT\r\n\r\n"


def test_an_interim_response_is_not_held(pair):
    server, client = pair
    counting = SendCounting(server)
    sending = SendDeadline(counting, 5.0, hold_head=True)
    sending.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
    assert counting.sends == 1
    sending.sendall(HEAD)  # only the first write may be held
    assert counting.sends == 2


def test_a_held_head_goes_first_before_a_large_body(pair):
    server, client = pair
    body = bytes(range(256)) * 1024  # above MAX_JOINED_BYTES: not copied behind the head
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_exactly(client, len(HEAD) + len(body))))
    reader.start()
    sending = SendDeadline(server, 10.0, hold_head=True)
    sending.sendall(HEAD)
    sending.sendall(body)
    reader.join(timeout=30)
    assert received == [HEAD + body]


def read_what_arrived(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


LARGE_HEAD = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"h" * (1 << 20) + b"\r\n\r\n"  # more than the buffers hold


@pytest.mark.parametrize(
    ("head", "size"),
    [
        (b"", 1 << 20),  # no head held
        (HEAD, 60000),  # the held head leaves joined to the data
        (HEAD, 1 << 20),  # the held head leaves first, then the data
        (LARGE_HEAD, 1 << 20),  # the held head does not leave whole: nothing of the data does
    ],
)
def test_a_write_given_up_tells_how_many_of_its_bytes_had_not_left(pair, head, size):
    # A response cut short reports what its client got, not what was handed to the socket.
    server, client = pair
    sending = SendDeadline(server, 0.2, hold_head=bool(head))
    if head:
        sending.sendall(head)
    with pytest.raises(TimeoutError):
        sending.sendall(b"x" * size)
    arrived = read_what_arrived(client)
    if head is LARGE_HEAD:
        assert len(arrived) < len(head) and sending.unsent == size
    else:
        assert arrived[: len(head)] == head and 0 < sending.unsent < size
        assert len(arrived) - len(head) + sending.unsent == size


class WaitWatching:
    """A real socket that tells when a write waits for room: a send or sendfile that may block, or that timed out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.waiting = threading.Event()  # a send that may block was made
        self.timeouts = 0  # waits that found no room

    def send(self, data, *flags) -> int:
        if not flags:  # the first send of a write cannot wait (MSG_DONTWAIT)
            self.waiting.set()
        return self._counted(self.sock.send, data, *flags)

    def sendfile(self, *args) -> int:
        self.waiting.set()
        return self._counted(self.sock.sendfile, *args)

    def _counted(self, call, *args) -> int:
        try:
            return call(*args)
        except TimeoutError:
            self.timeouts += 1
            raise

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def write_in_thread(write) -> tuple[threading.Thread, list[BaseException]]:
    failed: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as exc:  # handed to the test
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failed


@pytest.mark.parametrize(
    ("stop_at", "idle_since", "expected"),
    [(None, 100.0, 160.0), (105.0, 100.0, 107.0), (105.0, 106.0, 108.0), (158.5, 100.0, 160.0)],
    ids=["serving", "wait-before-the-stop", "wait-after-the-stop", "timeout-first"],
)
def test_a_stop_shortens_a_write_wait_to_its_grace(stop_at, idle_since, expected):
    stop = StopGrace(2.0)
    if stop_at is not None:
        stop.begin(stop_at)
        stop.begin(stop_at + 50)  # the first stop counts
    assert stop.give_up_at(idle_since, 60.0) == expected
    assert stop.cuts(idle_since, 60.0) is (expected < idle_since + 60.0)


def test_a_write_waiting_when_the_worker_stops_gives_up_after_the_stop_grace(pair):
    # It waited out the whole write deadline (REQUEST_TIMEOUT_S) after the stop, holding the exit back.
    server, _ = pair
    clock, stop, watching = FakeClock(), StopGrace(2.0), WaitWatching(server)
    sending = SendDeadline(watching, 60.0, stop=stop, clock=clock.monotonic)
    writer, failed = write_in_thread(lambda: sending.sendall(b"x" * (4 << 20)))
    assert watching.waiting.wait(10)
    stop.begin(clock.monotonic())
    clock.advance(2.0)
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert [type(exc) for exc in failed] == [TimeoutError]
    assert sending.cut_by_stop
    assert server.gettimeout() is None


def test_a_write_waits_on_across_stop_checks_while_the_worker_serves(pair):
    server, client = pair
    watching = WaitWatching(server)
    data = bytes(range(256)) * 4096  # 1 MiB
    sending = SendDeadline(watching, 60.0, stop=StopGrace(2.0), clock=FakeClock().monotonic)
    writer, failed = write_in_thread(lambda: sending.sendall(data))
    wait_until(lambda: watching.timeouts >= 2, timeout=10, what="two stop checks")
    assert read_exactly(client, len(data)) == data
    writer.join(timeout=10)
    assert (failed, sending.cut_by_stop) == ([], False)


@pytest.fixture
def file_of_4_mib(tmp_path):
    data = bytes(range(256)) * 16384
    path = tmp_path / "file"
    path.write_bytes(data)
    with path.open("rb") as file:
        yield file, data


def test_sendfile_sends_the_whole_file_to_a_reader_that_pauses(pair, file_of_4_mib):
    server, client = pair
    file, data = file_of_4_mib
    watching = WaitWatching(server)
    sending = SendDeadline(watching, 60.0, stop=StopGrace(2.0), clock=FakeClock().monotonic)
    sent: list[int] = []
    writer, failed = write_in_thread(lambda: sent.append(sending.sendfile(file, 1000, len(data) - 2000)))
    first = read_exactly(client, 100_000)  # some of it, then a pause over a stop check: a wait that times out
    wait_until(lambda: watching.timeouts >= 1, timeout=10, what="a stop check")
    rest = read_exactly(client, len(data) - 2000 - len(first))
    writer.join(timeout=10)
    assert (failed, sent) == ([], [len(data) - 2000])
    assert first + rest == data[1000:-1000]


def test_sendfile_waiting_when_the_worker_stops_gives_up_after_the_stop_grace(pair, file_of_4_mib):
    server, _ = pair
    file, _ = file_of_4_mib
    clock, stop, watching = FakeClock(), StopGrace(2.0), WaitWatching(server)
    sending = SendDeadline(watching, 60.0, stop=stop, clock=clock.monotonic)
    writer, failed = write_in_thread(lambda: sending.sendfile(file))
    wait_until(lambda: watching.timeouts >= 1, timeout=10, what="a stop check")
    stop.begin(clock.monotonic())
    clock.advance(2.0)
    writer.join(timeout=10)
    assert [type(exc) for exc in failed] == [TimeoutError]
    assert sending.cut_by_stop
