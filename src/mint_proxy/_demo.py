"""``mint-proxy demo``: two toy plugins run by the supervisor, behind the proxy.

The demo is dev mode itself: it writes a ``config.dev.toml`` whose two plugins are
``app = "mint_proxy._demo:peak_picking"`` and ``"...:lcms_sequence"``, with a private
runtime dir in a temporary directory, and serves ``DevProxyApp`` on the user's
``--port``. The supervisor starts the plugins as processes of their own on Unix
sockets, prefixes their log lines, and stops them when the demo stops. The plugins
get the signing secret through their spec's ``env`` (a demo only: a real plugin never
sees it), so they can show the internal token they receive is genuine.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ._app import DevProxyApp
from ._names import INTERNAL_TOKEN_HEADER
from ._types import Receive, Scope, Send
from .devconfig import CONFIG_ENV, RUNTIME_DIR_ENV, SECRET_ENV
from .errors import InvalidInternalToken
from .tokens import verify_internal_token

HOST = "127.0.0.1"
GRACEFUL_SHUTDOWN = 2  # seconds; an open SSE or WebSocket client must not hold Ctrl-C hostage
DEMO_SECRET_ENV = "MINT_DEMO_SECRET"  # how the demo plugins learn the secret (the demo's spec env)
PLUGINS = {"peak-picking": "peak_picking", "lcms-sequence": "lcms_sequence"}  # slug -> attribute below


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


class _DemoPlugin:
    """A demo plugin's ASGI app, built on first use from the secret in its environment."""

    def __init__(self, build: Callable[[str], Starlette]) -> None:
        self._build = build
        self._app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            self._app = self._build(os.environ.get(DEMO_SECRET_ENV, ""))
        await self._app(scope, receive, send)


peak_picking = _DemoPlugin(peak_picking_app)
lcms_sequence = _DemoPlugin(lcms_sequence_app)


def bind(port: int) -> socket.socket:
    """A listening-ready TCP socket on 127.0.0.1 with TCP_NODELAY; raises ``OSError`` when the port is taken.

    TCP_NODELAY (inherited by accepted connections on Linux): a response's head and body
    go out in separate writes, and with Nagle's algorithm on, the second waits for the
    client's delayed ACK, about 40 ms on every keep-alive request after the first.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


def demo_config(secret: str, runtime_dir: str) -> str:
    lines = ["[settings]", 'mount_path = "/api"', f"runtime_dir = {json.dumps(runtime_dir)}", ""]
    for slug, attribute in PLUGINS.items():
        lines += [
            f'[proxy."/{slug}"]',
            f'app = "mint_proxy._demo:{attribute}"',
            f"env = {{ {DEMO_SECRET_ENV} = {json.dumps(secret)} }}",
            "stop_timeout = 3",
            "",
        ]
    return "\n".join(lines)


def run_demo(port: int, duration: float | None) -> int:
    """Run until Ctrl-C, SIGTERM or ``duration`` seconds; return the exit status."""
    try:
        proxy_sock = bind(port)
    except OSError as exc:
        hint = "pick another port with --port (--port 0 takes any free one)"
        print(f"mint-proxy demo: cannot listen on {HOST}:{port} ({exc.strerror}); {hint}", file=sys.stderr)
        return 1
    with proxy_sock, tempfile.TemporaryDirectory(prefix="mint-proxy-demo-") as directory:
        return asyncio.run(_serve(proxy_sock, directory, duration))


async def _serve(proxy_sock: socket.socket, directory: str, duration: float | None) -> int:
    secret = secrets.token_urlsafe(36)  # 48 characters
    path = os.path.join(directory, "config.dev.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(demo_config(secret, os.path.join(directory, "rt")))
    environ = {**os.environ, CONFIG_ENV: path, SECRET_ENV: secret}
    environ.pop(RUNTIME_DIR_ENV, None)  # the demo's own runtime dir, never a real deployment's
    config = uvicorn.Config(
        DevProxyApp(environ=environ), lifespan="on", log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN
    )
    server = _Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        # uvicorn runs at "warning" to keep its startup chatter out of the way; the proxy's access log stays on.
        logging.getLogger("mint_proxy").setLevel(logging.INFO)
        _print_ready(proxy_sock.getsockname()[1], path)

    def stop(*_: object) -> None:
        server.force_exit = server.should_exit  # a second Ctrl-C stops waiting for open connections
        server.should_exit = True

    loop = asyncio.get_running_loop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    timer = loop.call_later(duration, stop) if duration is not None else None
    announcing = asyncio.ensure_future(announce())
    try:
        await server.serve(sockets=[proxy_sock])
    except SystemExit:  # uvicorn exits when the app's startup fails; it has logged why
        return 1
    finally:
        announcing.cancel()
        if timer is not None:
            timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: the demo stops on SIGINT/SIGTERM and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _print_ready(port: int, config_path: str) -> None:
    base = f"http://{HOST}:{port}/api"
    print(f"mint-proxy demo: proxy on http://{HOST}:{port} (config: {config_path})")
    print(f"  curl -s '{base}/peak-picking/peaks?n=3'")  # quoted: '?' is a glob in zsh
    print(f"  curl -s -X POST --data-binary @{config_path} {base}/peak-picking/run")
    print(f"  curl -sN {base}/peak-picking/events")
    print(f"  curl -s {base}/lcms-sequence/status")
    # This interpreter, not whatever `python` is on PATH: websockets is installed here.
    print(f"  {shlex.quote(sys.executable)} -m websockets ws://{HOST}:{port}/api/lcms-sequence/ws")
    print(f"  mint-proxy status --runtime-dir {os.path.join(os.path.dirname(config_path), 'rt')}")
    print("Ctrl-C to stop.", flush=True)
