"""Request framing attacks: ambiguous Content-Length and Transfer-Encoding, and a body framed anew.

Every request is refused before one byte reaches the plugin's socket, or reaches it with exactly
one unambiguous framing. The desync corpus (``test_desync.py``) is the same attack, case by case.
"""

import hashlib
import os

import pytest

from .attack_rig import FORWARDED, PROXY, SERVER, SMUGGLED, Rig, assert_refused, by_parser
from .backends import header_values
from .conftest import PluginServer, StartProxy
from .utils import (
    assert_proxy_error,
    assert_server_refused,
    async_wait_for,
    exchange,
    make_request,
    one_response,
    parse_responses,
    settled,
)

pytestmark = pytest.mark.anyio


CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"


FRAMING = [
    (
        "cl-and-te",
        make_request("/peak/x", "Content-Length: 3", "Transfer-Encoding: chunked", body=CHUNKED_ABC),
        PROXY,
        SERVER,
    ),
    ("te-gzip-chunked", make_request("/peak/x", "Transfer-Encoding: gzip, chunked", body=CHUNKED_ABC), SERVER, PROXY),
    (
        "te-chunked-chunked",
        make_request("/peak/x", "Transfer-Encoding: chunked, chunked", body=CHUNKED_ABC),
        SERVER,
        SERVER,
    ),
    (
        "te-chunked-twice",
        make_request("/peak/x", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked", body=CHUNKED_ABC),
        SERVER,
        SERVER,
    ),
    ("te-identity", make_request("/peak/x", "Transfer-Encoding: identity", body=b"abc"), SERVER, SERVER),
    ("cl-list-differing", make_request("/peak/x", "Content-Length: 3, 4", body=b"abcd"), SERVER, SERVER),
    (
        "cl-fields-differing",
        make_request("/peak/x", "Content-Length: 3", "Content-Length: 4", body=b"abcd"),
        SERVER,
        SERVER,
    ),
    ("cl-plus", make_request("/peak/x", "Content-Length: +3", body=b"abc"), SERVER, SERVER),
    ("cl-hex", make_request("/peak/x", "Content-Length: 0x3", body=b"abc"), SERVER, SERVER),
    ("cl-negative", make_request("/peak/x", "Content-Length: -1", body=b"abc"), SERVER, SERVER),
    ("cl-empty", make_request("/peak/x", "Content-Length: ", body=b"abc"), SERVER, SERVER),
    (
        "te-on-http-1.0",
        make_request("/peak/x", "Transfer-Encoding: chunked", version="HTTP/1.0", body=CHUNKED_ABC),
        PROXY,
        PROXY,
    ),
]


@pytest.mark.parametrize("data, h11, httptools", [pytest.param(*f[1:], id=f[0]) for f in FRAMING])
def test_ambiguous_framing_is_refused_before_a_byte_reaches_the_plugin(
    rig: Rig, data: bytes, h11: str, httptools: str
) -> None:
    """A 4xx (JSON with request id when the proxy answers), the plugin's socket sees nothing."""
    raw, _ = exchange(rig.port, data)
    assert_refused(one_response(raw), by_parser(rig.http, h11, httptools))
    rig.untouched()


@pytest.mark.parametrize("data, h11, httptools", [pytest.param(*f[1:], id=f[0]) for f in FRAMING])
def test_ambiguous_framing_refusal_closes_the_connection(rig: Rig, data: bytes, h11: str, httptools: str) -> None:
    """RFC 9112 §6.3: after refusing ambiguous framing the server closes the connection, so the
    bytes after the request (here a request to ``/trap``) never become a request of their own.

    Regression test: the proxy's 400 used to keep the connection open (fixed in errors.BadRequest).
    """
    raw, closed = exchange(rig.port, data + SMUGGLED)
    responses = parse_responses(raw)
    assert_refused(responses[0], by_parser(rig.http, h11, httptools))
    assert closed and len(responses) == 1
    assert rig.trap.connections == 0


# (id, lengths, outcome under h11, outcome under httptools)
REPEATED_LENGTHS = [
    ("list", ["Content-Length: 3, 3"], FORWARDED, SERVER),
    ("fields", ["Content-Length: 3", "Content-Length: 3"], FORWARDED, SERVER),
]


@pytest.mark.parametrize("lengths, h11, httptools", [pytest.param(*r[1:], id=r[0]) for r in REPEATED_LENGTHS])
def test_equal_repeated_content_length_reaches_the_plugin_at_most_as_one_length(
    rig: Rig, lengths: list[str], h11: str, httptools: str
) -> None:
    """``Content-Length: 3, 3`` (corpus severe.yaml "1000,1000") or two equal fields. httptools
    refuses both; h11 folds them into one ``3`` before the app exists (RFC 9110 §8.6 allows it), so
    the proxy cannot see the repetition (it refuses a list it can see: tests/test_headers.py). Never
    two lengths upstream."""
    raw, _ = exchange(rig.port, make_request("/peak/x", *lengths, "Connection: close", body=b"abc"))
    response = one_response(raw)
    if by_parser(rig.http, h11, httptools) == SERVER:
        assert_server_refused(response)
        rig.untouched()
    else:
        assert response.status == 200
        (seen,) = rig.peak.seen
        assert header_values(seen, "content-length") == ["3"] and seen["body_len"] == 3


def test_transfer_encoding_on_http_0_9_is_refused(rig: Rig) -> None:
    """Both servers pass ``HTTP/0.9`` through as http_version "0.9"; chunked framing does not exist there.

    Corpus ambiguous.yaml "Transfer-Encoding for HTTP/0.9"; RFC 9112 §6.1. Regression test: only
    HTTP/1.0 used to be refused.
    """
    raw, _ = exchange(
        rig.port, make_request("/peak/x", "Transfer-Encoding: chunked", version="HTTP/0.9", body=CHUNKED_ABC)
    )
    assert_proxy_error(one_response(raw), 400, "bad_request")
    rig.untouched()


async def test_chunked_request_is_framed_anew_with_the_exact_bytes(rig: Rig) -> None:
    """The client's chunk sizes, extensions and trailers stay behind; the plugin gets one
    ``Transfer-Encoding: chunked`` and exactly the body bytes."""
    body = os.urandom(70_000)
    pieces, pos = [], 0
    for size in (1, 4095, 65536, 4368):
        chunk = body[pos : pos + size]
        pieces.append(b"%x;ext=1\r\n" % len(chunk) + chunk + b"\r\n")
        pos += size
    data = make_request(
        "/peak/upload", "Transfer-Encoding: chunked", method="POST", body=b"".join(pieces) + b"0\r\n\r\n"
    )
    raw, _ = exchange(rig.port, data + SMUGGLED)
    response = one_response(raw)
    assert response.status == 200
    seen_body = response.json()
    assert (seen_body["body_len"], seen_body["body_sha256"]) == (70_000, hashlib.sha256(body).hexdigest())
    (seen,) = rig.peak.seen
    assert header_values(seen, "transfer-encoding") == ["chunked"]
    assert header_values(seen, "content-length") == []


async def test_content_length_request_keeps_its_length_upstream(rig: Rig) -> None:
    """A client Content-Length reaches the plugin as the same single Content-Length."""
    body = os.urandom(100_000)
    data = make_request("/peak/upload", "Content-Length: 100000", method="POST", body=body)
    raw, _ = exchange(rig.port, data + SMUGGLED)
    assert one_response(raw).json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    (seen,) = rig.peak.seen
    assert header_values(seen, "content-length") == ["100000"]
    assert header_values(seen, "transfer-encoding") == []


@pytest.mark.parametrize("bad_chunk", [b"-3\r\nabc\r\n", b"zz\r\nabc\r\n", b"3\r\nabcXY"])
async def test_malformed_chunk_after_the_head_never_completes_the_upstream_request(
    start_proxy: StartProxy, plugin: PluginServer, bad_chunk: bytes
) -> None:
    """A framing error the server finds mid-body, when the request may already stream upstream,
    aborts the upstream request: the plugin never receives a complete body. (Own proxy and plugin:
    whether the head went upstream before the error is a race, and must not leak into other tests.)"""
    proxy = start_proxy({"/peak": plugin.url})
    data = make_request("/peak/upload", "Transfer-Encoding: chunked", method="POST", body=b"5\r\nhello\r\n" + bad_chunk)
    raw, closed = exchange(proxy.port, data)
    assert_server_refused(one_response(raw))
    assert closed
    # The proxy's request has ended, and so has any request it began upstream.
    assert await async_wait_for(settled(proxy.server, plugin.server))
    for record in plugin.app.seen:
        assert record.get("disconnected") is True
