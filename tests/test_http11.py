"""Strict HTTP/1.1 response parsing and the body readers, over plain bytes.

The reader tests deliver each response in pieces, split every way the network might split it,
as ``_upstream.Connection`` hands its reads over; ``tests/test_upstream.py`` tests the connection.
"""

import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings, strategies as st

from mint_proxy._http11 import (
    CHUNKED,
    LENGTH,
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    MAX_TRAILER_BYTES,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedReader,
    ContentLengthReader,
    ResponseHead,
    UntilCloseReader,
    _known_field_lines,
    _known_framing_lines,
    _known_status_lines,
    _read_framing,
    body_reader,
    parse_chunk_size,
    parse_response_head,
    read_head,
)


def parse(block: bytes, *, head_request: bool = False) -> ResponseHead:
    return parse_response_head(block, head_request=head_request)


# --- parse_response_head: status line ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "status"),
    [
        pytest.param(b"HTTP/1.1 200 OK", 200, id="with-reason"),
        pytest.param(b"HTTP/1.1 200", 200, id="without-reason"),
        pytest.param(b"HTTP/1.1 200 ", 200, id="empty-reason"),
        pytest.param(b"HTTP/1.1 404 Not Found", 404, id="reason-with-spaces"),
        pytest.param(b"HTTP/1.1 418 I'm a\tteapot", 418, id="reason-with-tab"),
        pytest.param(b"HTTP/1.1 200 D\xc3\xa9j\xc3\xa0", 200, id="reason-obs-text"),
        pytest.param(b"HTTP/1.1 100 Continue", 100, id="lowest"),
        pytest.param(b"HTTP/1.1 599 Custom", 599, id="highest"),
        pytest.param(b"HTTP/1.0 200 OK", 200, id="http-1.0"),
    ],
)
def test_valid_status_line_is_parsed(line: bytes, status: int) -> None:
    assert parse(line).status == status


@pytest.mark.parametrize(
    "line",
    [
        # versions other than HTTP/1.0 and HTTP/1.1
        pytest.param(b"HTTP/2 200 OK", id="http-2"),
        pytest.param(b"HTTP/2.0 200 OK", id="http-2.0"),
        pytest.param(b"HTTP/1.2 200 OK", id="http-1.2"),
        pytest.param(b"HTTP/1 200 OK", id="http-1"),
        pytest.param(b"http/1.1 200 OK", id="lowercase-http"),
        pytest.param(b"ICY 200 OK", id="icy"),
        # status codes that are not three digits from 100 to 599 (RFC 9110 §15: 600-999 are invalid)
        pytest.param(b"HTTP/1.1 600 Custom", id="600"),
        pytest.param(b"HTTP/1.1 999 Custom", id="999"),
        pytest.param(b"HTTP/1.1 2000 OK", id="four-digits"),
        pytest.param(b"HTTP/1.1 099 OK", id="leading-zero"),
        pytest.param(b"HTTP/1.1 20 OK", id="two-digits"),
        pytest.param(b"HTTP/1.1 OK", id="missing-code"),
        pytest.param(b"HTTP/1.1", id="version-only"),
        pytest.param(b"HTTP/1.1 2x0 OK", id="letter-in-code"),
        # spacing and characters
        pytest.param(b"HTTP/1.1  200 OK", id="two-spaces"),
        pytest.param(b" HTTP/1.1 200 OK", id="leading-space"),
        pytest.param(b"HTTP/1.1\t200 OK", id="tab-separator"),
        pytest.param(b"HTTP/1.1 200 O\x00K", id="nul-in-reason"),
        pytest.param(b"HTTP/1.1 200 O\rK", id="cr-in-reason"),
        pytest.param(b"HTTP/1.1 200 O\nK", id="lf-in-reason"),
        # not a status line at all
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"<html>", id="html"),
    ],
)
def test_invalid_status_line_is_an_error(line: bytes) -> None:
    with pytest.raises(ValueError, match="status line"):
        parse(line)


# --- parse_response_head: header lines ---------------------------------------------------------


