"""The second attack suite: a path that costs quadratic time, methods that must not be forwarded,
a plugin leaking its token, unbounded WebSocket messages, a Location that leaves the host, and an
unbounded request target.

Each attack runs under both uvicorn parsers (``http``) and, where it applies, with the proxy alone
(``ProxyMiddleware`` with ``app=None``) and mounted in a FastAPI platform on ``/api`` (``site``).
Requests are raw bytes (httpx normalises paths and methods). "Nothing reached the plugin" is
measured on the plugin's socket: the plugin is a ``RawBackend`` that counts connections.
"""

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from mint_proxy import ProxyMiddleware, Route, RouteTable, TokenIssuer
from mint_proxy._types import Receive, Scope, Send

from .backends import Plugin
from .test_hardening import (
    Response,
    assert_proxy_error,
    assert_server_refused,
    make_request,
    one_response,
    parse_responses,
)
from .utils import SECRET, RawBackend, bind_socket, free_port, serve

pytestmark = pytest.mark.anyio

DEEP_PATH = "/zz/" + "a/" * 28_000  # the attack: 56 KB of one-letter segments
FLAT_PATH = "/zz/" + "a" * 56_000  # the same length as one segment
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# == the two ways the proxy runs ==================================================================


@dataclass
class Site:
    """A proxy under a real uvicorn; ``base`` is what the client's path has before a route prefix."""

    port: int
    base: str
    routes: RouteTable
    middleware: ProxyMiddleware

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{self.base}{path}"


class StartSite(Protocol):
    def __call__(self, routes: list[Route], **server_options: Any) -> Site: ...


def build_platform(routes: RouteTable) -> ProxyMiddleware:
    """A FastAPI platform with its own ``/api`` route, and the proxy mounted on ``/api`` in front of it
    (what ``platform.add_middleware(ProxyMiddleware, ...)`` builds, with the instance in hand)."""
    platform = FastAPI()

    @platform.get("/api/experiments")
    async def experiments() -> dict[str, list[str]]:
        return {"experiments": []}

    return ProxyMiddleware(platform, routes=routes, tokens=TokenIssuer(SECRET), mount_path="/api", retry_window=0.2)


@pytest.fixture(params=["standalone", "mounted"])
def start_site(request: pytest.FixtureRequest, http: str) -> Iterator[StartSite]:
    with contextlib.ExitStack() as stack:

        def start(routes: list[Route], **server_options: Any) -> Site:
            table = RouteTable(routes)
            if request.param == "standalone":
                middleware = ProxyMiddleware(None, routes=table, tokens=TokenIssuer(SECRET), retry_window=0.2)
                app: Any = middleware
            else:
                app = middleware = build_platform(table)
            running = stack.enter_context(serve(app, http=http, proxy_headers=False, **server_options))
            return Site(running.port, "/api" if request.param == "mounted" else "", table, middleware)

        yield start


@pytest.fixture
def backend() -> Iterator[RawBackend]:
    """A plugin that answers 200 "ok" to anything; ``connections`` counts what reached it."""
    with RawBackend(lambda head, index: OK) as running:
        yield running


def request_once(site: Site, target: str, *headers: str, method: str = "GET") -> Response:
    """Send one raw request and return its response as soon as it is complete (or the server closes)."""
    return first_response(site.port, make_request(site.base + target, *headers, method=method), method=method)


def first_response(port: int, data: bytes, *, method: str = "GET") -> Response:
    return one_response(read_first(port, data, method=method), methods=(method,))


def read_first(port: int, data: bytes, *, method: str = "GET") -> bytes:
    """The bytes of the first response to ``data``, read until it is complete (or the server closes)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            received += chunk
            responses = parse_responses(received, methods=(method,))
            framed = responses and (responses[0].declared_length is not None or responses[0].status == 204)
            if not chunk or (framed and responses[0].complete) or (responses and method == "HEAD"):
                return received


# == 1. a deep path costs quadratic time ==========================================================


def cpu_seconds(call: Callable[[], object], *, times: int) -> float:
    """The least CPU time this thread spent on ``times`` calls, over three rounds (noise only adds)."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(times):
            call()
        best = min(best, time.thread_time() - started)
    return best


