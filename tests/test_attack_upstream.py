"""A plugin that misbehaves: invalid responses, bodies where none may be, lengths that lie, and
its internal token echoed back towards the client."""

import logging
import re

import jwt
import pytest

from mint_proxy import ProxyMiddleware, Route, TokenIssuer

from .attack_rig import StartSite
from .conftest import PluginServer, StartProxy
from .utils import (
    SECRET,
    RawBackend,
    Response,
    assert_proxy_error,
    exchange,
    make_request,
    one_response,
    parse_responses,
    read_first,
    serve,
)

pytestmark = pytest.mark.anyio


INVALID_RESPONSES = [
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("cl-not-a-number", b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello"),
    ("cl-list-differing", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!"),
    ("cl-negative", b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"),
    ("te-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("unrequested-101", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"),
    ("cr-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 5\r\n\r\nhello"),
    ("lf-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: evil=1\r\nContent-Length: 5\r\n\r\nhello"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello"),
]


def keep_alive(port: int, *targets: str, methods: tuple[str, ...] = ()) -> tuple[list[Response], bool]:
    """Send the requests on one connection (the last with ``Connection: close``); parse every answer."""
    methods = methods or ("GET",) * len(targets)
    data = b"".join(
        make_request(t, *(["Connection: close"] if i == len(targets) - 1 else []), method=m)
        for i, (t, m) in enumerate(zip(targets, methods, strict=True))
    )
    raw, closed = exchange(port, data)
    return parse_responses(raw, methods=methods), closed


@pytest.mark.parametrize("answer", [pytest.param(a, id=i) for i, a in INVALID_RESPONSES])
def test_invalid_upstream_response_is_a_502_and_the_client_connection_carries_on(
    start_proxy: StartProxy, plugin: PluginServer, answer: bytes
) -> None:
    """A 502 (JSON, no upstream detail), and the next request on the same client connection works."""
    with RawBackend(lambda head, index: answer) as backend:
        proxy = start_proxy({"/bad": backend.url, "/good": plugin.url})
        responses, _ = keep_alive(proxy.port, "/bad/x", "/good/next")
    assert len(responses) == 2
    assert_proxy_error(responses[0], 502, "bad_gateway")
    assert "127.0.0.1" not in responses[0].json()["detail"]
    assert b"evil" not in b"".join(v for _, v in responses[0].headers)
    assert responses[1].status == 200 and responses[1].json()["raw_path"] == "/good/next"


@pytest.mark.parametrize(
    "method, answer, status",
    [
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", 204, id="204-with-length"),
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\nhello", 204, id="204-without-length"),
        pytest.param("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello", 304, id="304"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, id="head-with-length"),
        pytest.param(
            "HEAD",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            200,
            id="head-chunked",
        ),
    ],
)
def test_body_where_none_may_be_is_dropped_and_never_poisons_a_connection(
    start_proxy: StartProxy, plugin: PluginServer, method: str, answer: bytes, status: int
) -> None:
    """The stray bytes reach neither the client (they would become the next response) nor the next
    exchange on the pooled upstream connection (it is closed, not reused)."""
    with RawBackend(lambda head, index: answer, close=False) as backend:
        proxy = start_proxy({"/bad": backend.url, "/good": plugin.url})
        responses, _ = keep_alive(proxy.port, "/bad/1", "/bad/2", "/good/next", methods=(method, method, "GET"))
        assert backend.connections == 2
    assert [r.status for r in responses] == [status, status, 200]
    assert [r.body for r in responses[:2]] == [b"", b""]
    assert responses[2].json()["raw_path"] == "/good/next"


def test_204_response_never_carries_content_length(start_proxy: StartProxy) -> None:
    """RFC 9110 §8.6: never a Content-Length on a 204, even answering HEAD.

    Regression test: ``_http11.parse_response_head`` kept the plugin's length for HEAD even on a
    204, and asgi.py re-added it.
    """
    with RawBackend(lambda head, index: b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n") as backend:
        proxy = start_proxy({"/bad": backend.url})
        responses, _ = keep_alive(proxy.port, "/bad/x", methods=("HEAD",))
    assert responses[0].status == 204
    assert responses[0].values(b"content-length") == []


def test_content_length_longer_than_the_body_then_close_is_a_truncated_response(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """The client sees fewer bytes than the Content-Length the proxy sent, then the connection
    closes: never a complete response. A new connection works."""
    with RawBackend(lambda head, index: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello") as backend:
        proxy = start_proxy({"/bad": backend.url, "/good": plugin.url})
        responses, closed = keep_alive(proxy.port, "/bad/x", "/good/next")
        (truncated,) = responses  # the request after it on that connection is never answered
        assert closed and truncated.status == 200
        assert truncated.declared_length == 100 and truncated.body == b"hello" and not truncated.complete
        again, _ = keep_alive(proxy.port, "/good/again")
    assert again[0].json()["raw_path"] == "/good/again"
    assert [r["raw_path"] for r in plugin.app.seen] == ["/good/again"]


class TokenEcho:
    """A plugin that answers with the internal token it was given in several response headers."""

    def __init__(self) -> None:
        self.backend = RawBackend(self.answer)

    @staticmethod
    def answer(head: bytes, index: int) -> bytes:
        match = re.search(rb"(?im)^x-mint-internal-token: *([^\r\n]+)", head)
        token = match.group(1) if match else b"none"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Debug: token=%s\r\nSet-Cookie: t=%s; Path=/\r\n"
            b"X-Kept: yes\r\nSet-Cookie: theme=dark\r\n\r\nok" % (token, token)
        )


def test_plugin_echoing_its_token_in_response_headers_never_shows_it_to_the_client(
    start_site: StartSite, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy knows the token it minted for the request: any response header carrying it
    (Set-Cookie too) is dropped, and a warning names the plugin, never the token."""
    echo = TokenEcho()
    with echo.backend:
        site = start_site([Route("/peak", echo.backend.url, plugin="leaky")])
        with caplog.at_level(logging.WARNING, logger="mint_proxy"):
            raw = read_first(site.port, make_request(site.base + "/peak/x"))
    [sent] = echo.backend.requests
    token = re.search(rb"(?im)^x-mint-internal-token: *([^\r\n]+)", sent)
    assert token is not None and token.group(1) not in raw
    response = one_response(raw)
    assert response.status == 200 and response.body == b"ok"
    assert response.values(b"set-cookie") == [b"theme=dark"]
    assert response.header(b"x-kept") == b"yes" and response.header(b"x-debug") is None
    [warning] = [r for r in caplog.records if "internal token" in r.getMessage()]
    assert "leaky" in warning.getMessage() and "set-cookie, x-debug" in warning.getMessage()
    assert token.group(1).decode() not in caplog.text


def test_plugin_echoing_a_token_it_kept_from_before_a_renewal_never_shows_it_to_the_client(http: str) -> None:
    """A plugin that cached the token of its first request and sends it back later, after the proxy
    renewed the route's token: that older token is still valid for half its lifetime, so it is
    dropped like the current one (whatever token of the issuer a response header carries)."""
    kept: list[bytes] = []  # (in the plugin's process)

    def echo_the_first_token(head: bytes, index: int) -> bytes:
        token = re.search(rb"(?im)^x-mint-internal-token: *([^\r\n]+)", head)
        assert token is not None
        kept.append(token.group(1))
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Cached: %s\r\nX-Kept: yes\r\n\r\nok" % kept[0]

    now = [1_700_000_000.0]
    issuer = TokenIssuer(SECRET, ttl=600.0, clock=lambda: now[0])
    with RawBackend(echo_the_first_token) as plugin:
        middleware = ProxyMiddleware(None, routes={"/peak": plugin.url}, tokens=issuer)
        with serve(middleware, http=http) as proxy:
            first = read_first(proxy.port, make_request("/peak/a"))
            now[0] += 301  # past half the lifetime: the route's requests carry a new token
            second = read_first(proxy.port, make_request("/peak/b"))
        sent = [re.search(rb"(?im)^x-mint-internal-token: *([^\r\n]+)", head) for head in plugin.requests]
    tokens = [match.group(1) for match in sent if match is not None]
    assert len(tokens) == 2 and tokens[0] != tokens[1]
    assert jwt.decode(tokens[0], options={"verify_signature": False})["exp"] > now[0]  # (still valid)
    for raw in (first, second):
        response = one_response(raw)
        assert response.status == 200 and response.header(b"x-kept") == b"yes"
        assert response.header(b"x-cached") is None and tokens[0] not in raw


def test_plugin_refusing_a_websocket_with_its_token_never_shows_it_to_the_client(http: str) -> None:
    """A WebSocket refusal keeps WWW-Authenticate, unless it carries the plugin's token."""

    def refuse(head: bytes, index: int) -> bytes:
        token = re.search(rb"(?im)^x-mint-internal-token: *([^\r\n]+)", head)
        assert token is not None
        return b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer %s\r\nContent-Length: 0\r\n\r\n" % token.group(1)

    with RawBackend(refuse) as plugin:
        middleware = ProxyMiddleware(None, routes={"/peak": plugin.url}, tokens=TokenIssuer(SECRET))
        with serve(middleware, http=http) as proxy:
            handshake = (
                b"GET /peak/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            raw = read_first(proxy.port, handshake)
        token = re.search(rb"(?im)^x-mint-internal-token: *([^\r\n]+)", plugin.requests[0])
    assert token is not None and token.group(1) not in raw
    assert one_response(raw).status == 401