def test_header_names_are_lowercased_and_order_and_repeats_kept() -> None:
    head = parse(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Type: text/plain\r\nSET-COOKIE: b=2\r\nContent-Length: 0"
    )

    assert head.headers == [
        (b"set-cookie", b"a=1"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"b=2"),
        (b"content-length", b"0"),
    ]


@pytest.mark.parametrize(
    ("line", "header"),
    [
        pytest.param(b"X-A: 1", (b"x-a", b"1"), id="plain"),
        pytest.param(b"X-A:1", (b"x-a", b"1"), id="no-space"),
        pytest.param(b"X-A: \t 1 \t ", (b"x-a", b"1"), id="whitespace-trimmed"),
        pytest.param(b"X-A: a  b\tc", (b"x-a", b"a  b\tc"), id="inner-whitespace-kept"),
        pytest.param(b"X-A:", (b"x-a", b""), id="empty-value"),
        pytest.param(b"X-A:   ", (b"x-a", b""), id="blank-value"),
        pytest.param(b"X-A: caf\xc3\xa9", (b"x-a", b"caf\xc3\xa9"), id="obs-text"),
        pytest.param(b"!#$%&'*+.^_`|~09az: 1", (b"!#$%&'*+.^_`|~09az", b"1"), id="every-token-char"),
    ],
)
def test_valid_header_line_is_parsed(line: bytes, header: tuple[bytes, bytes]) -> None:
    assert parse(b"HTTP/1.1 204 No Content\r\n" + line).headers == [header]


@pytest.mark.parametrize(
    "lines",
    [
        # obs-fold (RFC 9112 §5.2)
        pytest.param(b"X-A: 1\r\n 2", id="obs-fold-space"),
        pytest.param(b"X-A: 1\r\n\t2", id="obs-fold-tab"),
        # bare CR, bare LF, NUL, DEL
        pytest.param(b"X-A: 1\nX-B: 2", id="bare-lf-line-end"),
        pytest.param(b"X-A: 1\rX-B: 2", id="bare-cr-line-end"),
        pytest.param(b"X-A: a\nb", id="lf-in-value"),
        pytest.param(b"X-A: a\rb", id="cr-in-value"),
        pytest.param(b"X-A: a\x00b", id="nul-in-value"),
        pytest.param(b"X-A: a\x7fb", id="del-in-value"),
        pytest.param(b"X-A: a\x01b", id="control-in-value"),
        # names
        pytest.param(b": 1", id="empty-name"),
        pytest.param(b"X-A : 1", id="space-before-colon"),
        pytest.param(b"X-A\t: 1", id="tab-before-colon"),
        pytest.param(b" X-A: 1", id="leading-space"),
        pytest.param(b"X A: 1", id="space-in-name"),
        pytest.param(b"X(A): 1", id="paren-in-name"),
        pytest.param(b"X/A: 1", id="slash-in-name"),
        pytest.param(b"X@A: 1", id="at-in-name"),
        pytest.param(b'X"A: 1', id="quote-in-name"),
        pytest.param(b"X\xe9: 1", id="non-ascii-name"),
        pytest.param(b"X-A", id="no-colon"),
        # an empty line inside the head
        pytest.param(b"X-A: 1\r\n\r\nX-B: 2", id="empty-line"),
    ],
)
def test_invalid_header_line_is_an_error(lines: bytes) -> None:
    with pytest.raises(ValueError, match="header line"):
        parse(b"HTTP/1.1 200 OK\r\n" + lines)