@pytest.mark.parametrize("mount_path", ["", "/api"])
def test_deep_path_lookup_costs_what_a_flat_path_of_the_same_length_costs(mount_path: str) -> None:
    """Regression test: the lookup sliced and hashed the path at every '/', 190 ms for 56 KB of
    segments against 3 ms for one segment, so a few requests a second pinned the proxy's core.
    It looks at no more segments than the deepest prefix has."""
    routes = RouteTable([Route("/peak", "http://127.0.0.1:9"), Route("/a/b/c", "http://127.0.0.1:9")])
    middleware = ProxyMiddleware(None, routes=routes, mount_path=mount_path)
    deep, flat = mount_path + DEEP_PATH, mount_path + FLAT_PATH
    assert middleware._match(deep) is None and middleware._match(flat) is None
    deep_cost = cpu_seconds(lambda: middleware._match(deep), times=50)
    flat_cost = cpu_seconds(lambda: middleware._match(flat), times=50)
    assert deep_cost < 5 * flat_cost + 0.002, (deep_cost, flat_cost)


@pytest.mark.parametrize("mount_path", ["", "/api"])
@pytest.mark.parametrize("dots", ["/.", "/..", "/../zz/./a"])
def test_dot_segment_path_lookup_cost_grows_linearly_with_the_path(mount_path: str, dots: str) -> None:
    """Regression test: a path with a dot segment was looked up twice (as sent and resolved), each
    time at the quadratic cost. Resolving it is one pass over its segments: four times the
    segments cost about four times the time, not sixteen."""
    routes = RouteTable([Route("/peak", "http://127.0.0.1:9"), Route("/a/b/c", "http://127.0.0.1:9")])
    middleware = ProxyMiddleware(None, routes=routes, mount_path=mount_path)
    short, long = (mount_path + "/zz/" + "a/" * n + dots for n in (7_000, 28_000))
    assert middleware._match(short) is None and middleware._match(long) is None
    short_cost = cpu_seconds(lambda: middleware._match(short), times=8)
    long_cost = cpu_seconds(lambda: middleware._match(long), times=2) * 4
    assert long_cost < 8 * short_cost + 0.004, (long_cost, short_cost)


def test_route_table_probes_only_as_deep_as_its_deepest_prefix() -> None:
    """A lookup sees the routes of its depth, and a table change brings the new depth with it."""
    table = RouteTable({"/a": "http://127.0.0.1:9"})
    deep = "/a/b/c/" + "x/" * 10_000
    assert table.match(deep) == table.get("/a")
    table.set("/a/b/c", "http://127.0.0.1:8")
    assert table.match(deep) == table.get("/a/b/c")
    assert table.match("/a/b/cc/x") == table.get("/a")
    table.remove("/a/b/c")
    assert table.match(deep) == table.get("/a")
    table.replace({})
    assert table.match(deep) is None


def test_deep_path_does_not_stall_other_clients(start_site: StartSite, backend: RawBackend) -> None:
    """Regression test: six clients sending 56 KB of one-letter segments made another client's
    one-line GET wait 0.9 s. The deep path now costs the server about what a flat one does, and
    gets its answer: the proxy's 404 alone, the platform's own 404 when mounted."""
    # (h11 refuses a head over 16 KiB that arrives in pieces, before the proxy sees it: let it through.)
    site = start_site([Route("/peak", backend.url)], h11_max_incomplete_event_size=256 * 1024)

    def cost(path: str) -> tuple[float, list[Response]]:
        started = time.process_time()  # the whole process: the server's thread does the work
        answers = [request_once(site, path) for _ in range(4)]
        return time.process_time() - started, answers

    cost(FLAT_PATH)  # warm up (imports, first-request setup)
    deep_cost, deep_answers = min((cost(DEEP_PATH) for _ in range(2)), key=lambda result: result[0])
    flat_cost, flat_answers = min((cost(FLAT_PATH) for _ in range(2)), key=lambda result: result[0])
    for response in deep_answers + flat_answers:
        assert response.status == 404
        if site.base:
            assert response.json() == {"detail": "Not Found"}  # the platform's, not the proxy's
        else:
            assert_proxy_error(response, 404, "not_found")
    assert deep_cost < 5 * flat_cost + 0.05, (deep_cost, flat_cost)
    assert request_once(site, "/peak/x").status == 200
    assert backend.connections == 1


