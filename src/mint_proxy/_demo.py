"""``mint-proxy demo``: two toy plugins and the proxy in one process, on one asyncio loop.

The plugins listen on sockets bound to 127.0.0.1 port 0, so they never clash with
anything; the proxy gets the user's ``--port``. The config is written to a temporary
file and handed to ``DevProxyApp`` through an environ mapping, with a random secret
the plugins share, so they can show the internal token they receive is genuine.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ._app import DevProxyApp
from .devconfig import CONFIG_ENV, SECRET_ENV
from .errors import InvalidInternalToken
from .tokens import INTERNAL_TOKEN_HEADER, verify_internal_token

HOST = "127.0.0.1"
GRACEFUL_SHUTDOWN = 2.0  # seconds; an open SSE or WebSocket client must not hold Ctrl-C hostage


def _seen(request: Request | WebSocket, secret: str) -> dict[str, str]:
    """What the proxy added: the request id, and the plugin slug from the verified internal token."""
    token = request.headers.get(INTERNAL_TOKEN_HEADER, "")
    try:
        plugin = verify_internal_token(token, secret).plugin
    except InvalidInternalToken as exc:
        plugin = f"invalid token: {exc.reason}"
    return {"request_id": request.headers.get("X-Request-Id", ""), "token_plugin": plugin}


def peak_picking_app(secret: str) -> Starlette:
    async def peaks(request: Request) -> JSONResponse:
        text = request.query_params.get("n", "5")
        n = min(int(text), 100) if text.isdigit() else 5
        found = [{"mz": round(100 + 37.5 * i, 4), "intensity": 1000 * (n - i)} for i in range(n)]
        return JSONResponse({"plugin": "peak-picking", "peaks": found, **_seen(request, secret)})

    async def run(request: Request) -> JSONResponse:
        size = chunks = 0
        async for chunk in request.stream():
            size, chunks = size + len(chunk), chunks + (1 if chunk else 0)
        return JSONResponse({"received_bytes": size, "chunks": chunks, **_seen(request, secret)})

    async def events(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            for i in range(5):
                yield f"id: {i}\nevent: progress\ndata: {json.dumps({'step': i, 'of': 5})}\n\n"
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    prefix = "/api/peak-picking"
    return Starlette(
        routes=[
            Route(f"{prefix}/peaks", peaks),
            Route(f"{prefix}/run", run, methods=["POST"]),
            Route(f"{prefix}/events", events),
        ]
    )


def lcms_sequence_app(secret: str) -> Starlette:
    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"plugin": "lcms-sequence", "state": "idle", "queued": 0, **_seen(request, secret)})

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message.get("bytes") or b"")

    prefix = "/api/lcms-sequence"
    return Starlette(routes=[Route(f"{prefix}/status", status), WebSocketRoute(f"{prefix}/ws", echo)])


def bind(port: int) -> socket.socket:
    """A listening-ready TCP socket on 127.0.0.1; raises ``OSError`` when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


def demo_config(ports: dict[str, int]) -> str:
    lines = ["[settings]", 'mount_path = "/api"', "", "[proxy]"]
    lines += [f'"/{slug}" = "http://{HOST}:{port}"' for slug, port in ports.items()]
    return "\n".join(lines) + "\n"


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the demo, which stops all three servers together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_demo(port: int, duration: float | None) -> int:
    """Run until Ctrl-C, SIGTERM or ``duration`` seconds; return the exit status."""
    try:
        proxy_sock = bind(port)
    except OSError as exc:
        hint = "pick another port with --port (--port 0 takes any free one)"
        print(f"mint-proxy demo: cannot listen on {HOST}:{port} ({exc.strerror}); {hint}", file=sys.stderr)
        return 1
    with proxy_sock, tempfile.TemporaryDirectory(prefix="mint-proxy-demo-") as directory:
        return asyncio.run(_serve_all(proxy_sock, directory, duration))


async def _serve_all(proxy_sock: socket.socket, directory: str, duration: float | None) -> int:
    secret = secrets.token_urlsafe(36)  # 48 characters
    plugins = {"peak-picking": peak_picking_app(secret), "lcms-sequence": lcms_sequence_app(secret)}
    socks = {slug: bind(0) for slug in plugins}
    path = os.path.join(directory, "config.dev.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(demo_config({slug: sock.getsockname()[1] for slug, sock in socks.items()}))
    environ = {**os.environ, CONFIG_ENV: path, SECRET_ENV: secret}
    options: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN}
    servers = [_Server(uvicorn.Config(app, lifespan="off", **options)) for app in plugins.values()]
    servers.append(_Server(uvicorn.Config(DevProxyApp(environ=environ), lifespan="on", **options)))
    all_socks = [*socks.values(), proxy_sock]

    def stop(*_: object) -> None:
        for server in servers:
            server.force_exit = server.should_exit  # a second Ctrl-C stops waiting for open connections
            server.should_exit = True

    async def serve(server: uvicorn.Server, sock: socket.socket) -> bool:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:  # uvicorn exits when an app's startup fails; it has logged why
            stop()
            return False
        return True

    async def announce() -> None:
        while not all(server.started for server in servers):
            if any(server.should_exit for server in servers):
                return
            await asyncio.sleep(0.01)
        # uvicorn runs at "warning" to keep its startup chatter out of the way; the proxy's access log stays on.
        logging.getLogger("mint_proxy").setLevel(logging.INFO)
        _print_ready(proxy_sock.getsockname()[1], path)

    loop = asyncio.get_running_loop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    timer = loop.call_later(duration, stop) if duration is not None else None
    try:
        serving = (serve(server, sock) for server, sock in zip(servers, all_socks, strict=True))
        results = await asyncio.gather(announce(), *serving)
    finally:
        if timer is not None:
            timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in all_socks:
            sock.close()
    return 0 if all(results[1:]) else 1


def _print_ready(port: int, config_path: str) -> None:
    base = f"http://{HOST}:{port}/api"
    print(f"mint-proxy demo: proxy on http://{HOST}:{port} (config: {config_path})")
    print(f"  curl -s '{base}/peak-picking/peaks?n=3'")  # quoted: '?' is a glob in zsh
    print(f"  curl -s -X POST --data-binary @{config_path} {base}/peak-picking/run")
    print(f"  curl -sN {base}/peak-picking/events")
    print(f"  curl -s {base}/lcms-sequence/status")
    print(f"  python -m websockets ws://{HOST}:{port}/api/lcms-sequence/ws")
    print("Ctrl-C to stop.", flush=True)