# A response head as RFC 9112 §5 and §4 write it, in one expression: the rules the parser must keep.
_HEAD_GRAMMAR = re.compile(
    rb"HTTP/1\.[01] [1-5][0-9]{2}(?: [\t\x20-\x7e\x80-\xff]*)?"
    rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*)*"
)
_line_bytes = st.text(alphabet="aZ09-_.:;/ \t\r\n\x00\x7f\xe9", max_size=10).map(lambda text: text.encode("latin-1"))
_status_lines = st.sampled_from(
    [b"HTTP/1.1 200 OK", b"HTTP/1.0 204", b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 099 X", b"HTTP/1.1 200 O\x00K"]
) | _line_bytes.map(lambda tail: b"HTTP/1.1 200" + tail)
_field_lines = (
    st.sampled_from(
        [b"Content-Length: 13", b"content-length:7", b"Connection: close", b"Transfer-Encoding: chunked", b"X-A: \t1 "]
    )
    | _line_bytes
    | _line_bytes.map(lambda value: b"X-A:" + value)
)
_heads = st.builds(
    lambda status, fields: b"\r\n".join([status, *fields]), _status_lines, st.lists(_field_lines, max_size=4)
)


def _outcome(block: bytes) -> ResponseHead | str:
    try:
        return parse(block)
    except ValueError as exc:
        return f"ValueError: {exc}"


@settings(max_examples=500, deadline=None)
@given(block=_heads, earlier=st.lists(_heads, max_size=4))
def test_a_head_parses_the_same_whatever_heads_came_before(block: bytes, earlier: list[bytes]) -> None:
    """Lines remembered from earlier heads are a shortcut, never another rule: the same head, or the same refusal."""
    _known_status_lines.clear()
    _known_field_lines.clear()
    _known_framing_lines.clear()
    first = _outcome(block)
    for other in earlier:
        _outcome(other)

    assert _outcome(block) == first
    refused_a_line = isinstance(first, str) and first.endswith(("status line", "header line"))
    assert refused_a_line == (_HEAD_GRAMMAR.fullmatch(block) is None)


def test_remembered_lines_stay_few_and_short() -> None:
    """A plugin sending ever new header lines cannot grow the parser's memory of them without bound."""
    for number in range(3000):
        parse(b"HTTP/1.1 200 OK\r\nX-A: %d\r\nContent-Length: %d\r\nX-Long: %s" % (number, number, b"a" * 300))

    for known in (_known_field_lines, _known_framing_lines):
        assert 0 < len(known) <= 256
        assert all(len(line) <= 256 for line in known)


# --- parse_response_head: framing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "head_request", "framing", "content_length"),
    [
        # Content-Length
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3", False, LENGTH, 3, id="cl"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0", False, LENGTH, 0, id="cl-0"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3", False, LENGTH, 3, id="cl-identical-list"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3", False, LENGTH, 3, id="cl-identical-headers"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 007", False, LENGTH, 7, id="cl-leading-zeros"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: \t13 \t", False, LENGTH, 13, id="cl-padded"),
        pytest.param(b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 13", False, LENGTH, 13, id="cl-uppercase-name"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 18, False, LENGTH, int("1" * 18), id="cl-18-digits"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive", False, LENGTH, 3, id="cl-and-connection"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Content-Length: 3", False, UNTIL_CLOSE, None, id="cl-lookalike-name"),
        # chunked, any case
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False, CHUNKED, None, id="te-chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked", False, CHUNKED, None, id="te-capitalised"),
        # neither: the body ends when the plugin closes
        pytest.param(b"HTTP/1.1 200 OK", False, UNTIL_CLOSE, None, id="neither"),
        pytest.param(b"HTTP/1.0 200 OK", False, UNTIL_CLOSE, None, id="neither-http-1.0"),
        # no body: HEAD keeps the length it announces, the bodiless statuses do not
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10", True, NO_BODY, 10, id="head-cl"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", True, NO_BODY, None, id="head-te"),
        pytest.param(b"HTTP/1.1 200 OK", True, NO_BODY, None, id="head-neither"),
        pytest.param(b"HTTP/1.1 204 No Content\r\nContent-Length: 10", False, NO_BODY, None, id="204-cl"),
        pytest.param(b"HTTP/1.1 204 No Content", False, NO_BODY, None, id="204"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10", False, NO_BODY, None, id="304-cl"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked", False, NO_BODY, None, id="304-te"),
        pytest.param(b"HTTP/1.1 100 Continue", False, NO_BODY, None, id="100"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload", False, NO_BODY, None, id="103"),
        pytest.param(b"HTTP/1.1 205 Reset Content\r\nContent-Length: 0", False, LENGTH, 0, id="205-has-framing"),
    ],
)
def test_response_framing_follows_rfc_9112(
    block: bytes, head_request: bool, framing: int, content_length: int | None
) -> None:
    head = parse(block, head_request=head_request)

    assert (head.framing, head.content_length) == (framing, content_length)


