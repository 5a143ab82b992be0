"""RequestReader and ReadDeadline on real socket pairs and a real selector, with a fake clock."""

from __future__ import annotations

import selectors
import socket

import pytest
from doubles import FakeClock
from gunicorn.config import Config as GunicornConfig
from gunicorn.http.errors import InvalidChunkExtension, InvalidChunkSize
from gunicorn.workers.gthread import TConn

from service.request_reader import (
    MAX_PREREAD_BODY,
    MAX_PREREAD_HEAD,
    BodyLimits,
    Framing,
    ReadDeadline,
    RequestReader,
    missing_host,
    read_framing,
)

TIMEOUT = 10.0


class Harness:
    def __init__(self, limits: BodyLimits | None = None) -> None:
        self.clock = FakeClock()
        self.selector = selectors.DefaultSelector()
        self.ready: list[TConn] = []
        self.dropped: list[TConn] = []
        self.refused: list[tuple[TConn, Exception]] = []
        self.cfg = GunicornConfig()
        self.reader = RequestReader(
            self.cfg,
            self.selector,
            ready=self.ready.append,
            drop=self.dropped.append,
            refuse=lambda conn, error: self.refused.append((conn, error)),
            timeout=TIMEOUT,
            limits=limits,
            clock=self.clock.monotonic,
        )
        self.sockets: list[socket.socket] = []

    def connect(self, sent: bytes = b"") -> tuple[TConn, socket.socket]:
        server, client = socket.socketpair()
        self.sockets += [server, client]
        conn = TConn(self.cfg, server, ("127.0.0.1", 5000), ("127.0.0.1", 80))
        if sent:
            client.sendall(sent)
        self.reader.add(conn)
        self.turn()
        return conn, client

    def turn(self) -> None:
        """One turn of the event loop: dispatch what is readable now."""
        for key, _ in self.selector.select(0.05):
            key.data(key.fileobj)

    def buffered(self, conn: TConn) -> bytes:
        return conn.parser.unreader.buf.getvalue()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.selector.close()


@pytest.fixture
def harness():
    harness = Harness()
    yield harness
    harness.close()


HEAD = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"


def test_a_whole_head_is_handed_over_with_its_bytes(harness):
    conn, _ = harness.connect(HEAD)
    assert harness.ready == [conn]
    assert harness.buffered(conn) == HEAD
    assert conn.data_ready
    assert len(harness.reader) == 0


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx",
        b"DELETE /tasks/a HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx",
        b"GET /tasks HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"POST /wp/tasks/a HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx",
    ],
    ids=["get", "delete", "chunked", "post-elsewhere"],
)
def test_a_body_sent_to_a_route_that_takes_none_is_not_waited_for(harness, head):
    # Read up to the route's limit as any other: a body shorter than announced held the answer until the request's
    # deadline (10 s by default), though the route never reads it.
    conn, _ = harness.connect(head)
    assert harness.ready == [conn]  # at once: answered as without it, and the connection closed after
    assert BodyLimits().of(head) == 0
    assert BodyLimits().of(b"POST /wp/enqueue HTTP/1.1\r\n\r\n") == BodyLimits().default  # under a root path


@pytest.mark.parametrize("target", [b"/enqueue#x", b"/enqueue/batch#x", b"/enqueue#x?y", b"/enqueue?y#x"])
def test_a_fragment_in_the_target_leaves_the_route_and_its_body_to_the_loop(harness, target):
    # gunicorn drops a fragment and routes `/enqueue#x` to POST /enqueue: with the route's limit at 0, its
    # body was read by a request thread, which a client sending it slowly held until the request's deadline.
    head = b"POST " + target + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
    assert BodyLimits().of(head) == (BodyLimits().batch if b"batch" in target else BodyLimits().default)
    conn, client = harness.connect(head + b'{"id"')
    assert harness.ready == []  # the body is waited for on the poller, not in a thread
    client.sendall(b':"a"}')
    harness.turn()
    assert harness.ready == [conn]


def test_a_head_sent_in_pieces_waits_on_the_poller_until_whole(harness):
    conn, client = harness.connect(HEAD[:10])
    for start in range(10, len(HEAD), 7):
        assert harness.ready == []
        client.sendall(HEAD[start : start + 7])
        harness.turn()
    assert harness.ready == [conn]
    assert harness.buffered(conn) == HEAD


def test_a_request_is_handed_over_with_the_time_it_began_to_arrive(harness):
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
    began = harness.clock.monotonic()
    conn, client = harness.connect(head + b"12345")
    harness.clock.advance(0.8)  # the rest of the body comes later: the access line's duration counts it
    client.sendall(b"67890")
    harness.turn()
    assert harness.ready == [conn]
    assert conn.request_began == began


def test_a_small_body_of_known_length_is_read_before_the_hand_over(harness):
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
    conn, client = harness.connect(head + b"12345")
    assert harness.ready == []
    client.sendall(b"67890")
    harness.turn()
    assert harness.ready == [conn]
    assert harness.buffered(conn) == head + b"1234567890"


@pytest.mark.parametrize(
    "head",
    [
        b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_PREREAD_BODY + 1),
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",  # refused by the parser
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",  # refused
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",  # refused
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: nothing\r\nContent-Length: 1\r\n\r\n",  # refused: 417
        b"NOT HTTP\r\n\r\n",
    ],
    ids=["larger-than-its-limit", "two-lengths", "length-and-chunked", "not-chunked", "unknown-expectation", "garbage"],
)
def test_requests_whose_body_will_not_be_read_are_handed_over_once_the_head_is_in(harness, head):
    conn, _ = harness.connect(head)
    assert harness.ready == [conn]


