"""WebSocket proxying: the same route, path, headers, request id and token as HTTP.

The upstream side uses the ``websockets`` client (WebSockets are off the hot
path, and a correct client is not worth rewriting). The handshake with the
plugin happens before the client is accepted, so the client gets the plugin's
chosen subprotocol, or the plugin's refusal. After that, messages are relayed
both ways by two tasks; whichever side closes first closes the other with the
same code and reason.
"""

import asyncio
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from ._types import Receive, Scope, Send
from ._upstream import retry_refused
from .errors import ProxyError, UpstreamProtocolError, UpstreamTimeout
from .headers import inspect_request, new_request_id
from .routing import Route

if TYPE_CHECKING:
    from .asgi import ProxyMiddleware

# The handshake headers the websockets client makes itself (RFC 6455 §4.1).
_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
# Close codes that may not be sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE = frozenset({1005, 1006, 1015})


class _UpstreamConnection(ClientConnection):
    """A client connection whose handshake carries the client's own ``Host``."""

    async def handshake(self, additional_headers: Any = None, user_agent_header: str | None = None) -> None:
        build_request = self.protocol.connect

        def connect_with_client_host() -> Any:
            request = build_request()
            if additional_headers and any(name.lower() == "host" for name, _ in additional_headers):
                del request.headers["Host"]
            return request

        self.protocol.connect = connect_with_client_host  # type: ignore[method-assign]
        await super().handshake(additional_headers, None)


async def proxy_websocket(
    proxy: "ProxyMiddleware", scope: Scope, receive: Receive, send: Send, route: Route, relative: str
) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    request_id = new_request_id()
    try:
        info = inspect_request(
            scope["headers"], http_version=scope.get("http_version", "1.1"), via_marker=proxy._via_marker
        )
        request_id = info.request_id
        target = proxy.upstream_target(scope, route, relative)
        headers = [(n, v) for n, v in info.headers if n not in _HANDSHAKE] + proxy.proxy_headers(scope, route, info)
        upstream = await _connect(proxy, route, target, headers, scope.get("subprotocols") or [])
    except InvalidStatus as exc:
        await _deny(
            scope, send, exc.response.status_code, "upstream_refused", "the plugin refused the WebSocket", request_id
        )
        return
    except ProxyError as exc:
        await _deny(scope, send, exc.status, exc.error, exc.detail, request_id)
        return

    await send(
        {"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": [(b"x-request-id", request_id)]}
    )
    to_upstream = asyncio.ensure_future(_client_to_upstream(receive, upstream))
    to_client = asyncio.ensure_future(_upstream_to_client(upstream, send))
    try:
        await asyncio.wait([to_upstream, to_client], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        await upstream.close()


async def _connect(
    proxy: "ProxyMiddleware", route: Route, target: bytes, headers: list[tuple[bytes, bytes]], subprotocols: list[str]
) -> ClientConnection:
    upstream = route.upstream
    options: dict[str, Any] = {
        "additional_headers": [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
        "subprotocols": [Subprotocol(p) for p in subprotocols] or None,
        "compression": None,  # loopback: compression only costs CPU
        "user_agent_header": None,  # the client's own User-Agent is forwarded
        "open_timeout": route.connect_timeout,
        "ping_interval": None,
        "max_size": None,
        "create_connection": _UpstreamConnection,
    }

    async def open_connection() -> ClientConnection:
        try:
            if upstream.unix_path:
                return await unix_connect(upstream.unix_path, "ws://localhost" + target.decode("latin-1"), **options)
            authority = upstream.origin.removeprefix("http://")
            return await connect(f"ws://{authority}{target.decode('latin-1')}", proxy=None, **options)
        except TimeoutError:
            raise UpstreamTimeout(
                "the plugin did not complete the WebSocket handshake within connect_timeout"
            ) from None
        except InvalidHandshake as exc:
            if isinstance(exc, InvalidStatus):
                raise
            raise UpstreamProtocolError("the plugin sent an invalid WebSocket handshake") from exc

    return await retry_refused(open_connection, retry_window=proxy.retry_window)


async def _client_to_upstream(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            try:
                await upstream.send(text if text is not None else message.get("bytes") or b"")
            except ConnectionClosed:
                return
        elif message["type"] == "websocket.disconnect":
            code = message.get("code", 1000)
            await upstream.close(1000 if code in _UNSENDABLE else code, message.get("reason") or "")
            return


async def _upstream_to_client(upstream: ClientConnection, send: Send) -> None:
    try:
        async for data in upstream:
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
    except ConnectionClosed:
        pass
    close = upstream.protocol.close_rcvd
    if close is None or close.code in _UNSENDABLE:
        await send({"type": "websocket.close", "code": 1011 if close is None else 1000, "reason": ""})
    else:
        await send({"type": "websocket.close", "code": close.code, "reason": close.reason})


async def _deny(scope: Scope, send: Send, status: int, error: str, detail: str, request_id: bytes) -> None:
    """Refuse a WebSocket before accepting it: an HTTP error response where the server supports it."""
    if "websocket.http.response" in scope.get("extensions", {}):
        from .asgi import _error_body

        body, headers = _error_body(error, detail, request_id)
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008, "reason": detail[:120]})