@pytest.mark.parametrize(
    "fields",
    [
        # both Content-Length and Transfer-Encoding
        pytest.param(b"Content-Length: 3\r\nTransfer-Encoding: chunked", id="cl-and-te"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 3", id="te-and-cl"),
        # Content-Length that is not one plain decimal number
        pytest.param(b"Content-Length: +3", id="cl-plus-sign"),
        pytest.param(b"Content-Length: 0x3", id="cl-hex"),
        pytest.param(b"Content-Length: -1", id="cl-negative"),
        pytest.param(b"Content-Length:", id="cl-empty"),
        pytest.param(b"Content-Length: 3 3", id="cl-space-separated"),
        pytest.param(b"Content-Length: 3, 4", id="cl-list-different"),
        pytest.param(b"Content-Length: 3, abc", id="cl-list-mixed"),
        pytest.param(b"Content-Length: 3,", id="cl-list-trailing-comma"),
        pytest.param(b"Content-Length: 3\r\nContent-Length: 4", id="cl-headers-different"),
        pytest.param(b"Content-Length: 1111111111111111111", id="cl-19-digits"),
        # Transfer-Encoding other than exactly one 'chunked'
        pytest.param(b"Transfer-Encoding: gzip, chunked", id="te-gzip-chunked"),
        pytest.param(b"Transfer-Encoding: chunked, chunked", id="te-chunked-twice"),
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", id="te-two-headers"),
        pytest.param(b"Transfer-Encoding: identity", id="te-identity"),
        pytest.param(b"Transfer-Encoding: gzip", id="te-gzip"),
    ],
)
def test_ambiguous_response_framing_is_an_error(fields: bytes) -> None:
    with pytest.raises(ValueError):
        parse(b"HTTP/1.1 200 OK\r\n" + fields)


@pytest.mark.parametrize(
    ("block", "keep_alive"),
    [
        # HTTP/1.1 persists unless told to close
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0", True, id="1.1-default"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive", True, id="1.1-keep-alive"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: upgrade", True, id="1.1-other-token"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close", False, id="1.1-close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: Close", False, id="1.1-close-any-case"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: x, close", False, id="1.1-close-in-list"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: x\r\nConnection: close",
            False,
            id="1.1-close-in-second-header",
        ),
        pytest.param(b"HTTP/1.1 200 OK", False, id="1.1-until-close"),
        # HTTP/1.0 closes unless told to keep alive
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 0", False, id="1.0-default"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive", True, id="1.0-keep-alive"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive", True, id="1.0-any-case"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, close", False, id="1.0-close-wins"
        ),
    ],
)
def test_keep_alive_follows_version_and_connection_header(block: bytes, keep_alive: bool) -> None:
    assert parse(block).keep_alive is keep_alive


def test_transfer_encoding_on_http_1_0_response_closes_the_connection() -> None:
    head = parse(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive")

    assert head.keep_alive is False


@settings(max_examples=300, deadline=None)
@given(
    value=st.integers(1, 20).flatmap(lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)).map(str.encode)
    | st.text(alphabet="0123456789 \t,+-xa", max_size=22).map(str.encode)
    | st.sampled_from([b"\xb2", b"1\xb9"]),  # superscript digits: not digits in HTTP
    http10=st.booleans(),
    others=st.lists(st.sampled_from([b"Content-Type: text/plain", b"X-A: 1"]), max_size=2),
)
def test_one_content_length_shortcut_agrees_with_the_full_framing_rules(
    value: bytes, http10: bool, others: list[bytes]
) -> None:
    """The one-plain-Content-Length shortcut of ``parse_response_head`` is an optimisation, never a different rule."""
    block = b"\r\n".join([b"HTTP/1.0 200 OK" if http10 else b"HTTP/1.1 200 OK", *others, b"Content-Length: " + value])
    try:
        content_length, _, keep_alive = _read_framing([(b"content-length", value.strip(b" \t"))], http10)
    except ValueError:
        with pytest.raises(ValueError):
            parse(block)
        return

    head = parse(block)

    assert (head.framing, head.content_length, head.keep_alive) == (LENGTH, content_length, keep_alive)