CHUNKED = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_chunked_body_is_read_to_its_end_before_the_hand_over(harness):
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    conn, client = harness.connect(CHUNKED)
    for start in range(0, len(body), 3):  # every split of the framing
        assert harness.ready == []
        client.sendall(body[start : start + 3])
        harness.turn()
    assert harness.ready == [conn]
    # Decoded on the loop; with trailer fields it stays chunked, one chunk, for the parser to check them.
    assert harness.buffered(conn) == CHUNKED + b"b\r\nhello world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    assert conn.body_exceeds == 0
    assert conn.parser is not None and next(conn.parser).body.read() == b"hello world"  # from the buffer alone


def test_a_chunked_body_ends_at_its_last_chunk_without_trailers(harness):
    conn, _ = harness.connect(CHUNKED + b"3\r\nabc\r\n0\r\n\r\n")
    assert harness.ready == [conn]


@pytest.mark.parametrize("chunk_size", [32768, 16384])
def test_a_chunked_body_is_handed_over_as_soon_as_it_passes_its_limit(harness, chunk_size):
    # It was read on to 64 KiB past the limit: a client that sent a little more than the limit and went on
    # sending slowly (or stopped) got its 413 only at the deadline, or a 408 for a body cut short there.
    conn, client = harness.connect(CHUNKED)
    whole_chunks = MAX_PREREAD_BODY // chunk_size
    body = b"%x\r\n%s\r\n" % (chunk_size, b"a" * chunk_size) * whole_chunks  # the limit at most
    body += b"%x\r\n%s" % (chunk_size, b"a" * (MAX_PREREAD_BODY + 1 - chunk_size * whole_chunks))  # a byte more
    for start in range(0, len(body), 32768):  # the socket pair holds less than the body: one slice a turn
        assert harness.ready == []
        client.sendall(body[start : start + 32768])
        harness.turn()
    assert harness.ready == [conn]  # with a chunk not yet whole: the client may be sending on
    assert conn.body_exceeds == MAX_PREREAD_BODY  # the application refuses it without reading it
    assert not conn.body_overframed


def test_a_chunked_body_whose_framing_passes_its_limit_is_handed_over_as_too_large():
    # Only the decoded bytes counted: chunks of one byte behind 8 KB of extension each were buffered
    # without end (400 MB on one connection for POST /enqueue's 64 KiB) while the body stayed "short".
    harness = Harness(BodyLimits(default=4096))
    try:
        conn, client = harness.connect(CHUNKED)
        chunk = b"1;" + b"e" * 1000 + b"\r\nx\r\n"
        for _ in range(64):  # 64 KB of framing for 64 decoded bytes
            if harness.ready:
                break
            client.sendall(chunk)
            harness.turn()
        assert harness.ready == [conn]
        assert conn.body_exceeds == 4096  # the application refuses it without reading the rest
        assert conn.body_overframed  # for its framing: its data is short
        assert len(harness.buffered(conn)) <= len(CHUNKED) + 2 * 4096 + len(chunk)
    finally:
        harness.close()


def test_a_chunked_body_of_small_chunks_within_its_limit_is_read_whole():
    harness = Harness(BodyLimits(default=4096))
    try:
        body = b"8;n=1\r\n12345678\r\n" * 256 + b"0\r\n\r\n"  # 2 KiB of data, 3.5 KiB of framing
        conn, _ = harness.connect(CHUNKED + body)
        assert harness.ready == [conn]
        assert conn.body_exceeds == 0
        assert next(conn.parser).body.read() == b"12345678" * 256
    finally:
        harness.close()


def test_a_chunked_body_of_one_byte_chunks_near_its_limit_is_read_whole():
    # A JSON encoder writing token by token sends chunks of 1 to 10 bytes: 5 bytes of framing per
    # chunk. With the framing allowed only the limit again, such a body over ~45% of it was refused.
    harness = Harness(BodyLimits(default=4096))
    try:
        data = bytes(range(48, 58)) * 400  # 4,000 bytes
        body = b"".join(b"1\r\n" + data[i : i + 1] + b"\r\n" for i in range(len(data))) + b"0\r\n\r\n"
        conn, _ = harness.connect(CHUNKED + body)
        assert harness.ready == [conn]
        assert conn.body_exceeds == 0
        assert next(conn.parser).body.read() == data
    finally:
        harness.close()


def test_the_framing_of_a_chunked_body_is_bounded_by_its_limit_and_its_data():
    harness = Harness(BodyLimits(default=4096))
    try:
        conn, client = harness.connect(CHUNKED)
        chunk = b"1;e=12345678\r\nx\r\n"  # 17 bytes of framing per byte of data
        for _ in range(4096):
            if harness.ready:
                break
            client.sendall(chunk * 16)
            harness.turn()
        assert harness.ready == [conn]
        assert conn.body_exceeds == 4096
        # The framing may take the limit plus 8 bytes per byte of data: here 4096 + 8 * 4096 / 9.
        assert len(harness.buffered(conn)) <= len(CHUNKED) + 4096 * 3 + 16 * len(chunk)
    finally:
        harness.close()


@pytest.mark.parametrize(
    "size_line",
    [b"%x" % (MAX_PREREAD_BODY + 1), b"ffffffffffffffffffffffff", b"1" + b"0" * 16, b"00" + b"f" * 17],
)
def test_a_chunk_declared_past_the_limit_is_handed_over_as_too_large_at_once(harness, size_line):
    # Its data was waited for: the connection was held until the deadline and answered 408 (a size line of
    # more than 16 digits was handed over at once, and the thread's parser waited for the data instead).
    conn, _ = harness.connect(CHUNKED + size_line + b"\r\nab")
    assert harness.ready == [conn]
    assert conn.body_exceeds == MAX_PREREAD_BODY  # the application refuses it (413) without reading it


