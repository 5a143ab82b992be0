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