# --- parse_chunk_size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "size"),
    [
        # hex, any case, leading zeros
        pytest.param(b"0", 0, id="zero"),
        pytest.param(b"a", 10, id="lower-hex"),
        pytest.param(b"A", 10, id="upper-hex"),
        pytest.param(b"1f", 31, id="two-digits"),
        pytest.param(b"0000000000000010", 16, id="16-digits-leading-zeros"),
        pytest.param(b"f" * 16, 2**64 - 1, id="16-digits-max"),
        # extensions are ignored
        pytest.param(b"5;a=b", 5, id="extension"),
        pytest.param(b'5;a="b c";d', 5, id="extensions-quoted"),
        pytest.param(b"5 ;a=b", 5, id="space-before-semicolon"),
        pytest.param(b"5\t;a=b", 5, id="tab-before-semicolon"),
        pytest.param(b"5 ", 5, id="trailing-space"),
    ],
)
def test_valid_chunk_size_is_parsed(line: bytes, size: int) -> None:
    assert parse_chunk_size(line) == size


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"1" * 17, id="17-digits"),
        pytest.param(b"-1", id="negative"),
        pytest.param(b"+1", id="plus-sign"),
        pytest.param(b"0x10", id="0x-prefix"),
        pytest.param(b"g", id="not-hex"),
        pytest.param(b" 5", id="leading-space"),
        pytest.param(b"5 5", id="two-numbers"),
        pytest.param(b";a=b", id="extension-only"),
        pytest.param(b"5\r", id="cr"),
        pytest.param(b"5;a\nb", id="lf-in-extension"),
    ],
)
def test_invalid_chunk_size_is_an_error(line: bytes) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        parse_chunk_size(line)


# --- reading a response: read_head and the body readers, over bytes split every way ------------


def pieces(data: bytes, split: int) -> Iterator[bytes]:
    """``data`` in pieces of ``split`` bytes (0: all at once)."""
    size = split or len(data) or 1
    for start in range(0, len(data), size):
        yield data[start : start + size]


def read_response(data: bytes, split: int, *, head_request: bool = False) -> tuple[ResponseHead, bytes, bytes | None]:
    """Read one response delivered in pieces, as the connection does: its head, its body, and the
    bytes after its end (``None``: the body has not ended). Raises what the readers raise."""
    buf = b""
    head: ResponseHead | None = None
    body: list[bytes] = []
    rest: bytes | None = None
    for piece in pieces(data, split):
        if head is None:
            searched = max(len(buf) - 3, 0)
            buf += piece
            head, start = read_head(buf, searched, head_request=head_request)
            if head is None:
                buf = buf[start:]
                continue
            reader = body_reader(head)
            piece = buf[start:]
        if rest is not None:
            rest += piece
            continue
        chunk, rest = reader(piece)
        body.append(chunk)
    if head is None:
        raise AssertionError("the head never completed")
    if not body:  # the head came in the last piece
        chunk, rest = reader(b"")
        body.append(chunk)
    return head, b"".join(body), rest


def read_body(
    reader: ContentLengthReader | ChunkedReader | UntilCloseReader, data: bytes, split: int
) -> tuple[bytes, bytes | None]:
    """Feed ``data`` to ``reader`` in pieces: the body it gave, and the bytes after the end (``None``: not ended)."""
    body: list[bytes] = []
    rest: bytes | None = None
    for piece in pieces(data, split):
        if rest is not None:
            rest += piece
            continue
        chunk, rest = reader(piece)
        body.append(chunk)
    return b"".join(body), rest


# Every test below runs with the bytes split every way the network might split them.
by_split = pytest.mark.parametrize("split", [1, 2, 3, 7, 0], ids=["1", "2", "3", "7", "whole"])

CL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world"
CHUNKED_BODY = b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
CHUNKED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY


@by_split
def test_content_length_body_is_read(split: int) -> None:
    head, body, rest = read_response(CL_RESPONSE, split)

    assert (head.status, head.framing, head.content_length) == (200, LENGTH, 11)
    assert head.headers == [(b"content-length", b"11"), (b"content-type", b"text/plain")]
    assert (body, rest) == (b"hello world", b"")