# == 3 and 5. methods that must not be forwarded ==================================================


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "TRACK", "PRI"])
def test_trace_and_connect_on_a_route_are_a_405_and_never_reach_the_plugin(
    start_site: StartSite, backend: RawBackend, http: str, method: str
) -> None:
    """Regression test: TRACE reached the plugin with the internal token (a plugin echoing it as
    RFC 9110 §9.3.8 says showed the client the token), and CONNECT put h11 in front of the plugin
    into a tunnel, the client getting a 200 head without its body."""
    site = start_site([Route("/peak", backend.url)])
    response = request_once(site, "/peak/x", "X-Request-Id: probe-1", method=method)
    assert backend.connections == 0
    if method in ("TRACK", "PRI") and http == "httptools":  # llhttp refuses these itself: the server's 400
        assert_server_refused(response)
        return
    assert_proxy_error(response, 405, "method_not_allowed", request_id="probe-1")
    assert response.header(b"allow") == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert response.header(b"connection") == b"close"
    assert backend.connections == 0


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_methods_other_than_the_refused_ones_reach_the_plugin(
    start_site: StartSite, backend: RawBackend, method: str
) -> None:
    site = start_site([Route("/peak", backend.url)])
    assert first_response(site.port, make_request(site.base + "/peak/x", method=method), method=method).status == 200
    assert backend.requests[0].startswith(method.encode() + b" ")


def test_trace_outside_the_routes_is_not_the_proxys_to_refuse(start_site: StartSite, backend: RawBackend) -> None:
    """Unrouted requests are the platform's (its 405 or 404); alone, the proxy's 404."""
    site = start_site([Route("/peak", backend.url)])
    response = request_once(site, "/experiments", method="TRACE")
    if site.base:
        assert response.status == 405 and response.json() == {"detail": "Method Not Allowed"}  # FastAPI's
    else:
        assert_proxy_error(response, 404, "not_found")
    assert backend.connections == 0


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


# == 4. WebSocket memory ==========================================================================


class BigTalker:
    """A WebSocket plugin that sends one message of ``size`` bytes, then notes how it was closed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.closed: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "bytes": b"x" * self.size})
        while (message := await receive())["type"] != "websocket.disconnect":
            pass
        self.closed.append(message.get("code", 0))


async def close_code(url: str, *, send: bytes = b"") -> int:
    """Connect to ``url``, optionally send ``send``, and return the close code the proxy sends."""
    async with connect(url, proxy=None, max_size=None, open_timeout=10) as ws:
        if send:
            await ws.send(send)
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
    assert ws.close_code is not None
    return ws.close_code


async def test_plugin_message_over_the_route_limit_closes_both_sides_with_1009(start_site: StartSite) -> None:
    """Regression test: the proxy assembled any message the plugin sent (200 MB raised its RSS by
    600 MiB). A message over ``max_message_bytes`` is refused as its frame header arrives."""
    talker = BigTalker(64 * 1024)
    with serve(talker) as plugin:
        site = start_site([Route("/peak", plugin.url, max_message_bytes=16 * 1024)])
        assert await close_code(site.url("/peak/ws", "ws")) == 1009
        assert await wait_until(lambda: talker.closed == [1009])


async def test_client_message_over_the_route_limit_closes_both_sides_with_1009(start_site: StartSite) -> None:
    """A client message over the route's limit (under the server's own) is never relayed."""
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url, max_message_bytes=1024)])
        assert await close_code(site.url("/peak/ws", "ws"), send=b"y" * 1025) == 1009
        assert await wait_until(lambda: app.events == ["ws-closed 1009"])


async def test_messages_up_to_the_route_limit_are_relayed_both_ways(start_site: StartSite) -> None:
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url, max_message_bytes=1029)])
        async with connect(site.url("/peak/ws", "ws"), proxy=None) as ws:
            await ws.send(b"y" * 1024)
            assert await ws.recv() == b"echo:" + b"y" * 1024  # 1029 bytes
            await ws.send("é" * 512)  # 1024 bytes of UTF-8
            assert await ws.recv() == "echo:" + "é" * 512


async def wait_until(condition: Callable[[], bool], *, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))  # type: ignore[union-attr]


@contextlib.contextmanager
def proxy_process(config: str, tmp_path: Any) -> Iterator[tuple[int, int]]:
    """``uvicorn mint_proxy:app`` in a process of its own, on a port we chose; yields its pid and port."""
    path = tmp_path / "config.dev.toml"
    path.write_text(config)
    port = free_port()
    env = {**os.environ, "MINT_PROXY_CONFIG": str(path), "MINT_INTERNAL_TOKEN_SECRET": SECRET}
    command = [sys.executable, "-m", "uvicorn", "mint_proxy:app", "--port", str(port), "--host", "127.0.0.1"]
    command += ["--ws", "websockets-sansio", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), bind_socket() as probe:
                probe.settimeout(0.2)
                probe.connect(("127.0.0.1", port))
                break
            assert process.poll() is None, process.stderr.read() if process.stderr else b""
            assert time.monotonic() < deadline, "the proxy did not start listening"
            time.sleep(0.02)
        yield process.pid, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


async def test_plugin_sending_huge_websocket_messages_keeps_the_proxy_memory_bounded(tmp_path: Any) -> None:
    """Regression test: the proxy's memory grew with the plugin's message (about 3 x its size). With
    ``max_message_bytes`` from the config, a plugin sending 64 MiB messages moves the proxy's peak
    RSS by less than 24 MiB, and each client gets 1009."""
    talker = BigTalker(64 * 2**20)
    with serve(talker) as plugin:
        config = f'[proxy."/peak"]\nurl = "{plugin.url}"\nmax_message_bytes = 1048576\n'
        with proxy_process(config, tmp_path) as (pid, port):
            assert await close_code(f"ws://127.0.0.1:{port}/peak/warm-up") == 1009
            before = peak_rss_kib(pid)
            for _ in range(3):
                assert await close_code(f"ws://127.0.0.1:{port}/peak/ws") == 1009
            grown = peak_rss_kib(pid) - before
    assert grown < 24 * 1024, f"the proxy's peak RSS grew by {grown} KiB"
    assert talker.closed == [1009] * 4


# == 6. a Location rewrite that leaves the host ===================================================


@pytest.mark.parametrize(
    "to",
    ["{origin}//evil.example/x", "{origin}/%5Cevil.example/x", "{origin}/%09/evil.example", "{origin}/%20//evil"],
    ids=["double-slash", "backslash", "tab", "space"],
)
def test_location_rewrite_never_points_the_client_at_another_host(start_site: StartSite, to: str) -> None:
    """Regression test: a plugin answering ``Location: http://<its origin>//evil.example/x`` on an
    unstripped route reached the client as ``//evil.example/x``, which browsers follow off-site.
    A rewrite that would not be a plain path on this host leaves the plugin's value as it was."""
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url)])
        response = request_once(site, f"/peak/redirect?to={to}")
    location = response.header(b"location")
    assert response.status == 302 and location is not None
    assert location.startswith(plugin.url.encode() + b"/"), location


