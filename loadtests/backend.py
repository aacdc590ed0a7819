"""A trivial pure-ASGI backend for benchmarks: no framework, no middleware.

Routes match on the last path segment, so the same process serves direct calls
(``/bench/small``) and proxied ones (``/any/prefix/small``):

- ``GET  .../small``             13-byte ``Hello, world!`` with content-length
- ``POST .../echo``              reads the (small) body, answers its length
- ``GET  .../stream?bytes=N``    N bytes (default 1 MiB) in 64 KiB chunks, content-length set
- ``POST .../upload``            consumes a streamed body, answers the byte count
- ``GET  .../sse?events=N``      ``text/event-stream`` with N events (default 5),
                                 optional ``delay_ms=M`` between events

Run it alone under uvicorn::

    .venv/bin/uvicorn loadtests.backend:app --host 127.0.0.1 --port 8001 \
        --loop uvloop --http httptools --no-access-log --log-level warning

or on a TCP port and a Unix socket at once (what ``loadtests.bench`` does)::

    .venv/bin/python -m loadtests.backend --port 8001 --uds /tmp/bench/backend.sock
"""

import argparse
import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNK_SIZE = 64 * 1024
SMALL_BODY = b"Hello, world!"
MAX_STREAM_BYTES = 64 * 1024**3
MAX_EVENTS = 10_000
DEFAULT_STREAM_BYTES = 1024 * 1024
DEFAULT_EVENTS = 5

_CHUNK = b"x" * CHUNK_SIZE
_TEXT_PLAIN = (b"content-type", b"text/plain")


def _query_int(scope: Scope, name: str, default: int, maximum: int) -> int | None:
    """Return the integer query parameter ``name``, ``default`` if absent, ``None`` if invalid."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        return None
    return value if 0 <= value <= maximum else None


async def _respond(send: Send, status: int, body: bytes, content_type: tuple[bytes, bytes] = _TEXT_PLAIN) -> None:
    headers = [content_type, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _count_body(receive: Receive) -> int | None:
    """Consume the request body; return its length, or ``None`` if the client went away."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return total


async def _stream(scope: Scope, send: Send) -> None:
    size = _query_int(scope, "bytes", DEFAULT_STREAM_BYTES, MAX_STREAM_BYTES)
    if size is None:
        await _respond(send, 400, b"bytes must be an integer in [0, 64 GiB]")
        return
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    remaining = size
    while remaining > CHUNK_SIZE:
        await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
        remaining -= CHUNK_SIZE
    await send({"type": "http.response.body", "body": _CHUNK[:remaining]})


async def _sse(scope: Scope, send: Send) -> None:
    events = _query_int(scope, "events", DEFAULT_EVENTS, MAX_EVENTS)
    delay_ms = _query_int(scope, "delay_ms", 0, 10_000)
    if events is None or delay_ms is None:
        await _respond(send, 400, b"events must be in [0, 10000] and delay_ms in [0, 10000]")
        return
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for index in range(events):
        if delay_ms and index:
            await asyncio.sleep(delay_ms / 1000)
        body = f"id: {index}\nevent: tick\ndata: event {index}\n\n".encode()
        await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The benchmark backend: dispatch on method and the last path segment."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    method = scope["method"]
    name = scope["path"].rstrip("/").rpartition("/")[2]
    if name == "small" and method in ("GET", "HEAD"):
        await _respond(send, 200, SMALL_BODY)
    elif name == "stream" and method == "GET":
        await _stream(scope, send)
    elif name == "sse" and method == "GET":
        await _sse(scope, send)
    elif name in ("echo", "upload") and method == "POST":
        size = await _count_body(receive)
        if size is not None:
            await _respond(send, 200, str(size).encode())
    else:
        await _respond(send, 404, b"not found: use .../small, .../echo, .../stream, .../upload or .../sse")


def _bind_tcp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _bind_unix(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that removes its Unix socket file on shutdown.

    uvicorn re-raises SIGTERM/SIGINT after shutting down, so a ``finally`` after
    ``run()`` never runs; the hook has to sit inside the shutdown itself.
    """

    def __init__(self, config: uvicorn.Config, unix_path: str | None) -> None:
        super().__init__(config)
        self._unix_path = unix_path

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            if self._unix_path and os.path.exists(self._unix_path):
                os.unlink(self._unix_path)


def main(argv: list[str] | None = None) -> None:
    """Serve ``app`` on a TCP port and optionally a Unix socket, with uvloop and httptools."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    parser.add_argument("--uds", default=None, help="also listen on this Unix socket path")
    args = parser.parse_args(argv)
    if args.host != "127.0.0.1":
        parser.error("--host must be 127.0.0.1: benchmarks stay on loopback")
    sockets = [_bind_tcp(args.host, args.port)]
    if args.uds:
        sockets.append(_bind_unix(args.uds))
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )
    _Server(config, args.uds).run(sockets=sockets)


if __name__ == "__main__":
    main()