def test_a_chunk_size_with_many_leading_zeros_is_read_here(harness):
    # Valid (RFC 9112): handed over as too long to read here, its thread waited for the slow data.
    conn, client = harness.connect(CHUNKED + b"0" * 22 + b"5\r\nhel")
    assert harness.ready == []
    client.sendall(b"lo\r\n" + b"0" * 20 + b"\r\n\r\n")
    harness.turn()
    assert harness.ready == [conn]
    assert conn.body_exceeds == 0
    assert conn.parser is not None and next(conn.parser).body.read() == b"hello"  # from the buffer alone


def test_malformed_chunked_framing_is_handed_over_for_the_parser_to_refuse(harness):
    conn, _ = harness.connect(CHUNKED + b"zz\r\n")
    assert harness.ready == [conn]


def _one_byte_chunks(data: bytes) -> bytes:
    """``data`` chunked a byte at a time, each chunk with a short extension: 7 bytes of framing per byte."""
    return b"".join(b"1;e\r\n" + data[i : i + 1] + b"\r\n" for i in range(len(data))) + b"0\r\n\r\n"


def test_a_chunked_body_is_held_decoded_whatever_its_framing():
    # Kept raw until its end, a body of one-byte chunks held its framing too: 8 times its data, so a
    # 4 MiB batch took 36 MiB on the loop and 185 MB of the worker once the thread's parser had decoded it.
    limit = 65536
    harness = Harness(BodyLimits(default=limit))
    try:
        conn, client = harness.connect(CHUNKED)
        data = bytes(range(256)) * (limit // 256)  # the limit exactly
        body = _one_byte_chunks(data)
        assert len(body) > 7 * limit
        held = []
        for start in range(0, len(body), 65536):  # a slice a turn: one read takes it whole
            assert harness.ready == []
            client.sendall(body[start : start + 65536])
            harness.turn()
            held.append(harness.reader.buffered())
        assert harness.ready == [conn] and conn.body_exceeds == 0
        # The head, the data decoded so far, and what one read brought: never the framing read before.
        assert max(held) <= len(CHUNKED) + limit + 65536
        assert held[-2] <= len(CHUNKED) + limit  # the last slice before the end: its framing dropped already
        request = next(conn.parser)
        assert ("CONTENT-LENGTH", str(limit)) in request.headers
        assert request.body.read() == data
    finally:
        harness.close()


def test_a_whole_chunked_body_is_handed_over_with_its_length_and_what_follows_it(harness):
    # The thread's parser reads it as a body of known length: it does not decode it a second time.
    conn, _ = harness.connect(CHUNKED + b"2;x=y\r\n{}\r\n3\r\n[1]\r\n0;z\r\n\r\n" + HEAD)
    assert harness.ready == [conn]
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
    assert harness.buffered(conn) == head + b"{}[1]" + HEAD
    first = next(conn.parser)
    assert [name for name, _ in first.headers] == ["HOST", "CONTENT-LENGTH"]
    assert first.body.read() == b"{}[1]"
    assert next(conn.parser).path == "/healthz"  # the request sent after it


def test_the_transfer_encoding_field_is_replaced_wherever_it_is_in_the_head(harness):
    head = b"POST /enqueue HTTP/1.1\r\ntransfer-encoding:  Chunked \r\nHost: a\r\nX-A: b\r\n\r\n"
    conn, _ = harness.connect(head + b"1\r\nx\r\n0\r\n\r\n")
    assert harness.buffered(conn) == b"POST /enqueue HTTP/1.1\r\nHost: a\r\nX-A: b\r\nContent-Length: 1\r\n\r\nx"


def test_a_chunked_body_handed_over_unfinished_is_one_chunk_of_its_data_then_the_rest(harness):
    # At the deadline its thread's parser decodes it from the buffer and reads on from the socket, as before.
    conn, _ = harness.connect(CHUNKED + b"1\r\na\r\n2\r\nbc\r\n3\r\nd")
    assert harness.ready == []
    harness.clock.advance(TIMEOUT)
    harness.reader.expire()
    assert harness.ready == [conn]
    assert harness.buffered(conn) == CHUNKED + b"3\r\nabc\r\n3\r\nd"


def test_a_chunked_body_with_malformed_framing_is_handed_over_with_its_data_before_it(harness):
    conn, _ = harness.connect(CHUNKED + b"1\r\na\r\n2\r\nbc\r\nzz\r\n")
    assert harness.ready == [conn]
    assert harness.buffered(conn) == CHUNKED + b"3\r\nabc\r\nzz\r\n"


@pytest.mark.parametrize("line", [b"1 ", b" 1", b"1;", b"1;a b", b'1 ;e="x', b"1;e\r"], ids=repr)
def test_a_chunk_size_line_the_parser_refuses_is_handed_to_it_as_sent(harness, line):
    # Decoded and handed over with a length, such a body was accepted; the parser refuses it (400).
    conn, _ = harness.connect(CHUNKED + b"2\r\nab\r\n" + line + b"\r\nx\r\n0\r\n\r\n")
    assert harness.ready == [conn]
    assert harness.buffered(conn) == CHUNKED + b"2\r\nab\r\n" + line + b"\r\nx\r\n0\r\n\r\n"
    with pytest.raises((InvalidChunkSize, InvalidChunkExtension)):
        next(conn.parser).body.read()


def test_chunk_extensions_the_parser_takes_are_decoded(harness):
    conn, _ = harness.connect(CHUNKED + b'1 ;a=b;c="d e"\r\nx\r\n1;f\r\ny\r\n0;g=h\r\n\r\n')
    assert harness.buffered(conn).endswith(b"Content-Length: 2\r\n\r\nxy")


def test_a_bare_lf_after_a_cr_of_decoded_data_is_refused(harness):
    # The byte before the chunk-size line is then the data's CR, not the CRLF that ended the chunk.
    conn, client = harness.connect(CHUNKED + b"1\r\n\r\r\n")
    assert harness.ready == [] and harness.refused == []
    client.sendall(b"\n1\r\nx\r\n0\r\n\r\n")
    harness.turn()
    assert _refused(harness, conn)[0] == "BareLineFeed"


def _fields(size: int) -> bytes:
    """Header fields of ``size`` bytes in all, each within gunicorn's limit on one (8190)."""
    fields = b"".join(b"X-F%d: %s\r\n" % (n, b"f" * 7990) for n in range(size // 8000))
    return fields + b"X-Rest: " + b"r" * (size - len(fields) - 10) + b"\r\n"


def _refused(harness: Harness, conn: TConn) -> tuple[str, str]:
    assert harness.ready == [] and harness.dropped == []
    [(refused, error)] = harness.refused
    assert refused is conn
    return type(error).__name__, str(error)


def test_a_head_that_is_not_whole_within_the_bound_is_refused_not_handed_to_a_thread(harness):
    # Handed over, its thread's parser would wait for the rest of it (gunicorn takes up to about 800 KB).
    conn, client = harness.connect(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    client.sendall(_fields(MAX_PREREAD_HEAD - 100))
    harness.turn()
    assert harness.ready == [] and harness.refused == []  # within the bound: waited for
    client.sendall(_fields(200))
    harness.turn()
    assert _refused(harness, conn) == ("LimitRequestHeaders", "the request head is longer than 65536 bytes")


def test_a_whole_head_over_the_bound_is_refused_too(harness):
    conn, _ = harness.connect(b"GET /healthz HTTP/1.1\r\n" + _fields(MAX_PREREAD_HEAD) + b"\r\n")
    assert _refused(harness, conn)[0] == "LimitRequestHeaders"


def test_a_request_line_over_the_bound_is_refused_as_too_long_a_line(harness):
    conn, _ = harness.connect(b"GET /" + b"a" * MAX_PREREAD_HEAD)
    assert _refused(harness, conn) == ("LimitRequestLine", "the request line is longer than 4094 bytes")


def test_a_trailer_section_over_the_bound_is_refused(harness):
    conn, client = harness.connect(CHUNKED + b"3\r\nabc\r\n0\r\n" + _fields(MAX_PREREAD_HEAD - 100))
    assert harness.ready == [] and harness.refused == []
    client.sendall(_fields(200))
    harness.turn()
    assert _refused(harness, conn) == ("LimitRequestHeaders", "the trailer section is longer than 65536 bytes")


def test_100_continue_is_answered_here_and_the_body_read_before_the_hand_over(harness):
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
    conn, client = harness.connect(head)
    client.settimeout(5)
    assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert harness.ready == []
    client.sendall(b"1234567890")
    harness.turn()
    assert harness.ready == [conn]
    assert conn.continue_answered  # gunicorn must not send it again
    assert harness.buffered(conn) == head + b"1234567890"


@pytest.mark.parametrize(
    "extra",
    [
        b"Content-Length: 65537\r\n",
        b"Content-Length: 10\r\nAuthorization: Bearer wrong-token-wrong\r\n",
        b"Content-Length: 10\r\n",
        b"Content-Length: 10\r\nAuthorization: Bearer a-token-a-token-a\r\nSec-Fetch-Site: cross-site\r\n",
    ],
    ids=["over-the-limit", "wrong-token", "no-token", "page-of-another-origin"],
)
def test_100_continue_is_not_sent_for_a_body_the_application_will_refuse(extra):
    harness = Harness(BodyLimits(65536, 1 << 20, token="a-token-a-token-a"))
    try:
        head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n" + extra + b"\r\n"
        conn, client = harness.connect(head)
        assert harness.ready == [conn]  # at once: the application refuses it from its head
        assert conn.continue_answered
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)  # no 100 Continue
    finally:
        harness.close()


@pytest.mark.parametrize("path", [b"/enqueue/batch", b"/%65nqueue/batch", b"/enqueue%2Fbatch", b"/enqueue%2fbatch"])
def test_a_batch_url_however_spelled_takes_the_batch_s_limit(path):
    # Percent-encoded, the batch's body over MAX_BODY_BYTES got neither 100 Continue nor 413: it timed out (408).
    assert BodyLimits(100, 1000).of(b"POST " + path + b"?a=%41 HTTP/1.1\r\n\r\n") == 1000
    harness = Harness(BodyLimits(65536, 1 << 20))
    try:
        head = b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 100000\r\n\r\n"
        conn, client = harness.connect(head)
        client.settimeout(5)
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    finally:
        harness.close()


def test_body_limits_follow_the_route_and_the_token():
    limits = BodyLimits(100, 1000, token="a-token-a-token-a")
    assert limits.of(b"POST /enqueue HTTP/1.1\r\n\r\n") == 100
    assert limits.of(b"POST /root/enqueue/batch?x=1 HTTP/1.1\r\n\r\n") == 1000
    assert limits.authorized(b"Bearer a-token-a-token-a")
    assert limits.authorized(b"bearer  a-token-a-token-a ")
    assert not limits.authorized(b"Bearer a-token")
    assert not limits.authorized(None)
    assert BodyLimits(100, 1000).authorized(None)


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        (b"Content-Length: 10\r\n", Framing(10)),
        (b"Content-Length: 101\r\n", Framing(0, refused=True)),
        (b"Transfer-Encoding: chunked\r\n", Framing(0, chunked=True)),
        (b"Transfer-Encoding: chunked, chunked\r\n", Framing(0)),
        (b"Expect: 100-continue\r\nContent-Length: 10\r\n", Framing(10, expects=True)),
        (b"Expect: 100-CONTINUE\r\nContent-Length: 101\r\n", Framing(0, expects=True, refused=True)),
        (
            b"Expect: 100-continue\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n",
            Framing(0, expects=True, refused=True),
        ),
        (b"Expect: 100-continue\r\nContent-Encoding: identity\r\nContent-Length: 10\r\n", Framing(10, expects=True)),
        (
            b"Expect: 100-continue\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            Framing(0, expects=True, refused=True),
        ),
        (b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n", Framing(0, chunked=True, expects=True)),
        (b"Expect: 100-continue\r\nExpect: 100-Continue\r\nContent-Length: 10\r\n", Framing(10, expects=True)),
        (b"Expect: 100-continue\r\nExpect: nothing\r\nContent-Length: 10\r\n", Framing(0)),
        (b"Expect: 100-continue\r\nContent-Length: 1\r\nContent-Length: 1\r\n", Framing(0)),
        (b"Expect: 100-continue\r\nContent-Length: -1\r\n", Framing(0)),
        # Leading zeros are allowed (RFC 9110 section 8.6: 1*DIGIT) and the parser takes them: however many
        # there are, the body is read here, not on a request thread that would wait for a slow client.
        (b"Content-Length: 0000000000000000000010\r\n", Framing(10)),
        (b"Content-Length: 00000000000000000000101\r\n", Framing(0, refused=True)),
        (b"Content-Length: " + b"0" * 5000 + b"10\r\n", Framing(10)),
        (b"Expect: 100-continue\r\nContent-Length: 0000000000000000000010\r\n", Framing(10, expects=True)),
    ],
)
def test_read_framing(headers, framing):
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    assert read_framing(head, BodyLimits(100)) == framing._replace(length=framing.length + len(head))


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        (b"Content-Length: 10\r\n", Framing(0, refused=True)),
        (b"Content-Length: 10\r\nAuthorization: Bearer wrong-token-wrong\r\n", Framing(0, refused=True)),
        (b"Authorization: Bearer a-token-a-token-a\r\nContent-Length: 10\r\n", Framing(10)),
        (b"Content-Length: 0\r\n", Framing(0)),
        (b"Transfer-Encoding: chunked\r\n", Framing(0, refused=True)),
        (b"Transfer-Encoding: chunked\r\nAuthorization: Bearer a-token-a-token-a\r\n", Framing(0, chunked=True)),
    ],
    ids=["no-token", "wrong-token", "token", "no-body", "chunked-no-token", "chunked-token"],
)
def test_a_body_without_the_token_is_not_read(headers, framing):
    """The loop does not buffer a body the application will refuse from its head: up to a route's limit on
    every connection of a client that does not know the token."""
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    limits = BodyLimits(100, token="a-token-a-token-a")
    assert read_framing(head, limits) == framing._replace(length=framing.length + len(head))


