"""The least any ASGI reverse proxy under uvicorn can cost: a reference, not a product.

``asgi_floor`` in the benchmark runs this app under the same uvicorn command as
mint_proxy. It forwards ``GET`` requests with no body to one upstream over a
keep-alive pool and relays a ``Content-Length`` response: no header rules, no
validation, no request id, no token, no timeouts, no streaming. Whatever it
costs (latency at 1 connection, CPU per request) is what the ASGI server and
the event loop charge before a proxy does anything of its own, so the distance
from mint_proxy to this floor is what mint_proxy adds: the fields it must send
upstream, and its code.

    MINT_FLOOR_UPSTREAM=127.0.0.1:8001 .venv/bin/uvicorn loadtests.floor:app --loop uvloop --http httptools

``MINT_FLOOR_FIELDS=1`` (read at import) makes it ``asgi_floor_fields``: the same app
sending upstream the field lines the spec makes mint_proxy add, at their sizes, and
nothing else. After the request line come the client's ``Host`` (instead of the
upstream's host), ``X-Forwarded-For`` (the client's address), ``X-Forwarded-Proto``
(the scheme), ``X-Forwarded-Host``, a constant ``Via``, a constant 32-hex
``X-Request-Id`` and a real ``X-Mint-Internal-Token`` minted once at import (signed
with ``MINT_INTERNAL_TOKEN_SECRET`` or a random secret; the backend does not check
it). The constants are deliberate: what this target measures is what the bigger
request costs the backend that parses it, on the CPU it shares with wrk. That is
the ceiling the spec's fields set for any proxy in the benchmark's layout, so the
distance from mint_proxy to this target is the part mint_proxy's code can still win.
With the switch off the request is the plain floor's, byte for byte and at its cost.
"""

import asyncio
import os
import re
import secrets
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


def _fields_template() -> bytes:
    """``GET target``, the client's Host, X-Forwarded-*, then the constant Via, request id and token."""
    from mint_proxy import TokenIssuer

    secret = os.environ.get("MINT_INTERNAL_TOKEN_SECRET") or secrets.token_urlsafe(48)
    token = TokenIssuer(secret).token_for("bench").encode("ascii")
    constant = b"via: 1.1 mint-proxy-00000000\r\nx-request-id: %s\r\nx-mint-internal-token: %s\r\n\r\n" % (
        b"0" * 32,
        token,
    )
    forwarded = b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n"
    return b"GET %s HTTP/1.1\r\nhost: %s\r\n" + forwarded + constant.replace(b"%", b"%%")


async def _plain(scope: Scope, receive: Receive, send: Send) -> None:
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


async def _with_fields(scope: Scope, receive: Receive, send: Send) -> None:
    """``_plain`` writing ``_FIELDS`` (a copy, not a branch in ``_plain``: the plain floor's cost is the reference)."""
    if scope["type"] != "http":
        return
    loop = asyncio.get_running_loop()
    while _idle and _idle[-1].closed:
        _idle.pop()
    conn = _idle.pop() if _idle else (await loop.create_connection(_Upstream, _HOST, int(_PORT)))[1]
    conn.waiter = loop.create_future()
    query = scope["query_string"]
    target = scope["raw_path"] + (b"?" + query if query else b"")
    host = _HOST.encode()
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            break
    client = scope["client"][0] if scope.get("client") else ""
    conn.transport.write(_FIELDS % (target, host, client.encode(), scope["scheme"].encode(), host))
    status, body = await conn.waiter
    _idle.append(conn)
    headers = [*_HEADERS, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# MINT_FLOOR_FIELDS=1: the request head with mint_proxy's fields, as a %-template, and the app that sends it.
_FIELDS = _fields_template() if os.environ.get("MINT_FLOOR_FIELDS") == "1" else b""
app = _with_fields if _FIELDS else _plain