@by_split
def test_chunked_body_is_read_without_extensions_or_trailers(split: int) -> None:
    head, body, rest = read_response(CHUNKED_RESPONSE, split)

    assert head.framing == CHUNKED
    assert head.headers == [(b"transfer-encoding", b"chunked")]
    assert (body, rest) == (b"hello world", b"")


@by_split
@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="cl-0"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="chunked-0"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
    ],
)
def test_empty_body_is_read_and_complete(response: bytes, split: int) -> None:
    _, body, rest = read_response(response, split)

    assert (body, rest) == (b"", b"")


@by_split
def test_head_response_has_no_body_but_keeps_its_length(split: int) -> None:
    head, body, rest = read_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", split, head_request=True)

    assert (head.framing, head.content_length) == (NO_BODY, 10)
    assert (body, rest) == (b"", b"")


@by_split
def test_interim_responses_are_skipped(split: int) -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )

    head, body, rest = read_response(response, split)

    assert head.status == 200
    assert (body, rest) == (b"ok", b"")


def test_interim_heads_read_are_done_with_while_the_final_head_is_incomplete() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Le"

    assert read_head(data, 0, head_request=False) == (None, len(b"HTTP/1.1 100 Continue\r\n\r\n"))


@by_split
def test_unrequested_switching_protocols_is_an_error(split: int) -> None:
    with pytest.raises(ValueError, match="101"):
        read_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nraw", split)


@by_split
def test_invalid_response_head_is_an_error(split: int) -> None:
    with pytest.raises(ValueError, match="header line"):
        read_response(b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 0\r\n\r\n", split)


@pytest.mark.parametrize("split", [1, 4096, 0], ids=["1", "4096", "whole"])
def test_head_over_the_limit_is_an_error_however_it_arrives(split: int) -> None:
    response = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 2 * MAX_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n"

    with pytest.raises(ValueError, match="too large"):
        read_response(response, split)


def test_head_of_exactly_the_limit_is_read() -> None:
    block = b"HTTP/1.1 204 No Content\r\nX-Pad: "
    block += b"a" * (MAX_HEAD_BYTES - len(block))

    head, start = read_head(block + b"\r\n\r\n", 0, head_request=False)

    assert head is not None and head.status == 204
    assert start == MAX_HEAD_BYTES + 4


@by_split
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="size-not-hex"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="size-0x"),
        pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="size-empty"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no-crlf-after-data"),
        pytest.param(b"5\r\nhello\n0\r\n\r\n", id="lf-after-data"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n", id="data-longer-than-size"),
        pytest.param(b"5\nhello\r\n0\r\n\r\n", id="bare-lf-after-size"),
    ],
)
def test_invalid_chunk_framing_is_an_error(body: bytes, split: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        read_body(ChunkedReader(), body, split)


@by_split
def test_trailers_over_the_limit_are_an_error(split: int) -> None:
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 500) for i in range(MAX_TRAILER_BYTES // 500 + 1))

    with pytest.raises(ValueError, match="trailer"):
        read_body(ChunkedReader(), b"0\r\n" + trailers + b"\r\n", split)


@pytest.mark.parametrize("split", [1, 7, 0], ids=["1", "7", "whole"])
def test_one_trailer_line_over_the_limit_is_an_error_however_it_arrives(split: int) -> None:
    with pytest.raises(ValueError, match="trailer"):
        read_body(ChunkedReader(), b"0\r\nx-t: " + b"v" * MAX_TRAILER_BYTES + b"\r\n\r\n", split)


def test_trailer_limit_applies_to_each_body() -> None:
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 500) for i in range(MAX_TRAILER_BYTES // 500 // 2 + 1))

    for _ in range(3):  # three responses, each within the limit on its own
        assert read_body(ChunkedReader(), b"2\r\nok\r\n0\r\n" + trailers + b"\r\n", 0) == (b"ok", b"")


@pytest.mark.parametrize("split", [1, 7, 0], ids=["1", "7", "whole"])
def test_chunk_line_over_the_limit_is_an_error_however_it_arrives(split: int) -> None:
    body = b"2;" + b"e" * 2 * MAX_CHUNK_LINE + b"\r\nok\r\n0\r\n\r\n"

    with pytest.raises(ValueError, match="chunk size line"):
        read_body(ChunkedReader(), body, split)


def test_chunks_of_one_read_come_back_as_one_piece() -> None:
    reader = ChunkedReader()

    assert reader(b"2\r\nab\r\n3\r\ncde\r\n") == (b"abcde", None)
    assert reader(b"0\r\n\r\n") == (b"", b"")


@by_split
@pytest.mark.parametrize(
    ("response", "body", "extra"),
    [
        pytest.param(CL_RESPONSE + b"junk", b"hello world", b"junk", id="after-cl-body"),
        pytest.param(CHUNKED_RESPONSE + b"junk", b"hello world", b"junk", id="after-chunked-body"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\njunk", b"", b"junk", id="after-204"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\njunk", b"", b"junk", id="after-cl-0"),
    ],
)
def test_bytes_after_a_complete_body_are_what_is_left(response: bytes, body: bytes, extra: bytes, split: int) -> None:
    assert read_response(response, split)[1:] == (body, extra)


@pytest.mark.parametrize("reader", [ContentLengthReader(0), ContentLengthReader(2)], ids=["cl-0", "cl-2"])
def test_a_content_length_reader_called_after_the_end_gives_back_everything(reader: ContentLengthReader) -> None:
    read_body(reader, b"ok"[: reader.remaining], 0)

    assert reader(b"more") == (b"", b"more")


def test_a_chunked_reader_called_after_the_end_gives_back_everything() -> None:
    reader = ChunkedReader()
    reader(b"0\r\n\r\n")

    assert reader(b"more") == (b"", b"more")


@by_split
@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"],
    ids=["http-1.1", "http-1.0"],
)
def test_until_close_body_ends_only_when_the_connection_closes(head: bytes, split: int) -> None:
    parsed, body, rest = read_response(head + b"all of the body", split)

    assert parsed.framing == UNTIL_CLOSE
    assert (body, rest) == (b"all of the body", None)
    UntilCloseReader().read_eof()  # (a close is its end: no error)