@pytest.mark.parametrize(
    ("request_line", "headers", "framing"),
    [
        (b"POST /enqueue", b"Sec-Fetch-Site: cross-site\r\nContent-Length: 10\r\n", Framing(0, refused=True)),
        (b"POST /enqueue/batch", b"Sec-Fetch-Site: Same-Site \r\nContent-Length: 10\r\n", Framing(0, refused=True)),
        (b"DELETE /tasks/a", b"Content-Length: 10\r\nsec-fetch-site: cross-site\r\n", Framing(0, refused=True)),
        (b"POST /enqueue", b"Sec-Fetch-Site: cross-site\r\nTransfer-Encoding: chunked\r\n", Framing(0, refused=True)),
        (
            b"POST /enqueue",
            b"Sec-Fetch-Site: cross-site\r\nExpect: 100-continue\r\nContent-Length: 10\r\n",
            Framing(0, expects=True, refused=True),
        ),
        (b"POST /enqueue", b"Sec-Fetch-Site: same-origin\r\nContent-Length: 10\r\n", Framing(10)),
        (b"POST /enqueue", b"Sec-Fetch-Site: none\r\nTransfer-Encoding: chunked\r\n", Framing(0, chunked=True)),
        # Repeated, it reaches the application as "cross-site,cross-site", which it does not refuse: read here.
        (
            b"POST /enqueue",
            b"Sec-Fetch-Site: cross-site\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 10\r\n",
            Framing(10),
        ),
        # A read is answered to any page (without CORS it cannot see the answer); it takes no body from anyone.
        (b"GET /tasks", b"Sec-Fetch-Site: cross-site\r\nContent-Length: 10\r\n", Framing(0, refused=True)),
    ],
    ids=["post", "batch", "delete", "chunked", "expect", "same-origin", "none", "repeated", "get"],
)
def test_a_body_from_a_page_of_another_origin_is_not_read(request_line, headers, framing):
    """The application refuses such a request from its head (403, service/cross_site.py): its body was read
    first, and a head alone waited for a body that never came until the request's deadline."""
    head = request_line + b" HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    assert read_framing(head, BodyLimits(100)) == framing._replace(length=framing.length + len(head))


