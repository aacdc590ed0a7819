"""End-to-end WebSocket proxying under a real uvicorn (h11 and httptools) in front of real plugin servers.

A WebSocket to a routed prefix reaches the plugin with the same path, headers, request id, token
and subprotocols; text and binary frames relay both ways; close codes propagate both ways.
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from mint_proxy import Route, RouteTable, verify_internal_token

from .backends import Plugin, header_values
from .conftest import PluginServer, ProxyServer, StartProxy
from .utils import SECRET, RawBackend, async_wait_for, bind_socket, free_port, pending_connections, serve

pytestmark = pytest.mark.anyio

DEADLINE = 10.0  # seconds any single step may take before the test fails


def ws_url(proxy: ProxyServer, path: str) -> str:
    return "ws://" + proxy.url.removeprefix("http://") + path


@asynccontextmanager
async def ws_connect(proxy: ProxyServer, path: str, **options: Any) -> AsyncIterator[ClientConnection]:
    options.setdefault("open_timeout", DEADLINE)
    options.setdefault("close_timeout", DEADLINE)
    async with connect(ws_url(proxy, path), proxy=None, **options) as ws:
        yield ws


async def recv(ws: ClientConnection) -> str | bytes:
    async with asyncio.timeout(DEADLINE):
        return await ws.recv()


async def handshake_refusal(proxy: ProxyServer, path: str) -> InvalidStatus:
    """Connect, expect the handshake to be refused with an HTTP status, and return the refusal."""
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(proxy, path):
            pass  # never reached: the handshake must fail
    return refused.value


async def websocket_platform(scope: Any, receive: Any, send: Any) -> None:
    """A tiny platform app: accepts WebSockets and says which path reached it."""
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": "platform:" + scope["path"]})
    await send({"type": "websocket.close", "code": 1000})


# -- handshake: path, headers, request id, token, subprotocols ---------------------------------------


async def test_plugin_sees_the_same_raw_path_with_escapes_kept(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin's handshake carries the client's raw path, percent-escapes as sent."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/live%2Fx/feed?run=7&q=a%20b") as ws:
        await ws.send("hi")
        assert await recv(ws) == "echo:hi"
    assert plugin.app.seen[0]["raw_path"] == "/peak/live%2Fx/feed"
    assert len(plugin.app.seen) == 1


async def test_query_string_reaches_the_plugin(start_proxy: StartProxy) -> None:
    """The Plugin records only raw_path for WebSockets, so a small recorder checks the query."""
    scopes: list[dict[str, Any]] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        scopes.append(scope)
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    with serve(recorder) as upstream:
        proxy = start_proxy({"/peak": upstream.url})
        async with ws_connect(proxy, "/peak/feed?run=7&q=a%20b") as ws:
            with pytest.raises(ConnectionClosed):
                await recv(ws)
    assert [(s["raw_path"], s["query_string"]) for s in scopes] == [(b"/peak/feed", b"run=7&q=a%20b")]


async def test_client_headers_reach_the_plugin(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Authorization, cookies and custom headers of the handshake reach the plugin unchanged."""
    proxy = start_proxy({"/peak": plugin.url})
    sent = {"Authorization": "Bearer user-session", "Cookie": "session=abc; theme=dark", "X-Custom": "kept as is"}
    async with ws_connect(proxy, "/peak/feed", additional_headers=sent) as ws:
        await ws.send("hi")
        await recv(ws)
    record = plugin.app.seen[0]
    assert header_values(record, "authorization") == ["Bearer user-session"]
    assert header_values(record, "cookie") == ["session=abc; theme=dark"]
    assert header_values(record, "x-custom") == ["kept as is"]


