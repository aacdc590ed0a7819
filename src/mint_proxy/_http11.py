"""Strict HTTP/1.1 response parsing, as pure functions and readers over bytes (no I/O).

Only what a reverse proxy needs to read a plugin's response: the status line,
the header block, and the body framing (RFC 9112 §6.3). Anything ambiguous is a
``ValueError``; the caller turns it into a 502. We do not use h11 here: it costs
about 60 µs per exchange on this hardware, the whole CPU budget of a proxied
request (see docs/performance.md).

Reading a response, as ``_upstream.Connection`` does with the bytes the socket gives it:

* ``read_head(data, searched, head_request)`` finds and parses the final head at the
  start of ``data``, skipping interim (1xx) heads; ``None`` while the head is incomplete.
* ``body_reader(head)`` gives the reader for its body, one per exchange, like h11's
  ``_readers.py``: ``reader(data)`` returns ``(body, rest)``, the body bytes ``data`` held and
  ``None`` while the body goes on, else the bytes after its end (``b""`` when there are
  none; any other value means the peer sent more than one response's worth: never
  reuse the connection). ``reader.read_eof()`` says whether the peer closing the
  connection is the end of the body (it returns) or cuts it short (``ValueError``).
  A reader that raised has nothing more to give: the connection is closed.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024
MAX_TRAILER_BYTES = 16 * 1024  # all trailer fields of one response together

# Status codes are 100-599 (RFC 9110 §15: anything else is invalid, "process as 5xx": a 502 here).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9]{2})(?: [\t\x20-\x7e\x80-\xff]*+)?")
# A field line (RFC 9112 §5): a field value is VCHAR, SP, HTAB or obs-text only: no CR, LF,
# NUL or other controls, and a line starting with whitespace (obs-fold, §5.2) cannot match a
# field name. The quantifiers are possessive (*+, ++): no class contains the byte that follows
# it (":" after a name, end after a value), so backtracking could never help, and the engine
# skips saving the state for it (same language).
_FIELD_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]++:[\t\x20-\x7e\x80-\xff]*+")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")

# Chunked-body states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

# Body framing of a response.
NO_BODY = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]
    framing: int
    content_length: int | None
    keep_alive: bool


# Lines of heads already accepted, and what they parsed to. A plugin's responses repeat their
# head line for line: the status line, Server, Content-Type, and Date for a whole second; only
# Content-Length (and the odd ETag or Set-Cookie) varies per response. A dict lookup costs a
# fraction of checking a line anew. Filled only with lines the rules accepted, and only short
# ones; emptied when full, so they stay small whatever a plugin sends. Framing field lines
# (Content-Length, Transfer-Encoding, Connection) are kept apart: a line found among the
# others needs no framing check.
_known_status_lines: dict[bytes, tuple[bool, int]] = {}
_known_field_lines: dict[bytes, tuple[bytes, bytes]] = {}
_known_framing_lines: dict[bytes, tuple[bytes, bytes]] = {}
_MAX_KNOWN_LINES = 256
_MAX_KNOWN_LINE_BYTES = 256


def parse_response_head(block: bytes, head_request: bool) -> ResponseHead:
    """Parse a head (without its final CRLF CRLF); raise ``ValueError`` on anything off."""
    lines = block.split(b"\r\n")
    http10, status = _known_status_lines.get(lines[0]) or _status_line(lines[0])
    del lines[0]  # (the field lines are what is left: no copy)
    known = _known_field_lines
    headers = []
    framing_fields = []
    for line in lines:
        field = known.get(line)
        if field is None:
            field = _known_framing_lines.get(line) or _field_line(line)
            if field[0] in _FRAMING:
                framing_fields.append(field)
        headers.append(field)

    encodings: Sequence[bytes] = ()
    content_length, keep_alive = None, not http10
    if framing_fields:
        name, value = framing_fields[0]
        # The usual response has one plain Content-Length and nothing else to decide on: what
        # _read_framing would decide for it, in fewer steps (a property test in tests/test_http11.py
        # holds the two together). bytes.isdigit accepts ASCII digits only: _DIGITS without the regex.
        if len(framing_fields) == 1 and name == b"content-length" and value.isdigit() and len(value) <= 18:
            content_length = int(value)
        else:
            content_length, encodings, keep_alive = _read_framing(framing_fields, http10)

    if head_request or status < 200 or status in (204, 304):
        framing = NO_BODY
        if not head_request or status < 200 or status == 204:
            content_length = None  # RFC 9110 §8.6: never on 1xx/204; on 304 not passed on
    elif encodings:
        if len(encodings) != 1 or encodings[0].strip().lower() != b"chunked":
            raise ValueError("unsupported Transfer-Encoding")
        framing = CHUNKED
    elif content_length is not None:
        framing = LENGTH
    else:
        framing = UNTIL_CLOSE
        keep_alive = False
    return ResponseHead(status, headers, framing, content_length, keep_alive)


def _status_line(line: bytes) -> tuple[bool, int]:
    """Whether a status line is HTTP/1.0, and its status code; ``ValueError`` if it is not one."""
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ValueError("invalid status line")
    parsed = match[1] == b"0", int(match[2])
    if len(line) <= _MAX_KNOWN_LINE_BYTES:
        if len(_known_status_lines) >= _MAX_KNOWN_LINES:
            _known_status_lines.clear()
        _known_status_lines[line] = parsed
    return parsed


def _field_line(line: bytes) -> tuple[bytes, bytes]:
    """A field line as ``(lowercase name, value without surrounding whitespace)``; ``ValueError`` if it is not one."""
    if _FIELD_LINE.fullmatch(line) is None:
        raise ValueError("invalid header line")
    name, _, value = line.partition(b":")
    field = name.lower(), value.strip(b" \t")
    if len(line) <= _MAX_KNOWN_LINE_BYTES:
        known = _known_framing_lines if field[0] in _FRAMING else _known_field_lines
        if len(known) >= _MAX_KNOWN_LINES:
            known.clear()
        known[line] = field
    return field


def _read_framing(fields: list[tuple[bytes, bytes]], http10: bool) -> tuple[int | None, list[bytes], bool]:
    """Content-Length, Transfer-Encoding codings and keep-alive from the framing fields of a head."""
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    connection: list[bytes] = []
    for name, value in fields:
        if name == b"content-length":
            lengths += [v.strip() for v in value.split(b",")] if b"," in value else [value]
        elif name == b"transfer-encoding":
            encodings.append(value)
        else:
            connection += [t.strip() for t in value.lower().split(b",")]

    if connection:
        keep_alive = b"close" not in connection and (not http10 or b"keep-alive" in connection)
    else:
        keep_alive = not http10

    content_length = None
    if lengths:
        if not all(_DIGITS.fullmatch(v) for v in lengths) or (len(lengths) > 1 and len(set(lengths)) != 1):
            raise ValueError("invalid Content-Length")
        content_length = int(lengths[0])
    if encodings:
        if lengths:
            raise ValueError("both Content-Length and Transfer-Encoding")
        if http10:
            keep_alive = False  # RFC 9112 §6.1: faulty framing on HTTP/1.0, close after it
    return content_length, encodings, keep_alive


def parse_chunk_size(line: bytes) -> int:
    """Parse a chunk-size line (extensions ignored, RFC 9112 §7.1.1)."""
    match = _CHUNK_SIZE.fullmatch(line)
    if match is None:
        raise ValueError("invalid chunk size line")
    return int(match.group(1), 16)


def read_head(data: bytes, searched: int, head_request: bool) -> tuple[ResponseHead | None, int]:
    """Read the final response head at the start of ``data``: ``(head, where its body starts)``.

    Interim (1xx) heads before it are skipped (they are not forwarded). While the final head
    has not all arrived, returns ``(None, offset)``: keep ``data[offset:]`` (interim heads
    before ``offset`` are done with) and call again with more bytes. ``searched``: how far
    ``data`` was already searched for the end of the head, in vain (three bytes less than
    its length: the end may straddle the two reads). A head over ``MAX_HEAD_BYTES`` is a
    ``ValueError`` however it arrives, and so is ``101 Switching Protocols``: this reader
    never asks to switch.
    """
    start = 0
    while True:
        end = data.find(b"\r\n\r\n", searched)
        if end < 0 or end - start > MAX_HEAD_BYTES:
            if len(data) - start > MAX_HEAD_BYTES:
                raise ValueError("response head too large")
            return None, start
        head = parse_response_head(data[start:end], head_request)
        start = searched = end + 4
        if head.status >= 200:
            return head, start
        if head.status == 101:
            raise ValueError("101 Switching Protocols, never asked for")
        # 1xx interim responses (100, 102, 103) are not forwarded; read on.


class ContentLengthReader:
    """A body of exactly ``length`` bytes (``Content-Length``; ``0`` for a response without a body)."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    def __call__(self, data: bytes) -> tuple[bytes, bytes | None]:
        remaining = self.remaining
        size = len(data)
        if size < remaining:
            self.remaining = remaining - size
            return data, None
        self.remaining = 0
        if size == remaining:
            return data, b""
        return data[:remaining], data[remaining:]

    def read_eof(self) -> None:
        if self.remaining:
            raise ValueError("the connection closed before the end of the body")