@pytest.mark.parametrize(
    ("request_line", "headers", "framing"),
    [
        (b"POST /enqueue", b"Origin: http://evil.example\r\nContent-Length: 10\r\n", Framing(0, refused=True)),
        (b"DELETE /tasks/a", b"Origin: null\r\nContent-Length: 10\r\n", Framing(0, refused=True)),
        (b"POST /enqueue", b"Origin: http://a:8081\r\nTransfer-Encoding: chunked\r\n", Framing(0, refused=True)),
        (
            b"POST /enqueue",
            b"Origin: http://evil.example\r\nExpect: 100-continue\r\nContent-Length: 10\r\n",
            Framing(0, expects=True, refused=True),
        ),
        (b"POST /enqueue", b"Origin: http://a\r\nContent-Length: 10\r\n", Framing(10)),
        (b"POST /enqueue", b"Origin: HTTP://A\r\nContent-Length: 10\r\n", Framing(10)),
        (b"POST /enqueue", b"Origin: https://p\r\nX-Forwarded-Host: p\r\nContent-Length: 10\r\n", Framing(10)),
        # The browser's own Sec-Fetch-Site is taken over the Origin, as the application takes it.
        (
            b"POST /enqueue",
            b"Origin: http://evil.example\r\nSec-Fetch-Site: same-origin\r\nContent-Length: 10\r\n",
            Framing(10),
        ),
        (b"GET /tasks", b"Origin: http://evil.example\r\nContent-Length: 10\r\n", Framing(0, refused=True)),
    ],
    ids=["post", "null", "chunked", "expect", "own", "case", "forwarded", "fetch-metadata", "get"],
)
def test_a_body_from_a_page_of_another_origin_without_fetch_metadata_is_not_read(request_line, headers, framing):
    """As the application refuses it (403) from its Origin when the browser sent no Sec-Fetch-Site (plain http
    to an address that is not a loopback one): the head's Host is ``a``."""
    head = request_line + b" HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    assert read_framing(head, BodyLimits(100)) == framing._replace(length=framing.length + len(head))