@pytest.mark.parametrize(
    ("reader", "data"),
    [
        pytest.param(ContentLengthReader(10), b"hello", id="cl"),
        pytest.param(ChunkedReader(), b"5\r\nhello\r\n", id="chunked"),
        pytest.param(ChunkedReader(), b"0\r\n", id="chunked-before-trailers-end"),
    ],
)
def test_a_close_before_a_framed_body_ends_cuts_it_short(
    reader: ContentLengthReader | ChunkedReader, data: bytes
) -> None:
    assert reader(data)[1] is None

    with pytest.raises(ValueError, match="closed before the end"):
        reader.read_eof()


@pytest.mark.parametrize(
    ("reader", "data"),
    [
        pytest.param(ContentLengthReader(5), b"hello", id="cl"),
        pytest.param(ContentLengthReader(0), b"", id="no-body"),
        pytest.param(ChunkedReader(), b"5\r\nhello\r\n0\r\n\r\n", id="chunked"),
    ],
)
def test_a_close_after_a_framed_body_ended_is_no_error(
    reader: ContentLengthReader | ChunkedReader, data: bytes
) -> None:
    assert reader(data)[1] == b""

    reader.read_eof()


@pytest.mark.parametrize(
    ("block", "head_request", "reader", "length"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3", False, ContentLengthReader, 3, id="cl"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False, ChunkedReader, None, id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK", False, UntilCloseReader, None, id="until-close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3", True, ContentLengthReader, 0, id="head-request"),
        pytest.param(b"HTTP/1.1 304 Not Modified", False, ContentLengthReader, 0, id="304"),
    ],
)
def test_body_reader_follows_the_framing(block: bytes, head_request: bool, reader: type, length: int | None) -> None:
    chosen = body_reader(parse(block, head_request=head_request))

    assert type(chosen) is reader
    if isinstance(chosen, ContentLengthReader):
        assert chosen.remaining == length
