"""LingeringCloser on real socket pairs and a real selector, with a fake clock."""

from __future__ import annotations

import selectors
import socket

import pytest
from doubles import FakeClock

from service.lingering_close import LingeringCloser


@pytest.fixture
def setup():
    clock = FakeClock()
    selector = selectors.DefaultSelector()
    closer = LingeringCloser(selector, linger_s=2.0, max_lingering=3, clock=clock.monotonic)
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def pair() -> tuple[socket.socket, socket.socket]:
        pairs.append(socket.socketpair())
        return pairs[-1]

    def turn() -> None:
        for key, _ in selector.select(0.05):
            key.data(key.fileobj)

    yield clock, closer, pair, turn
    for server, client in pairs:
        server.close()
        client.close()
    selector.close()


def closed(sock: socket.socket) -> bool:
    return sock.fileno() == -1


def test_the_client_sees_the_end_at_once_and_the_socket_waits_for_its_close(setup):
    clock, closer, pair, turn = setup
    server, client = pair()
    server.sendall(b"response")
    closer.close(server)  # returns at once
    client.settimeout(5)
    assert client.recv(100) == b"response"
    assert client.recv(100) == b""  # FIN
    client.sendall(b"late request bytes")  # read and dropped, no reset
    turn()
    assert not closed(server)
    client.close()
    turn()
    assert closed(server)
    assert len(closer) == 0


def test_a_client_that_never_closes_is_closed_after_the_linger_time(setup):
    clock, closer, pair, turn = setup
    server, _ = pair()
    closer.close(server)
    clock.advance(1.9)
    closer.expire()
    assert not closed(server)
    clock.advance(0.2)
    closer.expire()
    assert closed(server)


def test_lingering_sockets_are_bounded_oldest_first(setup):
    clock, closer, pair, turn = setup
    servers = [pair()[0] for _ in range(4)]
    for server in servers:
        closer.close(server)
    assert [closed(server) for server in servers] == [True, False, False, False]
    closer.expire(force=True)
    assert all(closed(server) for server in servers)


def test_a_client_still_sending_a_large_refused_body_can_finish_and_read_the_answer(setup):
    # Closing after 64 KiB (as gunicorn does) reset the connection under a client still sending a
    # 100 KB body the server had refused, before it could read the 413.
    clock, closer, pair, turn = setup
    server, client = pair()
    server.sendall(b"HTTP/1.1 413 Content Too Large\r\n\r\n")
    closer.close(server)
    client.settimeout(5)
    for _ in range(25):  # 400 KB, more than the socket buffers hold: sent as the server drains it
        client.sendall(b"x" * 16384)
        turn()
    assert not closed(server)
    assert client.recv(100) == b"HTTP/1.1 413 Content Too Large\r\n\r\n"
    assert client.recv(100) == b""
    client.close()
    turn()
    assert closed(server)