@pytest.mark.parametrize("version", [b"1.2", b"1.9"])
def test_a_later_http_1_request_gets_100_continue_and_its_chunked_body_read_as_an_http_1_1_one(harness, version):
    # The loop looked for HTTP/1.1 alone: it did not answer 100-continue, and the client waited for it until the
    # deadline; a chunked body was handed to a thread with the head alone, to wait for it there.
    head = b"POST /enqueue HTTP/%s\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n" % version
    conn, client = harness.connect(head)
    client.settimeout(5)
    assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.sendall(b"1234567890")
    harness.turn()
    assert harness.ready == [conn] and conn.continue_answered
    chunked = b"POST /enqueue HTTP/%s\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" % version
    assert read_framing(chunked, BodyLimits(100)) == Framing(len(chunked), chunked=True)


def test_expect_is_ignored_in_http_1_0():
    head = b"POST /enqueue HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
    assert read_framing(head, BodyLimits(100)) == Framing(len(head) + 10)


def test_a_request_already_there_is_handed_over_without_the_poller(harness):
    server, client = socket.socketpair()
    harness.sockets += [server, client]
    conn = TConn(harness.cfg, server, ("127.0.0.1", 5000), ("127.0.0.1", 80))
    client.sendall(HEAD)
    harness.reader.add(conn)  # no turn of the event loop
    assert harness.ready == [conn]
    assert harness.buffered(conn) == HEAD
    assert not harness.selector.get_map()


def test_a_connection_closed_before_it_is_added_is_dropped(harness):
    server, client = socket.socketpair()
    harness.sockets += [server, client]
    conn = TConn(harness.cfg, server, ("127.0.0.1", 5000), ("127.0.0.1", 80))
    client.close()
    harness.reader.add(conn)
    assert harness.dropped == [conn]
    assert len(harness.reader) == 0 and not harness.selector.get_map()