class ChunkedReader:
    """A chunked body (RFC 9112 §7.1): chunk extensions ignored, trailer fields read and dropped.

    A chunk-size line is at most ``MAX_CHUNK_LINE`` bytes, the trailer fields at most
    ``MAX_TRAILER_BYTES`` together; anything longer is a ``ValueError``, however it arrives.
    Data of several chunks in one ``data`` comes back as one piece.
    """

    __slots__ = ("_state", "_remaining", "_buf", "_trailer_bytes")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0  # of the current chunk's data
        self._buf = b""  # an incomplete line (or CRLF) from the previous call
        self._trailer_bytes = 0

    def __call__(self, data: bytes) -> tuple[bytes, bytes | None]:
        if self._state == _DONE:  # (called again after the end: all of it is extra)
            return b"", data
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pieces: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, size - pos)
                pieces.append(data if take == size else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
                continue
            if state == _DATA_END:
                if size - pos < 2:
                    self._buf = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
                continue
            eol = data.find(b"\r\n", pos)
            longest = MAX_CHUNK_LINE if state == _SIZE else MAX_TRAILER_BYTES  # a trailer field is a field line
            if eol < 0 or eol - pos > longest:
                if size - pos > longest:
                    raise ValueError("chunk size line too long" if state == _SIZE else "trailer fields too large")
                self._buf = data[pos:]
                break
            line = data[pos:eol]
            pos = eol + 2
            if state == _SIZE:
                self._remaining = parse_chunk_size(line)
                self._state = _DATA if self._remaining else _TRAILER
            elif line:
                # Trailer fields are read and dropped (ASGI has no portable way to send them).
                self._trailer_bytes += len(line)
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    raise ValueError("trailer fields too large")
            else:
                self._state = _DONE
                return b"".join(pieces), data[pos:]
        return b"".join(pieces), None

    def read_eof(self) -> None:
        if self._state != _DONE:
            raise ValueError("the connection closed before the end of the chunked body")


class UntilCloseReader:
    """A body that ends when the connection closes (neither ``Content-Length`` nor chunked)."""

    __slots__ = ()

    def __call__(self, data: bytes) -> tuple[bytes, bytes | None]:
        return data, None

    def read_eof(self) -> None:
        pass


BodyReader = ContentLengthReader | ChunkedReader | UntilCloseReader


def body_reader(head: ResponseHead) -> BodyReader:
    """The reader for the body that follows ``head``."""
    framing = head.framing
    if framing == LENGTH:
        return ContentLengthReader(head.content_length or 0)
    if framing == CHUNKED:
        return ChunkedReader()
    if framing == UNTIL_CLOSE:
        return UntilCloseReader()
    return ContentLengthReader(0)
