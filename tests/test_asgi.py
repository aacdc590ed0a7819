"""``ProxyMiddleware`` end to end: the proxy under a real uvicorn (h11 and httptools) in front of real
plugin servers, for routing, the headers a plugin gets, bodies both ways, errors and lifespan.

The upstream connection's own behaviours (retries, pooling, timeouts) are ``test_upstream.py``;
hostile input is the ``test_attack_*.py`` files.
"""

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest

from mint_proxy import ProxyMiddleware, Route, RouteTable, TokenIssuer, verify_internal_token

from .backends import GZIPPED, Plugin, header_values
from .conftest import PluginServer, StartProxy
from .utils import (
    SECRET,
    Recorder,
    assert_proxy_error,
    async_wait_for,
    parse_responses,
    raw_request,
    serve,
    status_of,
)

pytestmark = pytest.mark.anyio


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url, **kwargs)


# -- routing ----------------------------------------------------------------------------------


async def test_prefix_matches_only_at_segment_boundaries(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A prefix matches itself, itself plus '/', and paths below it; ``/peak-pickingX`` goes to the app."""
    proxy = start_proxy({"/peak-picking": plugin.url}, app=Recorder())
    for path in ("/peak-picking", "/peak-picking/", "/peak-picking/x/y"):
        response = await get(proxy.url + path)
        assert response.json()["raw_path"] == path
    response = await get(proxy.url + "/peak-pickingX")
    assert response.json() == {"platform": "/peak-pickingX"}
    assert len(plugin.app.seen) == 3


async def test_longest_prefix_wins(start_proxy: StartProxy, plugin: PluginServer, plugin2: PluginServer) -> None:
    """Of two matching prefixes the longer one routes; ``/a/bc`` is not under ``/a/b``."""
    proxy = start_proxy({"/a": plugin.url, "/a/b": plugin2.url})
    await get(proxy.url + "/a/b/c")
    await get(proxy.url + "/a/bc")
    assert [r["raw_path"] for r in plugin2.app.seen] == ["/a/b/c"]
    assert [r["raw_path"] for r in plugin.app.seen] == ["/a/bc"]


async def test_unmatched_paths_fall_through_to_the_app_untouched(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A path no route claims goes to the wrapped app as it came, and never to a plugin."""
    proxy = start_proxy({"/peak": plugin.url}, app=Recorder())
    response = await get(proxy.url + "/api/other/../thing")
    assert response.json() == {"platform": "/api/thing"}  # httpx normalised it; the proxy did not touch it
    assert plugin.app.seen == []


async def test_unmatched_path_without_app_is_a_json_404(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """With no app to fall through to, an unrouted path is the proxy's JSON 404 with its request id."""
    proxy = start_proxy({"/peak": plugin.url})
    response = await get(proxy.url + "/nope")
    assert response.status_code == 404
    assert response.json()["request_id"] == response.headers["x-request-id"]


async def test_matching_is_relative_to_mount_path(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin receives the full path, mount path included."""
    proxy = start_proxy({"/peak": plugin.url}, app=Recorder(), mount_path="/api")
    response = await get(proxy.url + "/api/peak/run?x=1")
    assert response.json()["raw_path"] == "/api/peak/run"
    assert (await get(proxy.url + "/peak/run")).json() == {"platform": "/peak/run"}
    assert (await get(proxy.url + "/apix/peak")).json() == {"platform": "/apix/peak"}


@pytest.mark.parametrize(
    "target",
    [
        b"/peak/../admin",
        b"/peak/./x",
        b"/peak/%2e%2e/admin",
        b"/peak/%2E%2E/admin",
        b"/peak/.%2e/admin",
        b"/peak/x/..",
        b"/other/../peak/x",  # resolves into a route
        b"/peak/%2e/x",
    ],
)
def test_dot_segments_are_refused_and_never_forwarded(
    start_proxy: StartProxy, plugin: PluginServer, target: bytes
) -> None:
    """A path with '.' or '..' segments (plain or encoded) under a route is a 400 with a request id;
    the plugin sees nothing."""
    proxy = start_proxy({"/peak": plugin.url}, app=Recorder())
    response = raw_request(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 400
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "bad_request" and re.fullmatch("[0-9a-f]{32}", body["request_id"])
    assert plugin.app.seen == []


def test_double_encoded_dots_are_not_decoded_twice(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """%252e%252e is the literal text %2e%2e to the plugin, forwarded as sent."""
    proxy = start_proxy({"/peak": plugin.url})
    response = raw_request(proxy.port, b"GET /peak/%252e%252e/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert plugin.app.seen[0]["raw_path"] == "/peak/%252e%252e/x"


def test_raw_path_and_query_reach_the_plugin_byte_for_byte(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin gets the client's raw path and query exactly as sent: no decoding, no re-encoding."""
    proxy = start_proxy({"/peak": plugin.url})
    target = b"/peak/a%2Fb/c%20d/%7Euser?x=%41&y=&z=a+b"
    response = raw_request(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    seen = plugin.app.seen[0]
    assert seen["raw_path"] == "/peak/a%2Fb/c%20d/%7Euser"
    assert seen["query_string"] == "x=%41&y=&z=a+b"


async def test_strip_prefix_and_base_path(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """X-Forwarded-Prefix tells the plugin what was stripped."""
    routes = RouteTable([Route("/peak", plugin.url + "/base", strip_prefix=True)])
    proxy = start_proxy(routes, mount_path="/api")
    seen = (await get(proxy.url + "/api/peak/run?x=1")).json()
    assert seen["raw_path"] == "/base/run" and seen["query_string"] == "x=1"
    assert header_values(seen, "x-forwarded-prefix") == ["/api/peak"]
    assert (await get(proxy.url + "/api/peak")).json()["raw_path"] == "/base"


def test_a_query_reaches_the_plugin_fragment_and_all(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The query does not route: what the ASGI server put in it, the plugin gets (as in-process)."""
    proxy = start_proxy({"/peak": plugin.url})
    response = raw_request(proxy.port, b"GET /peak/x?q=%C3%A9&r=a#b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert plugin.app.seen[0]["query_string"].startswith("q=%C3%A9&r=a")


def test_strip_prefix_keeps_the_rest_of_the_path_encoded_as_sent(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Stripping a prefix matched on the decoded path leaves the rest of the raw path as the client encoded it."""
    routes = RouteTable([Route("/peak", plugin.url, strip_prefix=True)])
    proxy = start_proxy(routes)
    response = raw_request(proxy.port, b"GET /pe%61k/x%2Fy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert plugin.app.seen[0]["raw_path"] == "/x%2Fy"


@pytest.mark.parametrize("base", ["", "/base"])
def test_strip_prefix_at_an_encoded_slash_starts_the_plugins_path_there(
    start_proxy: StartProxy, plugin: PluginServer, base: str
) -> None:
    """The route matched the decoded '/peak/x/y'; the plugin's path starts at that '/'."""
    proxy = start_proxy(RouteTable([Route("/peak", plugin.url + base, strip_prefix=True)]))
    response = raw_request(proxy.port, b"GET /peak%2Fx%2Fy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert plugin.app.seen[0]["raw_path"] == base + "/x%2Fy"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param(b"a HTTP/1.0 b", 400, id="space"),
        pytest.param(b"a\tb", 400, id="tab"),
        pytest.param(b"a\r\nGET / HTTP/1.1", 400, id="crlf"),
        pytest.param(b"a\x00b", 400, id="nul"),
        pytest.param(b"a\x7fb", 400, id="del"),
        pytest.param(b"q=caf\xc3\xa9", 400, id="raw-utf8"),  # (uvicorn refuses it too: the plugin would)
        pytest.param(b"q=caf%C3%A9&r=a?b|{}^`", 200, id="printable-ascii"),
    ],
)
async def test_a_query_that_is_not_printable_ascii_is_refused(plugin: PluginServer, query: bytes, status: int) -> None:
    """Uvicorn refuses such targets itself; an ASGI server that splits an HTTP/2 :path on '?'
    may not (a hand-built scope). The request line the plugin parses must keep its three parts."""
    proxy = ProxyMiddleware(None, routes={"/peak": plugin.url}, tokens=TokenIssuer(SECRET))
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "2",
        "method": "GET",
        "scheme": "https",
        "path": "/peak/x",
        "raw_path": b"/peak/x",
        "query_string": query,
        "headers": [(b"host", b"mint.example")],
        "client": ("10.0.0.1", 5000),
    }
    await proxy(scope, receive, send)
    proxy.pool.close()

    assert sent[0]["status"] == status
    if status == 400:
        assert b"query string must be printable ASCII" in sent[1]["body"]
        assert plugin.app.seen == []
    else:
        assert plugin.app.seen[0]["query_string"].encode("latin-1") == query


async def test_unix_socket_upstream(start_proxy: StartProxy) -> None:
    """A route to a ``unix:`` URL reaches a plugin listening on a Unix socket."""
    app = Plugin()
    with serve(app, uds=True) as running:
        proxy = start_proxy({"/peak": running.url})
        response = await get(proxy.url + "/peak/x")
        assert response.status_code == 200 and response.json()["raw_path"] == "/peak/x"


async def test_route_table_changes_while_requests_are_in_flight(
    start_proxy: StartProxy, plugin: PluginServer, plugin2: PluginServer
) -> None:
    """A request in flight keeps the route it matched; the next request sees the table as it is now."""
    proxy = start_proxy({"/peak": plugin.url})
    async with httpx.AsyncClient(timeout=10) as client:
        held = asyncio.ensure_future(client.get(proxy.url + "/peak/held"))
        assert await async_wait_for(lambda: bool(plugin.app.seen))
        proxy.routes.set("/peak", plugin2.url)
        proxy.routes.remove("/peak")
        plugin.app.release.set()
        assert (await held).json() == {"held": True}
        assert (await client.get(proxy.url + "/peak/x")).status_code == 404
        proxy.routes.replace({"/peak": plugin2.url})
        assert (await client.get(proxy.url + "/peak/x")).status_code == 200
    assert len(plugin2.app.seen) == 1


# -- headers to the plugin --------------------------------------------------------------------


def test_end_to_end_headers_pass_in_order_and_nothing_is_added(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """No User-Agent, Accept-Encoding or cookies from an HTTP client library."""
    proxy = start_proxy({"/peak": plugin.url})
    request = (
        b"GET /peak/x HTTP/1.1\r\nHost: platform.example\r\nAuthorization: Bearer user-jwt\r\n"
        b"X-Custom: 1\r\nCookie: session=abc\r\nX-Custom: 2\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw_request(proxy.port, request)) == 200
    headers = plugin.app.seen[0]["headers"]
    assert headers[:5] == [
        ["host", "platform.example"],
        ["authorization", "Bearer user-jwt"],
        ["x-custom", "1"],
        ["cookie", "session=abc"],
        ["x-custom", "2"],
    ]
    names = [n for n, _ in headers]
    assert "user-agent" not in names and "accept-encoding" not in names and "accept" not in names


async def test_cookies_never_carry_over_between_requests(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The upstream client has no cookie jar: a cookie a plugin set is never sent on a later request."""
    proxy = start_proxy({"/peak": plugin.url})
    response = await get(proxy.url + "/peak/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    seen = (await get(proxy.url + "/peak/echo")).json()
    assert header_values(seen, "cookie") == []


def test_client_forwarding_headers_are_replaced_from_the_scope(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The client's X-Forwarded-*, Forwarded, X-Real-IP (and aliases) and Expect never reach the plugin;
    X-Forwarded-* come from the scope."""
    proxy = start_proxy({"/peak": plugin.url})
    request = (
        b"GET /peak/x HTTP/1.1\r\nHost: platform.example:8001\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        b"X_Forwarded_For: 6.6.6.6\r\nExpect: 100-continue\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw_request(proxy.port, request)) == 200
    seen = plugin.app.seen[0]
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["platform.example:8001"]
    assert header_values(seen, "x-forwarded-prefix") == []
    for name in ("forwarded", "x-real-ip", "x_forwarded_for", "expect"):
        assert header_values(seen, name) == []
    assert [v for v in header_values(seen, "via") if re.fullmatch(r"1\.1 mint-proxy-[0-9a-f]{8}", v)]


def test_forwarded_for_follows_the_servers_trust_decision(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """With uvicorn --forwarded-allow-ips trusting the sender, the scope (and so XFF) has the real client."""
    proxy = start_proxy({"/peak": plugin.url}, trust_forwarded=True)
    request = b"GET /peak/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.2.3\r\nConnection: close\r\n\r\n"
    assert status_of(raw_request(proxy.port, request)) == 200
    assert header_values(plugin.app.seen[0], "x-forwarded-for") == ["10.1.2.3"]


def test_hop_by_hop_headers_are_removed(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Hop-by-hop headers are removed, including the headers Connection names, but never the proxy's own."""
    proxy = start_proxy({"/peak": plugin.url})
    request = (
        b"GET /peak/x HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret, X-Mint-Internal-Token, X-Request-Id, Via\r\n"
        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eDp5\r\nX-Kept: yes\r\n\r\n"
    )
    assert status_of(raw_request(proxy.port, request)) == 200
    seen = plugin.app.seen[0]
    names = [n for n, _ in seen["headers"]]
    for name in (
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ):
        assert name not in names
    assert header_values(seen, "x-kept") == ["yes"]
    assert len(header_values(seen, "x-mint-internal-token")) == 1
    assert len(header_values(seen, "x-request-id")) == 1
    assert len(header_values(seen, "via")) == 1


def test_client_internal_token_and_its_aliases_are_replaced(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A forged internal token, in any spelling, is dropped: the plugin gets exactly one, the proxy's, valid for it."""
    proxy = start_proxy({"/peak": plugin.url})
    request = (
        b"GET /peak/x HTTP/1.1\r\nHost: x\r\nX-Mint-Internal-Token: forged\r\nX_Mint_Internal_Token: forged\r\n"
        b"X.Mint.Internal.Token: forged\r\nx-mint-internal-token: forged\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw_request(proxy.port, request)) == 200
    seen = plugin.app.seen[0]
    names = [n for n, _ in seen["headers"]]
    assert "x_mint_internal_token" not in names and "x.mint.internal.token" not in names
    (token,) = header_values(seen, "x-mint-internal-token")
    assert verify_internal_token(token, SECRET, plugin="peak").plugin == "peak"


async def test_each_route_gets_a_token_scoped_to_its_plugin(
    start_proxy: StartProxy, plugin: PluginServer, plugin2: PluginServer
) -> None:
    """Each route's plugin gets a token whose subject is that plugin."""
    routes = RouteTable([Route("/peak", plugin.url), Route("/lcms", plugin2.url, plugin="lcms-sequence")])
    proxy = start_proxy(routes)
    await get(proxy.url + "/peak/x")
    await get(proxy.url + "/lcms/x")
    (token,) = header_values(plugin2.app.seen[0], "x-mint-internal-token")
    assert verify_internal_token(token, SECRET, plugin="lcms-sequence").plugin == "lcms-sequence"


async def test_plugin_cannot_leak_internal_headers_to_the_client(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A plugin's internal token and its own X-Request-Id never reach the client; the client's request id does."""
    proxy = start_proxy({"/peak": plugin.url})
    response = await get(proxy.url + "/peak/leak", headers={"X-Request-Id": "client-id-1"})
    assert "x-mint-internal-token" not in response.headers and "x_mint_internal_token" not in response.headers
    assert response.headers.get_list("x-request-id") == ["client-id-1"]


@pytest.mark.parametrize(
    "sent, kept",
    [
        ([b"abc-123"], True),
        ([b"a" * 128], True),
        ([b"A.b_c:d-9"], True),
        ([], False),
        ([b"a" * 129], False),
        ([b"has space"], False),
        ([b"semi;colon"], False),
        ([b"\xc3\xa9t\xc3\xa9"], False),
        ([b"one", b"two"], False),  # several values: replaced by one new id
    ],
)
def test_request_id_kept_when_valid_else_replaced(
    start_proxy: StartProxy, plugin: PluginServer, sent: list[bytes], kept: bool
) -> None:
    """Exactly one X-Request-Id reaches the plugin, and the response carries the same."""
    proxy = start_proxy({"/peak": plugin.url})
    lines = b"".join(b"X-Request-Id: " + value + b"\r\n" for value in sent)
    response = raw_request(proxy.port, b"GET /peak/x HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n")
    assert status_of(response) == 200
    (seen_id,) = header_values(plugin.app.seen[0], "x-request-id")
    returned = re.findall(rb"(?i)\r\nx-request-id: ([^\r]*)", response)
    assert returned == [seen_id.encode("latin-1")]
    if kept:
        assert seen_id.encode("latin-1") == sent[0]
    else:
        assert re.fullmatch("[0-9a-f]{32}", seen_id)


# -- bodies -----------------------------------------------------------------------------------


async def test_request_body_streams_to_the_plugin_chunk_by_chunk(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin has the first chunk before the client produces the second: nothing buffers the body."""
    proxy = start_proxy({"/peak": plugin.url})
    first_arrived = threading.Event()
    had_first: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"first-chunk"
        had_first.append(await asyncio.to_thread(first_arrived.wait, 5))
        yield b"second-chunk"

    original = plugin.app.read_body

    async def counting_read_body(receive: Any, record: dict[str, Any]) -> bytes:
        async def counting_receive() -> Any:
            message = await receive()
            if message.get("body"):
                first_arrived.set()
            return message

        return await original(counting_receive, record)

    plugin.app.read_body = counting_read_body  # type: ignore[method-assign]
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(proxy.url + "/peak/upload", content=body())
    assert had_first == [True]
    assert response.json()["body_len"] == len(b"first-chunksecond-chunk")
    assert header_values(plugin.app.seen[0], "transfer-encoding") == ["chunked"]


@pytest.mark.parametrize("http_version", ["2", "3"])
async def test_http2_request_without_framing_headers_still_sends_its_body(
    plugin: PluginServer, http_version: str
) -> None:
    """In HTTP/2 and 3 a body needs no Content-Length (RFC 9113 §8.1): it is read and forwarded.

    A hand-built scope, since uvicorn only speaks HTTP/1.x; the plugin is a real server.
    """
    proxy = ProxyMiddleware(None, routes={"/peak": plugin.url}, tokens=TokenIssuer(SECRET))
    messages = [
        {"type": "http.request", "body": b"part one, ", "more_body": True},
        {"type": "http.request", "body": b"part two", "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": http_version,
        "method": "POST",
        "scheme": "https",
        "path": "/peak/upload",
        "raw_path": b"/peak/upload",
        "query_string": b"",
        "headers": [(b"host", b"mint.example")],
        "client": ("10.0.0.1", 5000),
    }
    await proxy(scope, receive, send)  # type: ignore[arg-type]
    proxy.pool.close()

    assert sent[0]["status"] == 200
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["body_len"] == len(b"part one, part two")
    assert header_values(plugin.app.seen[0], "transfer-encoding") == ["chunked"]


SMUGGLED = b"GET /peak/smuggled HTTP/1.1\r\nhost: x\r\n\r\n"


@pytest.mark.parametrize("rewrite", [lambda body: body + SMUGGLED, lambda body: body[:2]], ids=["longer", "shorter"])
def test_a_body_that_does_not_match_its_content_length_never_reaches_the_plugin(
    plugin: PluginServer, http: str, rewrite: Any
) -> None:
    """A middleware in front that rewrites the body but not Content-Length. Forwarded as is,
    a longer body would be a second request to the plugin, a shorter one a hang: 400 instead."""
    proxy = ProxyMiddleware(
        None, routes=RouteTable([Route("/peak", plugin.url, read_timeout=2)]), tokens=TokenIssuer(SECRET)
    )

    async def rewriting(scope: Any, receive: Any, send: Any) -> None:
        async def receive_rewritten() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                message = {**message, "body": rewrite(message.get("body", b""))}
            return message

        await proxy(scope, receive_rewritten if scope["type"] == "http" else receive, send)

    with serve(rewriting, http=http, lifespan="auto") as running:
        response = httpx.post(running.url + "/peak/echo", content=b"abcd", timeout=10)
    assert response.status_code == 400
    assert "Content-Length" in response.json()["detail"]
    assert plugin.app.seen == []


async def test_response_streams_event_by_event(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The first chunk of a response reaches the client while the plugin waits to send the next:
    nothing buffers the response (the plugin sends the rest only once the client has the first)."""
    proxy = start_proxy({"/peak": plugin.url})
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            async with client.stream("GET", proxy.url + "/peak/gated?chunks=50") as response:
                iterator = response.aiter_raw()
                first = await iterator.__anext__()
                assert first == b"xxxxx"
                plugin.app.release.set()
                rest = b"".join([chunk async for chunk in iterator])
    finally:
        plugin.app.release.set()
    assert len(first + rest) == 250
    assert plugin.app.events[:2] == ["sent 0", "released"]


async def test_server_sent_events_arrive_intact(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A text/event-stream response reaches the client event for event, content type kept."""
    proxy = start_proxy({"/peak": plugin.url})
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("GET", proxy.url + "/peak/sse?events=3") as response:
            assert response.headers["content-type"] == "text/event-stream"
            lines = [line async for line in response.aiter_lines() if line]
    assert lines == ["data: event 0", "data: event 1", "data: event 2"]


async def test_content_length_kept_when_known_else_chunked(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A response keeps the plugin's Content-Length when it sent one, else it is chunked; a request's
    Content-Length: 0 is forwarded."""
    proxy = start_proxy({"/peak": plugin.url})
    known = await get(proxy.url + "/peak/stream?chunks=3&size=10&length=1")
    assert known.headers["content-length"] == "30" and "transfer-encoding" not in known.headers
    unknown = await get(proxy.url + "/peak/stream?chunks=3&size=10")
    assert unknown.headers["transfer-encoding"] == "chunked" and "content-length" not in unknown.headers
    seen = (await get(proxy.url + "/peak/echo", headers={"content-length": "0"})).json()
    assert header_values(seen, "content-length") == ["0"]


async def test_gzip_response_passes_through_byte_identical(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A gzip-encoded response reaches the client byte for byte, still encoded."""
    proxy = start_proxy({"/peak": plugin.url})
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("GET", proxy.url + "/peak/gzip") as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert raw == GZIPPED


@pytest.mark.parametrize(
    "method, path, status",
    [("HEAD", "/peak/echo", 200), ("GET", "/peak/status?code=204", 204), ("GET", "/peak/status?code=304", 304)],
)
def test_head_204_and_304_carry_no_body(
    start_proxy: StartProxy, plugin: PluginServer, method: str, path: str, status: int
) -> None:
    """HEAD, 204 and 304 responses carry no body, and the next request on the same client connection still works."""
    proxy = start_proxy({"/peak": plugin.url})
    first = f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    second = b"GET /peak/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses = parse_responses(raw_request(proxy.port, first + second), methods=(method, "GET"))
    assert [(r.status, r.body) for r in responses[:1]] == [(status, b"")]
    assert [r.status for r in responses] == [status, 200] and responses[1].complete


@pytest.mark.parametrize(
    "location, strip, expected",
    [
        ("{origin}/peak/next", False, "/peak/next"),
        ("{origin}/next?x=1", True, "/api/peak/next?x=1"),
        ("/next", True, "/api/peak/next"),
        ("/api/peak/next", False, "/api/peak/next"),
        ("https://elsewhere.example/x", False, "https://elsewhere.example/x"),
    ],
)
async def test_location_on_the_upstream_origin_is_rewritten(
    start_proxy: StartProxy, plugin: PluginServer, location: str, strip: bool, expected: str
) -> None:
    """A Location on the plugin's own origin is mapped back to the client's path (mount path and
    stripped prefix restored); others are kept."""
    proxy = start_proxy(RouteTable([Route("/peak", plugin.url, strip_prefix=strip)]), mount_path="/api")
    response = await get(proxy.url + "/api/peak/redirect", params={"to": location})
    assert response.status_code == 302
    assert response.headers["location"] == expected


async def test_body_over_the_route_limit_is_413_before_contacting_the_plugin(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A body over max_body_bytes is a 413 and the plugin is never contacted; a body at the limit passes."""
    proxy = start_proxy(RouteTable([Route("/peak", plugin.url, max_body_bytes=10)]))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(proxy.url + "/peak/upload", content=b"x" * 11)
        assert_proxy_error(response, 413)
        assert plugin.app.seen == []
        ok = await client.post(proxy.url + "/peak/upload", content=b"x" * 10)
        assert ok.json()["body_len"] == 10


async def test_streamed_body_over_the_limit_is_413_without_reading_the_rest(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A streamed body that crosses max_body_bytes is a 413 without the proxy reading the rest of it."""
    proxy = start_proxy(RouteTable([Route("/peak", plugin.url, max_body_bytes=100_000)]))
    produced = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(10_000):
            produced += 10_000
            yield b"x" * 10_000

    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.post(proxy.url + "/peak/upload", content=body())
        except httpx.HTTPError:
            pass  # the proxy may close the connection while the client is still sending
        else:
            assert_proxy_error(response, 413)
    assert produced < 50_000_000  # the proxy closed the connection instead of draining 100 MB


@pytest.mark.slow
async def test_large_streams_keep_memory_flat(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """256 MiB each way through the proxy; the whole test process grows < 64 MiB."""
    proxy = start_proxy({"/peak": plugin.url})
    size = 256 * 1024 * 1024
    peak = baseline = _rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    block = b"y" * (1024 * 1024)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    try:
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(proxy.url + "/peak/upload", content=upload())
            assert response.json()["body_len"] == size
            received = 0
            url = proxy.url + f"/peak/stream?chunks={size // 65536}&size=65536&length=1"
            async with client.stream("GET", url) as streamed:
                async for chunk in streamed.aiter_raw():
                    received += len(chunk)
            assert received == size
    finally:
        stop.set()
        sampler.join()
    assert peak - baseline < 64 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- errors -----------------------------------------------------------------------------------


async def test_client_disconnect_while_waiting_aborts_the_upstream(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A client that leaves while the plugin has not answered: the plugin sees its client (the proxy) go away."""
    proxy = start_proxy({"/peak": plugin.url})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET /peak/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await async_wait_for(lambda: bool(plugin.app.seen))
    assert await async_wait_for(lambda: "http.disconnect" in plugin.app.events)
    assert proxy.middleware.pool.idle_count() == 0


async def test_client_disconnect_mid_upload_aborts_the_upstream(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A client that leaves mid-upload: the plugin sees the disconnect during the body."""
    proxy = start_proxy({"/peak": plugin.url})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /peak/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        assert await async_wait_for(lambda: bool(plugin.app.seen))
    assert await async_wait_for(lambda: "disconnect-during-body" in plugin.app.events)


async def test_route_pointing_back_at_the_proxy_is_a_508(start_proxy: StartProxy) -> None:
    """A route that points back at the proxy itself is a 508, not an endless loop."""
    proxy = start_proxy({})
    proxy.routes.set("/loop", proxy.url)
    response = await get(proxy.url + "/loop/x")
    assert_proxy_error(response, 508)


async def test_one_access_log_line_per_proxied_request(
    start_proxy: StartProxy, plugin: PluginServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request, proxied or refused by the proxy, gives exactly one access line with its request id."""
    proxy = start_proxy({"/peak": plugin.url})
    with caplog.at_level(logging.INFO, logger="mint_proxy"):
        await get(proxy.url + "/peak/x", headers={"X-Request-Id": "log-me"})
        await get(proxy.url + "/unrouted")
    lines = [r.getMessage() for r in caplog.records if r.name == "mint_proxy.access"]
    assert len(lines) == 2
    assert re.match(r'log-me "GET /peak/x" plugin=peak status=200 \d+\.\dms in=0 out=\d+ ttfb=\d+\.\dms ', lines[0])
    # The proxy's own refusals are logged too, with no plugin.
    assert re.match(r'[0-9a-f]{32} "GET /unrouted" plugin=- status=404 \d+\.\dms .* reason="not_found: ', lines[1])


# -- lifespan ---------------------------------------------------------------------------------


async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """A platform that does not speak lifespan: it returns at once."""
    if scope["type"] == "http":
        await Recorder()(scope, receive, send)


async def startup_only(scope: Any, receive: Any, send: Any) -> None:
    """A platform that answers startup, then returns without waiting for shutdown."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
    else:
        await Recorder()(scope, receive, send)


async def full_lifespan(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
    else:
        await Recorder()(scope, receive, send)


@pytest.mark.parametrize("app", [None, no_lifespan, startup_only, full_lifespan])
def test_pooled_connections_are_closed_at_shutdown_whatever_the_app_does_with_lifespan(
    plugin: PluginServer, app: Any, http: str
) -> None:
    """Idle pooled connections are closed at server shutdown whether the app speaks lifespan, half of it, or none."""
    middleware = ProxyMiddleware(app, routes={"/peak": plugin.url}, tokens=TokenIssuer(SECRET))
    with serve(middleware, http=http, lifespan="auto") as running:
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200
        if app is not None:
            assert httpx.get(running.url + "/platform", timeout=10).json() == {"platform": "/platform"}
        assert middleware.pool.idle_count() == 1
    assert middleware.pool.idle_count() == 0


async def failing_startup(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def shutdown_unanswered(scope: Any, receive: Any, send: Any) -> None:
    """Answers startup, takes the shutdown message and returns without answering it."""
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()


async def answers_unasked(scope: Any, receive: Any, send: Any) -> None:
    """Answers startup without receiving it first, then returns."""
    await send({"type": "lifespan.startup.complete"})


@pytest.mark.parametrize(
    ("app", "answers"),
    [
        (None, ["lifespan.startup.complete", "lifespan.shutdown.complete"]),
        (no_lifespan, ["lifespan.startup.complete", "lifespan.shutdown.complete"]),
        (startup_only, ["lifespan.startup.complete", "lifespan.shutdown.complete"]),
        (shutdown_unanswered, ["lifespan.startup.complete", "lifespan.shutdown.complete"]),
        (full_lifespan, ["lifespan.startup.complete", "lifespan.shutdown.complete"]),
        (answers_unasked, ["lifespan.startup.complete", "lifespan.shutdown.complete"]),
        (failing_startup, ["lifespan.startup.failed"]),
    ],
)
async def test_the_middleware_answers_only_what_the_app_left_unanswered(app: Any, answers: list[str]) -> None:
    """Each lifespan message gets exactly one answer; a failed startup stays failed."""
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    middleware = ProxyMiddleware(app, routes={"/peak": "http://127.0.0.1:9"})
    await asyncio.wait_for(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send), 5)
    assert sent == answers