@pytest.mark.parametrize(
    ("headers", "body_bytes"),
    [
        (b"Content-Length: 10\r\n", 10),
        (b"content-LENGTH:\t7 \r\n", 7),
        (b"Content-Length: 0\r\n", 0),
        (b"X-Content-Length: 10\r\n", 0),
        (b"", 0),
        # Framings left to the thread's parser: the head alone is read first.
        (b"Content-Length: +10\r\n", 0),
        (b"Content-Length: 1_0\r\n", 0),
        (b"Content-Length: \xd9\xa1\r\n", 0),  # a non-ASCII digit
        (b"Content-Length: 10\r\nContent-Length: 10\r\n", 0),
        (b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", 0),
        (b"Content-Length: 10\r\nExpect: 100-continue\r\n", 10),
        (b"X-A: b\r\n c\r\nContent-Length: 10\r\n", 0),  # a folded line
        (b"Content-Length: %d\r\n" % (MAX_PREREAD_BODY + 1), 0),
    ],
)
def test_a_body_of_known_length_is_read_ahead_only_if_the_parser_takes_its_framing(headers, body_bytes):
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    assert read_framing(head, BodyLimits()).length == len(head) + body_bytes


def test_a_client_closing_before_its_head_is_whole_is_dropped(harness):
    conn, client = harness.connect(HEAD[:10])
    client.close()
    harness.turn()
    assert harness.dropped == [conn]
    assert harness.ready == []


def test_a_body_cut_short_is_handed_over_so_the_app_can_say_so(harness):
    conn, client = harness.connect(b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
    client.shutdown(socket.SHUT_WR)
    harness.turn()
    assert harness.ready == [conn]


def test_a_request_not_whole_by_the_deadline_is_given_up(harness):
    silent, _ = harness.connect()
    partial, _ = harness.connect(HEAD[:10])
    short_body, _ = harness.connect(b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
    harness.clock.advance(TIMEOUT - 0.01)
    harness.reader.expire()
    assert harness.dropped == [] and harness.ready == []
    harness.clock.advance(0.02)
    harness.reader.expire()
    assert harness.dropped == [silent, partial]
    assert harness.ready == [short_body]
    assert short_body.read_deadline <= harness.clock.monotonic()  # its thread reads no more


def test_a_request_arrived_since_the_pollers_last_look_is_served_at_the_deadline_not_closed_unread(harness):
    # Idle until its deadline, the connection's request came after the loop's last look: closing would reset it.
    silent, client = harness.connect()
    late_partial, partial_client = harness.connect()
    harness.clock.advance(TIMEOUT)
    client.sendall(HEAD)
    partial_client.sendall(HEAD[:10])
    harness.reader.expire()
    assert harness.ready == [silent] and harness.buffered(silent) == HEAD
    assert harness.dropped == [late_partial]  # not whole by its deadline: given up as before
    assert len(harness.reader) == 0


def test_the_connection_waiting_longest_is_dropped_first(harness):
    first, _ = harness.connect(HEAD[:10])
    second, _ = harness.connect()
    harness.reader.drop_oldest()
    assert harness.dropped == [first]
    assert len(harness.reader) == 1


def test_deadlines_brought_forward_apply_to_waiting_requests(harness):
    conn, _ = harness.connect(HEAD[:10])
    harness.reader.bring_deadlines_forward(harness.clock.monotonic() + 2)
    harness.clock.advance(2)
    harness.reader.expire()
    assert harness.dropped == [conn]


def test_read_deadline_ends_the_stream_and_marks_the_connection():
    class Conn:
        read_expired = False

    server, client = socket.socketpair()
    clock = FakeClock()
    conn = Conn()
    conn.sock = server
    conn.read_deadline = clock.monotonic() + 5
    reader = ReadDeadline(conn, clock.monotonic)
    try:
        client.sendall(b"abc")
        assert reader.recv(10) == b"abc"
        assert not conn.read_expired
        clock.advance(5)
        assert reader.recv(10) == b""
        assert conn.read_expired
        assert server.gettimeout() is None  # blocking again, for the response
    finally:
        server.close()
        client.close()


def test_a_chunk_size_line_within_the_parsers_limit_is_waited_for_and_a_longer_one_refused(harness):
    # The parser takes lines up to limit_request_field_size (8190): one handed over sooner would make
    # its thread wait for the rest.
    conn, client = harness.connect(CHUNKED + b"1;" + b"e" * 5000)
    assert harness.ready == []
    client.sendall(b"e" * 3200)  # now over the limit without its end
    harness.turn()
    assert _refused(harness, conn) == (
        "ChunkSizeLineTooLong",
        "a chunk-size line of the chunked body, with its extensions, is longer than 8190 bytes",
    )


@pytest.mark.parametrize("size", [b"1", b"0"], ids=["chunk", "last-chunk"])
def test_a_chunk_size_line_over_the_parsers_limit_is_refused_even_when_it_came_whole(harness, size):
    # Handed over, the parser took it when one read brought it with its CRLF (a 60,000-byte extension was
    # served) and refused it otherwise (a 200,000-byte one): the answer depended on how it arrived.
    line = size + b";" + b"e" * 8189 + b"\r\n"
    assert len(line) == 8193  # one byte over the limit, with its CRLF
    conn, _ = harness.connect(CHUNKED + line + (b"a\r\n0\r\n\r\n" if size == b"1" else b"\r\n"))
    assert _refused(harness, conn)[0] == "ChunkSizeLineTooLong"


def test_a_chunk_size_line_at_the_parsers_limit_is_read(harness):
    line = b"1;" + b"e" * 8188 + b"\r\n"  # 8190 bytes and its CRLF
    conn, _ = harness.connect(CHUNKED + line + b"a\r\n0\r\n\r\n")
    assert harness.ready == [conn] and harness.refused == []


def test_an_http_1_1_head_without_host_is_refused_from_the_loop(harness):
    conn, _ = harness.connect(b"POST /enqueue HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
    name, detail = _refused(harness, conn)
    assert name == "MissingHost" and "no Host header" in detail


@pytest.mark.parametrize("field", [b"Host : a", b"host\t: a", b"HOST \t : a"])
def test_a_host_field_with_whitespace_before_its_colon_is_left_to_the_parser_not_called_missing(harness, field):
    # The parser refuses the malformed name itself (400 naming it); "no Host header" would send the client
    # after the wrong fault.
    conn, _ = harness.connect(b"GET /healthz HTTP/1.1\r\n" + field + b"\r\n\r\n")
    assert harness.ready == [conn] and harness.refused == []


@pytest.mark.parametrize("version", [b"1.2", b"1.9"])
def test_a_later_http_1_head_without_host_is_refused_as_an_http_1_1_one(harness, version):
    # gunicorn's parser takes HTTP/1.2 to 1.9, and the request was served without Host.
    conn, _ = harness.connect(b"GET /healthz HTTP/" + version + b"\r\nX: 1\r\n\r\n")
    name, detail = _refused(harness, conn)
    assert name == "MissingHost" and "no Host header" in detail


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n", b"GET / HTTP/1.1\r\nX: 1\r\nHost:a\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
        # Not HTTP/1.x: the parser refuses these request lines itself.
        b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/1.10\r\n\r\n", b"GET / HTTP/1.a\r\n\r\n", b"GET / XHTTP/1.1\r\n\r\n",
    ],
)  # fmt: skip
def test_a_head_with_host_or_not_of_http_1_1_or_later_is_not_refused_for_it(head):
    assert read_framing(head, BodyLimits()) == Framing(len(head))


def test_missing_host_of_a_parsed_request():
    assert missing_host((1, 1), [("X", "1")])
    assert missing_host((1, 2), [("X", "1")])
    assert missing_host((1, 9), [])
    assert not missing_host((1, 1), [("X", "1"), ("HOST", "a")])
    assert not missing_host((1, 0), [])
    assert not missing_host((2, 0), [])


@pytest.mark.parametrize(
    ("codings", "refused"),
    [(b"gzip, chunked", "gzip"), (b"Identity ,chunked", "identity"), (b"gzip\r\nTransfer-Encoding: chunked", "gzip")],
)
def test_a_transfer_coding_before_chunked_is_refused_501_from_the_loop(harness, codings, refused):
    conn, _ = harness.connect(b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + codings + b"\r\n\r\n")
    name, detail = _refused(harness, conn)
    assert name == "UnsupportedCoding"
    assert detail.startswith(f"Transfer-Encoding {refused!r} is not supported")
    assert harness.refused[0][1].code == 501


@pytest.mark.parametrize(
    "sent",
    [
        b"GET /healthz HTTP/1.1\nHost: a\n\n",
        b"GET /healthz HTTP/1.1\nHost: a",  # refused before the head's end: it would never end with CRLF CRLF
        b"\nGET / HTTP/1.1\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: 1\n\r\n",
        b"POST /enqueue HTTP/1.1\r\nHost: a\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_a_head_with_a_bare_lf_is_refused_from_the_loop(harness, sent):
    conn, _ = harness.connect(sent)
    name, detail = _refused(harness, conn)
    assert name == "BareLineFeed" and "bare LF" in detail
    assert harness.refused[0][1].code == 400


@pytest.mark.parametrize(
    "framing",
    [
        b"0\n\n",  # the last chunk's line
        b"0\r\n\n",  # the end of the trailer section
        b"0\r\nX-T: a\n\r\n",  # a trailer field
        b"2\n{}\r\n0\r\n\r\n",  # a chunk-size line
        b"2;e=1\n",  # a chunk-size line not yet followed by its data
    ],
)
def test_a_chunked_body_with_a_bare_lf_in_its_framing_is_refused_from_the_loop(harness, framing):
    # Its CRLF was waited for: held until REQUEST_TIMEOUT_S (10 s), then answered 408 or 400.
    conn, _ = harness.connect(CHUNKED + b'e\r\n{"payload": 1}\r\n' + framing)
    name, detail = _refused(harness, conn)
    assert name == "BareLineFeed" and "chunked body's framing" in detail
    assert harness.refused[0][1].code == 400


def test_a_bare_lf_in_chunk_data_or_split_from_its_cr_is_not_refused(harness):
    conn, client = harness.connect(CHUNKED + b"3\r\n{\n}\r\n0\r")
    client.sendall(b"\nX-T: a\r")
    harness.turn()
    client.sendall(b"\n\r\n")
    harness.turn()
    assert harness.ready == [conn] and harness.refused == []
    assert next(conn.parser).body.read() == b"{\n}"


def test_a_bare_lf_arriving_after_a_cr_is_not_taken_for_one(harness):
    conn, client = harness.connect(b"GET /healthz HTTP/1.1\r")
    client.sendall(b"\nHost: a\r")
    harness.turn()
    client.sendall(b"\n\r\n")
    harness.turn()
    assert harness.ready == [conn] and harness.refused == []


def test_a_bare_lf_sent_in_a_later_piece_is_refused_then(harness):
    conn, client = harness.connect(b"GET /healthz HTTP/1.1\r\n")
    assert harness.ready == [] and harness.refused == []
    client.sendall(b"Host: a\n")
    harness.turn()
    assert harness.refused and harness.refused[0][0] is conn


# The empty line gunicorn's parser skips before a request line (RFC 9112 section 2.2): the head the loop
# looks at starts after it, else its request line is taken for a field and the checks are missed.
def test_a_chunked_body_after_an_empty_line_is_read_here_not_by_a_thread(harness):
    # Handed over with its head alone, a thread waited on the socket for the body until the deadline.
    conn, client = harness.connect(b"\r\n" + CHUNKED + b"1\r\n{\r\n")
    assert harness.ready == [] and len(harness.reader) == 1
    client.sendall(b"0\r\n\r\n")
    harness.turn()
    assert harness.ready == [conn]
    # Decoded: a body of known length (the parser skips the empty line).
    assert harness.buffered(conn) == b"\r\nPOST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n{"
    assert next(conn.parser).body.read() == b"{"


def test_a_body_of_known_length_after_an_empty_line_is_read_whole(harness):
    request = b"\r\nPOST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd"
    conn, client = harness.connect(request[:-1])
    assert harness.ready == []
    client.sendall(request[-1:])
    harness.turn()
    assert harness.ready == [conn] and harness.buffered(conn) == request


def test_an_empty_line_sent_apart_from_the_head_is_skipped(harness):
    conn, client = harness.connect(b"\r")
    for piece in (b"\n", b"GET /healthz HTTP/1.1\r\n", b"\r\n"):
        assert harness.ready == [] and harness.refused == []
        client.sendall(piece)
        harness.turn()
    name, detail = _refused(harness, conn)
    assert name == "MissingHost" and "no Host header" in detail


@pytest.mark.parametrize(
    ("head", "refusal", "code"),
    [
        (b"POST /enqueue HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", "MissingHost", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", "MissingHost", 400),
        (b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "UnsupportedCoding", 501),
    ],
)
def test_a_head_after_an_empty_line_gets_the_loops_refusals(harness, head, refusal, code):
    conn, _ = harness.connect(b"\r\n" + head)
    assert _refused(harness, conn)[0] == refusal
    assert getattr(harness.refused[0][1], "code", 400) == code  # gunicorn answers 400 for an error without one


@pytest.mark.parametrize("sent", [b"\r\n\r\n", b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"])
def test_a_second_empty_line_is_refused_as_an_empty_request_line(harness, sent):
    # gunicorn's parser skips one: it reads the second as the request line and refuses it.
    conn, _ = harness.connect(sent)
    name, detail = _refused(harness, conn)
    assert name == "EmptyRequestLine" and "at most one empty line" in detail
    assert harness.refused[0][1].code == 400


def test_a_bare_lf_before_the_request_line_is_refused(harness):
    # gunicorn's parser skips CRLF only: a bare LF there is refused like one anywhere in the head.
    conn, _ = harness.connect(b"\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _refused(harness, conn)[0] == "BareLineFeed"


def test_the_empty_line_counts_against_the_head_bound(harness):
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + _fields(MAX_PREREAD_HEAD - 100)
    head += b"X: " + b"a" * (MAX_PREREAD_HEAD - len(head) - 7) + b"\r\n\r\n"
    assert len(head) == MAX_PREREAD_HEAD
    conn, _ = harness.connect(head)
    assert harness.ready == [conn]
    harness.ready.clear()
    conn, _ = harness.connect(b"\r\n" + head)
    assert _refused(harness, conn) == ("LimitRequestHeaders", "the request head is longer than 65536 bytes")


def test_a_request_line_over_the_bound_after_an_empty_line_is_refused_as_too_long_a_line(harness):
    conn, _ = harness.connect(b"\r\nGET /" + b"a" * MAX_PREREAD_HEAD)
    assert _refused(harness, conn) == ("LimitRequestLine", "the request line is longer than 4094 bytes")