async def test_client_host_header_reaches_the_plugin(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin sees the client's Host, not its own address."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        await ws.send("hi")
        await recv(ws)
    assert header_values(plugin.app.seen[0], "host") == [f"127.0.0.1:{proxy.port}"]


async def test_repeated_headers_keep_their_order_and_user_agent_is_the_clients_only(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """Repeated headers keep their order; the only User-Agent is the client's, none from a library."""
    proxy = start_proxy({"/peak": plugin.url})
    sent = [("X-Custom", "one"), ("X-Other", "between"), ("X-Custom", "two")]
    async with ws_connect(proxy, "/peak/feed", additional_headers=sent, user_agent_header="mint-test/1"):
        pass
    record = plugin.app.seen[0]
    custom = [[name, value] for name, value in record["headers"] if name in ("x-custom", "x-other")]
    assert custom == [["x-custom", "one"], ["x-other", "between"], ["x-custom", "two"]]
    assert header_values(record, "user-agent") == ["mint-test/1"]


async def test_forwarding_headers_come_from_the_scope_not_the_client(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """X-Forwarded-* and Via are the proxy's, from the scope; the client's Forwarded never reaches the plugin."""
    proxy = start_proxy({"/peak": plugin.url})
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6"}
    async with ws_connect(proxy, "/peak/feed", additional_headers=spoofed):
        pass
    record = plugin.app.seen[0]
    assert header_values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(record, "x-forwarded-proto") == ["http"]  # not "ws": the HTTP scheme of the upgrade
    assert header_values(record, "x-forwarded-host") == [f"127.0.0.1:{proxy.port}"]
    assert header_values(record, "forwarded") == []
    [via] = header_values(record, "via")
    assert re.fullmatch(r"1\.1 mint-proxy-[0-9a-f]{8}", via)


async def test_mount_path_is_forwarded_as_part_of_the_raw_path(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Under a mount path the plugin gets the full path, mount path included."""
    proxy = start_proxy({"/peak": plugin.url}, mount_path="/api")
    async with ws_connect(proxy, "/api/peak/feed") as ws:
        await ws.send("hi")
        assert await recv(ws) == "echo:hi"
    assert plugin.app.seen[0]["raw_path"] == "/api/peak/feed"


async def test_strip_prefix_forwards_the_rest_and_the_prefix_header(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A stripped prefix: the plugin gets the rest of the path and X-Forwarded-Prefix."""
    proxy = start_proxy(RouteTable([Route("/peak", plugin.url, strip_prefix=True)]), mount_path="/api")
    async with ws_connect(proxy, "/api/peak/feed") as ws:
        await ws.send("hi")
        assert await recv(ws) == "echo:hi"
    record = plugin.app.seen[0]
    assert record["raw_path"] == "/feed"
    assert header_values(record, "x-forwarded-prefix") == ["/api/peak"]


async def test_valid_client_request_id_is_kept_and_returned_on_accept(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A valid client X-Request-Id reaches the plugin and comes back on the 101."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed", additional_headers={"X-Request-Id": "client-id.42:a_b"}) as ws:
        assert ws.response is not None
        assert ws.response.headers.get_all("x-request-id") == ["client-id.42:a_b"]
    assert header_values(plugin.app.seen[0], "x-request-id") == ["client-id.42:a_b"]


async def test_invalid_client_request_id_is_replaced_by_one_shared_with_the_plugin(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """An invalid X-Request-Id is replaced by one new id, the same for the plugin and the client."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed", additional_headers={"X-Request-Id": "no spaces/allowed"}) as ws:
        assert ws.response is not None
        returned = ws.response.headers.get_all("x-request-id")
    assert len(returned) == 1 and re.fullmatch("[0-9a-f]{32}", returned[0])
    assert header_values(plugin.app.seen[0], "x-request-id") == returned


async def test_plugin_gets_exactly_one_valid_internal_token(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin's handshake carries exactly one internal token, valid for that plugin."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed"):
        pass
    tokens = header_values(plugin.app.seen[0], "x-mint-internal-token")
    assert len(tokens) == 1
    assert verify_internal_token(tokens[0], SECRET, plugin="peak").plugin == "peak"


async def test_forged_internal_token_from_the_client_is_replaced(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """A client's internal token, in any spelling, is dropped for the proxy's own."""
    proxy = start_proxy({"/peak": plugin.url})
    forged = [("X-Mint-Internal-Token", "forged"), ("X_Mint_Internal_Token", "forged-alias")]
    async with ws_connect(proxy, "/peak/feed", additional_headers=forged):
        pass
    record = plugin.app.seen[0]
    assert "forged" not in json.dumps(record["headers"])
    tokens = header_values(record, "x-mint-internal-token")
    assert len(tokens) == 1
    verify_internal_token(tokens[0], SECRET, plugin="peak")


async def test_subprotocols_are_offered_to_the_plugin_and_its_choice_reaches_the_client(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """The client's subprotocols are offered to the plugin in order; the plugin's choice is the client's."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed", subprotocols=[Subprotocol("v2"), Subprotocol("v1")]) as ws:
        assert ws.subprotocol == "v2"
    assert plugin.app.seen[0]["subprotocols"] == ["v2", "v1"]


async def test_no_subprotocol_offered_means_none_selected(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """No subprotocol offered: none offered to the plugin, none selected."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        assert ws.subprotocol is None
    assert plugin.app.seen[0]["subprotocols"] == []


# -- frames -------------------------------------------------------------------------------------------


async def test_text_frames_round_trip(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Text messages (empty, non-ASCII, 70 KB) relay both ways unchanged."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        for text in ("hello", "", "ünïcødé ✓", "x" * 70_000):
            await ws.send(text)
            assert await recv(ws) == "echo:" + text


async def test_binary_frames_round_trip(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Binary messages relay both ways unchanged, as binary."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        for data in (b"\x00\xff\x01binary", bytes(range(256)) * 1000):
            await ws.send(data)
            answer = await recv(ws)
            assert isinstance(answer, bytes)
            assert answer == b"echo:" + data


async def test_text_and_binary_frames_keep_their_type_and_order(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Interleaved text and binary messages keep their type and order."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        for i in range(20):
            await ws.send(f"t{i}" if i % 2 else f"b{i}".encode())
        answers = [await recv(ws) for _ in range(20)]
    assert answers == [f"echo:t{i}" if i % 2 else f"echo:b{i}".encode() for i in range(20)]


# -- close codes ----------------------------------------------------------------------------------------


async def test_plugin_close_code_and_reason_reach_the_client(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The plugin's close code and reason reach the client."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        await ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "asked to")


async def test_client_close_code_reaches_the_plugin(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The client's close code reaches the plugin."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        await ws.send("hi")
        await recv(ws)
        await ws.close(4002, "client leaves")
    assert await async_wait_for(lambda: "ws-closed 4002" in plugin.app.events)
    assert plugin.app.events == ["ws-closed 4002"]


async def test_client_that_vanishes_closes_the_plugin_with_1000(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """README: 1006 cannot be sent in a close frame, so the plugin sees a normal closure."""
    proxy = start_proxy({"/peak": plugin.url})
    async with ws_connect(proxy, "/peak/feed") as ws:
        await ws.send("hi")
        await recv(ws)
        ws.transport.abort()
    assert await async_wait_for(lambda: bool(plugin.app.events))
    assert plugin.app.events == ["ws-closed 1000"]


async def test_plugin_that_vanishes_without_a_close_frame_closes_the_client_with_1011(
    start_proxy: StartProxy,
) -> None:
    """README: 1005/1006/1015 cannot be sent; a plugin that vanished becomes 1011."""

    def accept_then_drop(head: bytes, index: int) -> bytes:
        key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)
        assert key is not None
        accept = base64.b64encode(hashlib.sha1(key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + (
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    with RawBackend(accept_then_drop) as backend:
        proxy = start_proxy({"/peak": backend.url})
        async with ws_connect(proxy, "/peak/feed") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011


# -- refusals -------------------------------------------------------------------------------------------


async def test_plugin_refusal_fails_the_client_handshake_with_a_json_error(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A plugin refusing the handshake fails the client's with a 403 JSON error and the request id."""
    proxy = start_proxy({"/peak": plugin.url})
    refusal = await handshake_refusal(proxy, "/peak/refuse")
    response = refusal.response
    assert response.status_code == 403
    body = json.loads(response.body or b"")
    assert body["error"] == "upstream_refused"
    assert body["request_id"] == response.headers["x-request-id"]
    assert [r["raw_path"] for r in plugin.app.seen] == ["/peak/refuse"]


@pytest.mark.parametrize(
    ("answer", "status", "kept"),
    [
        pytest.param(
            b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="mint"\r\nX-Other: no\r\n',
            401,
            {"www-authenticate": 'Bearer realm="mint"'},
            id="401-keeps-www-authenticate",
        ),
        pytest.param(
            b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n",
            426,
            {"sec-websocket-version": "13"},
            id="426-keeps-the-version",
        ),
        pytest.param(b"HTTP/1.1 503 Busy\r\nRetry-After: 5\r\n", 503, {"retry-after": "5"}, id="503-keeps-retry-after"),
        pytest.param(b"HTTP/1.1 407 Proxy Auth\r\nProxy-Authenticate: Basic\r\n", 502, {}, id="407-is-a-502"),
    ],
)
async def test_a_refusal_keeps_the_headers_its_status_needs(
    start_proxy: StartProxy, answer: bytes, status: int, kept: dict[str, str]
) -> None:
    """RFC 9110 §11.6.1: a 401 without WWW-Authenticate is invalid; a 407 is not the plugin's to send."""
    with RawBackend(lambda head, index: answer + b"Content-Length: 0\r\n\r\n") as backend:
        proxy = start_proxy({"/peak": backend.url})
        response = (await handshake_refusal(proxy, "/peak/feed")).response
    assert response.status_code == status
    assert json.loads(response.body or b"")["request_id"] == response.headers["x-request-id"]
    for name in ("www-authenticate", "sec-websocket-version", "retry-after", "x-other", "proxy-authenticate"):
        assert response.headers.get(name) == kept.get(name)


async def test_nothing_listening_upstream_fails_the_handshake_with_502(start_proxy: StartProxy) -> None:
    """No plugin listening: a 502 JSON error that names no address."""
    dead = free_port()
    proxy = start_proxy({"/peak": f"http://127.0.0.1:{dead}"}, retry_window=0.2)
    refusal = await handshake_refusal(proxy, "/peak/feed")
    response = refusal.response
    assert response.status_code == 502
    body = json.loads(response.body or b"")
    assert body["error"] == "bad_gateway"
    assert body["request_id"] == response.headers["x-request-id"]
    assert str(dead) not in (response.body or b"").decode()


async def test_client_request_id_is_kept_on_a_refusal(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The client's request id reaches the plugin and comes back on the refusal."""
    proxy = start_proxy({"/peak": plugin.url})
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(proxy, "/peak/refuse", additional_headers={"X-Request-Id": "refused-1"}):
            pass  # never reached: the handshake must fail
    response = refused.value.response
    assert response.headers["x-request-id"] == "refused-1"
    assert json.loads(response.body or b"")["request_id"] == "refused-1"
    assert header_values(plugin.app.seen[0], "x-request-id") == ["refused-1"]


async def test_plugin_silent_during_the_handshake_is_a_504(start_proxy: StartProxy) -> None:
    """A plugin that takes the handshake and never answers is a 504 after the route's timeout."""
    release = threading.Event()
    with RawBackend(lambda head, index: b"" if release.wait(DEADLINE) else b"") as backend:
        try:
            proxy = start_proxy(RouteTable([Route("/peak", backend.url, connect_timeout=0.3)]))
            response = (await handshake_refusal(proxy, "/peak/feed")).response
        finally:
            release.set()
    assert response.status_code == 504
    assert json.loads(response.body or b"")["error"] == "gateway_timeout"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: wrong\r\n\r\n",
            id="wrong-accept",
        ),
        pytest.param(b"not http at all\r\n\r\n", id="garbage"),
    ],
)
async def test_invalid_plugin_handshake_is_a_502(start_proxy: StartProxy, answer: bytes) -> None:
    """A plugin handshake answer that is not a valid 101 is a 502 that names no address."""
    with RawBackend(lambda head, index: answer) as backend:
        proxy = start_proxy({"/peak": backend.url})
        response = (await handshake_refusal(proxy, "/peak/feed")).response
    assert response.status_code == 502
    body = json.loads(response.body or b"")
    assert body["error"] == "bad_gateway"
    assert "127.0.0.1" not in body["detail"]


async def test_plugin_answering_the_upgrade_with_200_is_a_502(start_proxy: StartProxy) -> None:
    """Regression: a 200 to the upgrade was relayed as status 200 with an error body."""
    with RawBackend(lambda head, index: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi") as backend:
        proxy = start_proxy({"/peak": backend.url})
        response = (await handshake_refusal(proxy, "/peak/feed")).response
    assert response.status_code == 502


def redirect_to(location: str) -> bytes:
    return f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()


async def test_plugin_redirect_to_another_server_is_not_followed(start_proxy: StartProxy) -> None:
    """Security notes: the proxy connects only to configured upstreams.

    Regression: websockets' connect() followed the redirect (then crashed: a bare 500).
    """
    with contextlib.closing(bind_socket()) as elsewhere:
        elsewhere.listen(8)
        location = f"ws://127.0.0.1:{elsewhere.getsockname()[1]}/stolen"
        with RawBackend(lambda head, index: redirect_to(location)) as backend:
            proxy = start_proxy({"/peak": backend.url})
            await handshake_refusal(proxy, "/peak/feed")
        assert pending_connections(elsewhere) == 0


async def test_plugin_redirect_on_the_same_server_is_not_followed(start_proxy: StartProxy) -> None:
    """Regression: websockets' connect() followed up to 10 redirects on the plugin."""
    with RawBackend(lambda head, index: redirect_to("/elsewhere")) as backend:
        proxy = start_proxy({"/peak": backend.url})
        await handshake_refusal(proxy, "/peak/feed")
    assert [head.split(b" ", 2)[1] for head in backend.requests] == [b"/peak/feed"]


async def test_dot_segments_touching_a_route_never_reach_the_plugin(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A WebSocket path with dot segments that resolve into a route is refused and never forwarded."""
    proxy = start_proxy({"/peak": plugin.url}, app=websocket_platform)
    refusal = await handshake_refusal(proxy, "/other/../peak/feed")
    assert 400 <= refusal.response.status_code < 500
    assert plugin.app.seen == []


async def test_dot_segments_refusal_is_a_400_json_error(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """Regression: the refusal was a close before accept, which uvicorn answers with a bare 403."""
    proxy = start_proxy({"/peak": plugin.url})
    response = (await handshake_refusal(proxy, "/other/../peak/feed")).response
    assert response.status_code == 400
    body = json.loads(response.body or b"{}")
    assert body.get("error") == "bad_request"
    assert body.get("request_id") == response.headers.get("x-request-id")


async def test_route_pointing_back_at_the_proxy_is_refused_as_a_loop(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """A route pointing back at the proxy refuses the WebSocket with 508."""
    routes = RouteTable({"/other": plugin.url})
    proxy = start_proxy(routes)
    routes.set("/peak", proxy.url)
    refusal = await handshake_refusal(proxy, "/peak/feed")
    assert refusal.response.status_code == 508
    assert plugin.app.seen == []


# -- routing ----------------------------------------------------------------------------------------------


async def test_unrouted_websocket_falls_through_to_the_app(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """An unrouted WebSocket goes to the wrapped app, not a plugin."""
    proxy = start_proxy({"/peak": plugin.url}, app=websocket_platform)
    async with ws_connect(proxy, "/peakX/feed") as ws:
        assert await recv(ws) == "platform:/peakX/feed"
    assert plugin.app.seen == []


async def test_unrouted_websocket_without_an_app_is_refused(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """An unrouted WebSocket with no app to fall through to is refused with a 4xx."""
    proxy = start_proxy({"/peak": plugin.url})
    refusal = await handshake_refusal(proxy, "/elsewhere")
    assert 400 <= refusal.response.status_code < 500
    assert plugin.app.seen == []


async def test_unrouted_websocket_without_an_app_is_a_json_404(start_proxy: StartProxy) -> None:
    """Regression: the refusal was a close before accept, which uvicorn answers with a bare 403."""
    proxy = start_proxy({})
    response = (await handshake_refusal(proxy, "/elsewhere")).response
    assert response.status_code == 404
    body = json.loads(response.body or b"{}")
    assert body.get("error") == "not_found"
    assert body.get("request_id") == response.headers.get("x-request-id")


async def test_route_changes_apply_to_the_next_websocket(
    start_proxy: StartProxy, plugin: PluginServer, plugin2: PluginServer
) -> None:
    """An open WebSocket keeps its plugin when the route changes; the next one follows the new route."""
    routes = RouteTable({"/peak": plugin.url})
    proxy = start_proxy(routes)
    async with ws_connect(proxy, "/peak/feed") as ws:
        routes.set("/peak", plugin2.url)
        await ws.send("still the first")  # an open connection keeps its upstream
        assert await recv(ws) == "echo:still the first"
    async with ws_connect(proxy, "/peak/feed") as ws:
        await ws.send("hi")
        await recv(ws)
    assert len(plugin.app.seen) == 1 and len(plugin2.app.seen) == 1


@contextmanager
def unix_plugin() -> Iterator[tuple[Plugin, str]]:
    app = Plugin()
    with serve(app, uds=True) as running:
        assert running.url.startswith("unix:/")
        yield app, running.url


async def test_unix_socket_upstream_relays_frames_and_close_codes(start_proxy: StartProxy) -> None:
    """Over a Unix socket upstream: subprotocol, frames both ways, close code, path and token."""
    with unix_plugin() as (app, url):
        proxy = start_proxy({"/peak": url})
        async with ws_connect(proxy, "/peak/feed?x=1", subprotocols=[Subprotocol("v2")]) as ws:
            assert ws.subprotocol == "v2"
            await ws.send("hi")
            assert await recv(ws) == "echo:hi"
            await ws.send(b"\x01\x02")
            assert await recv(ws) == b"echo:\x01\x02"
            await ws.send("close:4003")
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
        assert app.seen[0]["raw_path"] == "/peak/feed"
        verify_internal_token(header_values(app.seen[0], "x-mint-internal-token")[0], SECRET, plugin="peak")


# -- access log: one line per WebSocket session or refusal ------------------------------------------------


async def test_websocket_handshake_failure_is_access_logged(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: WebSockets left no access line."""
    proxy = start_proxy({"/peak": f"http://127.0.0.1:{free_port()}"})
    with caplog.at_level(logging.INFO, logger="mint_proxy"):
        with pytest.raises(InvalidStatus):
            async with ws_connect(proxy, "/peak/feed", additional_headers={"X-Request-Id": "ws-log-me"}):
                pass  # never reached: the handshake must fail
    lines = [r.getMessage() for r in caplog.records if r.name == "mint_proxy.access"]
    assert any(re.match(r'ws-log-me "WEBSOCKET /peak/feed" plugin=peak status=502 ', line) for line in lines)


async def test_websocket_session_is_access_logged(
    start_proxy: StartProxy, plugin: PluginServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: WebSockets left no access line. The line comes when the session ends."""
    proxy = start_proxy({"/peak": plugin.url})
    with caplog.at_level(logging.INFO, logger="mint_proxy"):
        async with ws_connect(proxy, "/peak/feed", additional_headers={"X-Request-Id": "ws-log-me"}) as ws:
            await ws.send("close:4001")
            with pytest.raises(ConnectionClosed):
                await recv(ws)
        assert await async_wait_for(lambda: any(r.name == "mint_proxy.access" for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if r.name == "mint_proxy.access"]
    assert len(lines) == 1
    assert re.fullmatch(r'ws-log-me "WEBSOCKET /peak/feed" plugin=peak status=101 \d+\.\dms .*', lines[0])


# -- found by review: the close handshake under load, a client gone during the handshake, fragments -----

UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
MESSAGES = 12


class SendThenClose:
    """A plugin that sends MESSAGES × 1 MiB, then closes with 4001 and sets ``closed``."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        for index in range(MESSAGES):
            await send({"type": "websocket.send", "bytes": bytes([index]) * (1 << 20)})
        await send({"type": "websocket.close", "code": 4001, "reason": "done"})
        self.closed.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass


def parse_server_frames(data: bytes) -> tuple[int, int | None]:
    """The number of whole data messages in ``data`` (server frames, unmasked) and the close code, if any."""
    messages, code, pos = 0, None, 0
    while pos + 2 <= len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        payload, pos = data[pos : pos + length], pos + length
        if len(payload) < length:
            break
        if opcode in (1, 2):
            messages += 1
        elif opcode == 8:
            code = int.from_bytes(payload[:2], "big") if payload else 1005
    return messages, code


def read_frames_until_eof(sock: socket.socket) -> tuple[int, int | None]:
    """Read server frames until EOF, answering the close frame as a client does (RFC 6455 §5.5.1),
    so that the server closes at once: the number of data messages and the close code."""
    data = b""
    answered = False
    sock.settimeout(DEADLINE)
    while chunk := sock.recv(1 << 20):
        data += chunk
        if not answered and (code := parse_server_frames(data)[1]) is not None:
            sock.sendall(b"\x88\x82\x00\x00\x00\x00" + code.to_bytes(2, "big"))  # masked with a zero key
            answered = True
    return parse_server_frames(data)


async def test_plugin_messages_and_close_code_reach_a_slow_client_that_sends_meanwhile(
    start_proxy: StartProxy,
) -> None:
    """RFC 6455 §7.1.2: the plugin's close ends the session only after what it sent before it.

    The client reads nothing while the plugin sends everything and closes, then sends one
    message: the proxy finds the plugin gone on that send, yet relays the rest and 4001.
    """
    app = SendThenClose()
    with serve(app) as plugin:
        proxy = start_proxy({"/peak": plugin.url})
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(UPGRADE % b"/peak/feed")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 101")
            assert await asyncio.to_thread(app.closed.wait, DEADLINE)  # the proxy is behind
            sock.sendall(b"\x81\x83\x00\x00\x00\x00ack")  # one masked text frame
            messages, code = await asyncio.to_thread(read_frames_until_eof, sock)
    assert (messages, code) == (MESSAGES, 4001)


class SlowAccept:
    """A plugin that sets ``connected`` when the handshake reaches it, accepts once ``release`` is
    set, and records how the session ends."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.connected = threading.Event()
        self.release = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        self.connected.set()
        await asyncio.to_thread(self.release.wait, DEADLINE)
        await send({"type": "websocket.accept"})
        self.events.append("accepted")
        self.events.append((await receive())["type"])


async def test_a_client_gone_during_the_plugin_handshake_closes_the_plugin_session(start_proxy: StartProxy) -> None:
    """A client that leaves while the plugin has not accepted yet: the plugin's session, once accepted, is closed."""
    app = SlowAccept()
    with serve(app) as plugin:
        proxy = start_proxy({"/peak": plugin.url})
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(UPGRADE % b"/peak/feed")
            assert await asyncio.to_thread(app.connected.wait, DEADLINE)  # the proxy waits for the plugin's 101
        # The proxy's server has seen its client go before the plugin accepts.
        assert await async_wait_for(lambda: not proxy.server.server_state.connections)
        app.release.set()
        assert await async_wait_for(lambda: app.events == ["accepted", "websocket.disconnect"])


async def test_a_fragment_in_the_target_is_a_400_json_error(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """RFC 6455 §3: fragments are meaningless in a WebSocket URI (uvicorn passes '#…' on in the query)."""
    proxy = start_proxy({"/peak": plugin.url})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as sock:
        sock.sendall(UPGRADE % b"/peak/feed?a=1#frag")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"error": "bad_request"' in data and b"fragment" in data
    assert plugin.app.seen == []
