"""The development server's response writer (``python app.py``): what it counts and how it writes."""

from __future__ import annotations

import pytest

from service.dev_server import WRITE_SLICE, _CountedWriter


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
