"""Why a request is refused from its head, in the words both servers answer and log.

gunicorn's parser refuses a body's framing it cannot trust (two Content-Length
fields, one that is not a number, chunked with a length, chunked in HTTP/1.0, a
Transfer-Encoding that does not end with chunked) as ``Invalid HTTP Header:
'CONTENT-LENGTH'``, which tells the client nothing of what was wrong;
``http.server`` (``python app.py``) refuses none of them. ``head_problem``
says why, for both: the development server refuses with it, and the gunicorn
worker words the parser's refusals with it.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import NamedTuple

from . import logs
from .request_reader import MissingHost, UnsupportedCoding

_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_KNOWN_CODINGS = frozenset(("chunked", "identity", "compress", "deflate", "gzip"))  # gunicorn's parser's


class BodyFraming(NamedTuple):
    """A body framing refused (400): gunicorn's parser refuses it once it has read the request line and the fields,
    which its access line then shows."""

    status: int
    detail: str


def without_token(token: str, text: str) -> str:
    """``text`` with every occurrence of the API token ``token`` replaced (a field value may have been lowercased),
    before it is cut to be quoted."""
    return logs.without_token_in_any_case(text, token)


def fields_message(fields: list[tuple[str, str]]) -> Message:
    """gunicorn's parsed header fields (``req.headers``) as ``http.server`` holds them."""
    message = Message()
    for name, value in fields:
        message[name] = value  # appends: a repeated field stays repeated
    return message


def head_problem(version: str, headers: Message, token: str = "") -> tuple[int, str] | None:
    """Why a request is refused from its head (``http.server``'s ``headers``) before the application: status, detail.

    gunicorn refuses these itself (service/request_reader.py and its parser); ``http.server`` does not: an HTTP/1.1
    (to 1.9) request without a Host, one of any version with more than one (400), a transfer coding other than
    chunked (501), a body whose length could be read two ways (400: Content-Length twice or not a number, with
    Transfer-Encoding, or chunked in HTTP/1.0), an expectation other than 100-continue (417). The API token
    ``token`` is left out of the values it quotes.
    """
    hosts = len(headers.get_all("Host", ()))
    if not hosts and (numbers := _VERSION.fullmatch(version)) and numbers[1] == "1" and numbers[2] != "0":
        return 400, str(MissingHost())  # required from HTTP/1.1 on (to 1.9)
    if hosts > 1:  # refused whatever the version, as gunicorn does
        return 400, f"the request has {hosts} Host headers: it must have one (RFC 9112 section 3.2)"
    fields = headers.get_all("Transfer-Encoding", ())
    codings = [coding.strip(" \t").lower() for field in fields for coding in field.split(",")]
    if codings and codings != ["chunked"]:
        # Werkzeug reads "chunked" alone; with any other list it would read no body at all.
        if codings[-1] == "chunked" and codings.count("chunked") == 1 and version != "HTTP/1.0":
            return 501, str(UnsupportedCoding(without_token(token, ", ".join(codings[:-1]))))
        if (unknown := _unknown_coding(codings)) is not None:
            return 501, str(UnsupportedCoding(without_token(token, unknown)))
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            return BodyFraming(400, "the Transfer-Encoding does not end with chunked: the body's length cannot be told")
        # "gzip, chunked" in HTTP/1.0: gunicorn's parser takes the codings it knows, then refuses chunked there.
    expectations = [value.strip(" \t").lower() for value in headers.get_all("Expect", ())]
    if any(value != "100-continue" for value in expectations):
        return 417, "the only expectation met is Expect: 100-continue"
    lengths = [length.strip(" \t") for length in headers.get_all("Content-Length", ())]
    if codings and lengths:
        return BodyFraming(
            400, "the request has both Content-Length and Transfer-Encoding: its body's length is ambiguous"
        )
    if codings and version == "HTTP/1.0":
        return BodyFraming(400, f"Transfer-Encoding is not allowed in an {version} request: send Content-Length")
    if len(lengths) > 1:
        return BodyFraming(400, "the request has more than one Content-Length header")
    if lengths and not (lengths[0].isascii() and lengths[0].isdigit()):
        return BodyFraming(400, f"Content-Length {without_token(token, lengths[0])[:20]!r} is not a number of bytes")
    return None


def unsupported_coding(field: str, token: str = "") -> UnsupportedCoding | None:
    """The 501 refusal, worded as ``head_problem`` words it, of the Transfer-Encoding field value ``field`` in which
    gunicorn's parser met a coding it does not know (its own words quote the whole value: "Unsupported transfer
    coding: 'x-zip'"): it names the first such, as the parser meets them. None if ``field`` holds none."""
    codings = [coding.strip(" \t").lower() for coding in field.split(",")]
    unknown = next((coding for coding in codings if coding not in _KNOWN_CODINGS), None)
    return None if unknown is None else UnsupportedCoding(without_token(token, unknown))


def _unknown_coding(codings: list[str]) -> str | None:
    """The first transfer coding gunicorn's parser does not know (it answers 501), the empty one of ``gzip,``
    among them, met before it finds the list malformed (400: ``chunked`` twice, or a coding after it), or None."""
    chunked = False
    for coding in codings:
        if coding not in _KNOWN_CODINGS:
            return coding
        if chunked:
            return None
        chunked = coding == "chunked"
    return None
