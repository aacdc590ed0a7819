"""Plugin faults under traffic: killed mid-response, silent, restarted under load, and clients that
leave mid-upload or mid-download."""

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from mint_proxy import Route, RouteTable

from .backends import Plugin, header_values
from .conftest import PluginServer, StartProxy
from .utils import (
    RawBackend,
    async_wait_for,
    counted,
    exchange,
    free_port,
    make_request,
    one_response,
    serve,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000, id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 4,
            id="chunked",
        ),
    ],
)
async def test_plugin_killed_mid_response_is_an_aborted_response(start_proxy: StartProxy, answer: bytes) -> None:
    """The plugin sends part of its body and dies: the client's HTTP library reports an error,
    and on the wire the body is shorter than announced (or its chunked end is missing)."""
    with RawBackend(lambda head, index: answer) as backend:
        proxy = start_proxy({"/peak": backend.url})
        async with httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(proxy.url + "/peak/big")
        raw, closed = exchange(proxy.port, make_request("/peak/big", "Connection: close"))
    response = one_response(raw)
    assert closed and response.status == 200 and not response.complete


async def test_plugin_that_accepts_and_never_answers_is_a_504_after_read_timeout(start_proxy: StartProxy) -> None:
    """A plugin that takes the request and goes silent: 504 once ``read_timeout`` passes."""
    release = threading.Event()

    def silent(head: bytes, index: int) -> bytes:
        release.wait(5)
        return b""

    with RawBackend(silent) as backend:
        try:
            proxy = start_proxy(RouteTable([Route("/peak", backend.url, read_timeout=0.3)]))
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(proxy.url + "/peak/x", headers={"X-Request-Id": "silent-1"})
        finally:
            release.set()
    assert response.status_code == 504
    assert response.json() == {
        "error": "gateway_timeout",
        "detail": response.json()["detail"],
        "request_id": "silent-1",
    }
    assert len(backend.requests) == 1


async def test_plugin_restarted_under_steady_load_loses_and_duplicates_nothing(start_proxy: StartProxy) -> None:
    """200 sequential GETs; after the 60th the plugin server stops, and it starts again on the
    same port 0.3 s later while request 61 waits. With a 3 s retry window every request succeeds
    and each reaches the plugin exactly once (request ids), none replayed.

    The stop happens between two requests, once the proxy has seen its pooled connection close:
    a request racing the stop on a pooled connection is test_stale_connection_retry_waits_out_a_plugin_restart.
    """
    port = free_port()
    app = Plugin()
    first = serve(app, port=port)
    first.__enter__()
    stopped = False
    restarted: list[contextlib.AbstractContextManager[Any]] = []

    def restart() -> None:
        time.sleep(0.3)  # down long enough for connection attempts to be refused
        second = serve(app, port=port)
        second.__enter__()
        restarted.append(second)

    restarter = threading.Thread(target=restart, daemon=True)
    try:
        proxy = start_proxy({"/peak": f"http://127.0.0.1:{port}"}, retry_window=3.0)
        statuses = []
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(200):
                if i == 60:
                    await asyncio.to_thread(first.__exit__, None, None, None)
                    stopped = True
                    assert await async_wait_for(lambda: proxy.middleware.pool.idle_count() == 0)
                    restarter.start()
                response = await client.get(proxy.url + "/peak/echo", headers={"X-Request-Id": f"load-{i}"})
                statuses.append(response.status_code)
    finally:
        if not stopped:
            first.__exit__(None, None, None)
        if restarter.is_alive() or restarted:
            restarter.join(10)
        for server in restarted:
            server.__exit__(None, None, None)
    assert restarted and statuses == [200] * 200
    seen_ids = [header_values(record, "x-request-id")[0] for record in app.seen]
    assert sorted(seen_ids) == sorted(f"load-{i}" for i in range(200))


class Streamer:
    """A plugin streaming 64 KiB chunks (at most 2 000, 5 ms apart) that records its client leaving."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.events.append("disconnect")
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(2000):
                if gone.is_set():
                    return
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                await asyncio.sleep(0.005)
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


async def warm_pool(proxy_url: str, path: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(proxy_url + path)).status_code == 200


async def test_client_gone_mid_upload_is_seen_upstream_at_once_and_leaks_no_connection(
    start_proxy: StartProxy, plugin: PluginServer
) -> None:
    """Five uploads abandoned half-way: each time the plugin sees the disconnect within a second,
    and the pool holds no more idle connections than before."""
    proxy = start_proxy({"/peak": plugin.url})
    await warm_pool(proxy.url, "/peak/warm")
    idle = proxy.middleware.pool.idle_count()
    for i in range(1, 6):
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /peak/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            assert await async_wait_for(counted(plugin.app.seen, i + 1))
        assert await async_wait_for(counted(plugin.app.events, i, "disconnect-during-body"), timeout=1.0)
    assert proxy.middleware.pool.idle_count() <= idle
    await warm_pool(proxy.url, "/peak/after")


async def test_client_gone_mid_download_is_seen_upstream_at_once_and_leaks_no_connection(
    start_proxy: StartProxy,
) -> None:
    """Five long downloads abandoned after the first bytes: each time the plugin sees the
    disconnect within a second, and the pool holds no more idle connections than before."""
    app = Streamer()
    with serve(app) as upstream:
        proxy = start_proxy({"/peak": upstream.url})
        idle = proxy.middleware.pool.idle_count()
        for i in range(1, 6):
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(b"GET /peak/stream HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert await async_wait_for(counted(app.events, i, "disconnect"), timeout=1.0)
        assert proxy.middleware.pool.idle_count() <= idle
