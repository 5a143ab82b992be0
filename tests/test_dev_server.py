"""The development server's response writer (``python app.py``): what it counts and how it writes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from service.dev_server import WRITE_SLICE, BoundedRequestHandler, _CountedWriter


class _Peer:
    """A handler's socket writer (``sendall`` per write) whose client takes ``room`` bytes, then nothing: a write past
    that times out, as ``sendall`` does after the socket's timeout."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.received = bytearray()
        self.writes: list[int] = []

    def write(self, data: bytes) -> int:
        self.writes.append(len(data))
        if len(self.received) + len(data) > self.room:
            raise TimeoutError("timed out")
        self.received += data
        return len(data)


def test_a_response_cut_off_counts_what_went_out():
    # One write of the whole listing counted nothing when it timed out: the access line said "200 0" after 2 MB.
    peer = _Peer(room=3 * WRITE_SLICE + 10)
    writer = _CountedWriter(peer)
    with pytest.raises(TimeoutError):
        writer.write(b"x" * (10 * WRITE_SLICE))
    assert writer.sent == len(peer.received) == 3 * WRITE_SLICE


def test_a_large_response_is_written_in_slices_each_within_the_write_timeout():
    # sendall's timeout bounds a whole write: one write of 18 MB was cut off after 30 s from a client still reading.
    peer = _Peer(room=1 << 30)
    writer = _CountedWriter(peer)
    assert writer.write(b"y" * (2 * WRITE_SLICE + 1)) == 2 * WRITE_SLICE + 1
    assert peer.writes == [WRITE_SLICE, WRITE_SLICE, 1]
    assert writer.sent == 2 * WRITE_SLICE + 1 and bytes(peer.received) == b"y" * (2 * WRITE_SLICE + 1)


def stalled_handler(token: str = "") -> BoundedRequestHandler:
    handler = BoundedRequestHandler.__new__(BoundedRequestHandler)
    handler.client_address, handler.command, handler.path = ("127.0.0.1", 40000), "POST", f"/enqueue/batch?t={token}"
    handler.server = SimpleNamespace(body_limits=SimpleNamespace(token=token))
    handler.status_sent, handler.response_id = 200, "stalled-1"
    return handler


def test_a_client_that_took_nothing_of_its_response_is_named_in_a_warning_with_the_request_id(caplog):
    # The connection was dropped without a word: only the access line's byte count told of the cut response.
    caplog.set_level(logging.WARNING, logger="gunicorn.error")
    stalled_handler().connection_dropped(TimeoutError("timed out"))
    assert [(record.getMessage(), record.request_id) for record in caplog.records] == [
        (
            "closed the connection from 127.0.0.1:40000: it took nothing of the response to POST /enqueue/batch "
            "for 30 s",
            "stalled-1",
        )
    ]


def test_a_client_that_went_away_or_one_not_answered_yet_gets_no_such_warning(caplog):
    caplog.set_level(logging.WARNING, logger="gunicorn.error")
    stalled_handler().connection_dropped(ConnectionResetError())  # the client's own doing
    before_the_response = stalled_handler()
    before_the_response.status_sent = None
    before_the_response.connection_dropped(TimeoutError("timed out"))
    assert caplog.records == []
