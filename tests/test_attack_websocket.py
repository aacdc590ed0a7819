"""WebSocket messages over the route's limit, from either side, and the proxy's memory when a
plugin sends huge ones."""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from mint_proxy import Route
from mint_proxy._types import Receive, Scope, Send

from .attack_rig import (
    StartSite,
)
from .backends import Plugin
from .utils import (
    SECRET,
    async_wait_for,
    bind_socket,
    free_port,
    serve,
)

pytestmark = pytest.mark.anyio


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
        assert await async_wait_for(lambda: talker.closed == [1009])


async def test_client_message_over_the_route_limit_closes_both_sides_with_1009(start_site: StartSite) -> None:
    """A client message over the route's limit (under the server's own) is never relayed."""
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url, max_message_bytes=1024)])
        assert await close_code(site.url("/peak/ws", "ws"), send=b"y" * 1025) == 1009
        assert await async_wait_for(lambda: app.events == ["ws-closed 1009"])


async def test_messages_up_to_the_route_limit_are_relayed_both_ways(start_site: StartSite) -> None:
    """Messages of exactly the route's limit (bytes, or UTF-8 text) pass both ways."""
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url, max_message_bytes=1029)])
        async with connect(site.url("/peak/ws", "ws"), proxy=None) as ws:
            await ws.send(b"y" * 1024)
            assert await ws.recv() == b"echo:" + b"y" * 1024  # 1029 bytes
            await ws.send("é" * 512)  # 1024 bytes of UTF-8
            assert await ws.recv() == "echo:" + "é" * 512


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


@pytest.mark.slow
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