def test_location_on_the_plugins_origin_still_becomes_a_path(start_site: StartSite) -> None:
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url)])
        response = request_once(site, "/peak/redirect?to={origin}" + site.base + "/peak/next%3Fa%3D1")
    assert response.header(b"location") == site.base.encode() + b"/peak/next?a=1"


# == 7. the request target's length ===============================================================


@pytest.mark.parametrize("where", ["path", "query"])
def test_request_target_over_8_kib_is_a_414_and_never_reaches_the_plugin(
    start_site: StartSite, backend: RawBackend, where: str
) -> None:
    """Regression test: a 60 KB target was forwarded (and written to the access log). The target
    as sent (path, '?', query) may be 8 KiB, like nginx's request line; one byte more is a 414."""
    site = start_site([Route("/peak", backend.url)])

    def target(size: int) -> str:
        head = site.base + "/peak/x"
        if where == "path":
            return "/peak/x" + "a" * (size - len(head))
        return "/peak/x?q=" + "b" * (size - len(head) - 3)

    response = request_once(site, target(8193), "X-Request-Id: long-1")
    assert_proxy_error(response, 414, "uri_too_long", request_id="long-1")
    assert backend.connections == 0
    assert request_once(site, target(8192)).status == 200
    assert len(backend.requests) == 1


def test_websocket_target_over_8_kib_is_refused_with_414(start_site: StartSite, backend: RawBackend) -> None:
    """(uvicorn's websockets implementations refuse a request line over 8 KiB themselves; wsproto's
    does not, so the proxy's own limit answers there.)"""
    site = start_site([Route("/peak", backend.url)], ws="wsproto")
    handshake = make_request(
        site.base + "/peak/" + "w" * 9000,
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    )
    assert_proxy_error(first_response(site.port, handshake), 414, "uri_too_long")
    assert backend.connections == 0
