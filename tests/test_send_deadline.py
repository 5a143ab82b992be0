"""SendDeadline on real socket pairs: a response that fits is sent at once, a stalled reader times out."""

from __future__ import annotations

import socket
import threading

import pytest

from service.connection import SendDeadline


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
