"""The least any ASGI reverse proxy under uvicorn can cost: a reference, not a product.

``asgi_floor`` in the benchmark runs this app under the same uvicorn command as
mint_proxy. It forwards ``GET`` requests with no body to one upstream over a
keep-alive pool and relays a ``Content-Length`` response: no header rules, no
validation, no request id, no token, no timeouts, no streaming. Whatever it
costs (latency at 1 connection, CPU per request) is what the ASGI server and
the event loop charge before a proxy does anything of its own, so the distance
from mint_proxy to this floor is the part mint_proxy's code can still win.

    MINT_FLOOR_UPSTREAM=127.0.0.1:8001 .venv/bin/uvicorn loadtests.floor:app --loop uvloop --http httptools
"""

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Upstream(asyncio.Protocol):
    """One keep-alive connection; completes ``waiter`` with (status, body) per response."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.closed = False
        self.buffer = b""
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        match = _CONTENT_LENGTH.search(self.buffer, 0, end)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < end + 4 + length:
            return
        status, body = int(self.buffer[9:12]), self.buffer[end + 4 : end + 4 + length]
        self.buffer = b""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # the backend closes idle keep-alive connections after 5 s
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("upstream closed"))


_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*([0-9]+)")
_idle: list[_Upstream] = []
_HOST, _, _PORT = os.environ.get("MINT_FLOOR_UPSTREAM", "127.0.0.1:8001").rpartition(":")
_HEADERS = [(b"content-type", b"text/plain")]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # lifespan and websockets: not supported; uvicorn carries on without lifespan
    loop = asyncio.get_running_loop()
    while _idle and _idle[-1].closed:
        _idle.pop()
    conn = _idle.pop() if _idle else (await loop.create_connection(_Upstream, _HOST, int(_PORT)))[1]
    conn.waiter = loop.create_future()
    query = scope["query_string"]
    target = scope["raw_path"] + (b"?" + query if query else b"")
    conn.transport.write(b"GET %s HTTP/1.1\r\nhost: %s\r\n\r\n" % (target, _HOST.encode()))
    status, body = await conn.waiter
    _idle.append(conn)
    headers = [*_HEADERS, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
