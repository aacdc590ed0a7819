"""WebSocket proxying: the same route, path, headers, request id and token as HTTP.

The upstream side uses the ``websockets`` client (WebSockets are off the hot
path, and a correct client is not worth rewriting). The handshake with the
plugin happens before the client is accepted, so the client gets the plugin's
chosen subprotocol, or the plugin's refusal. After that, messages are relayed
both ways by two tasks; whichever side closes first closes the other with the
same code and reason. When the plugin closes, what it sent before its close still
reaches the client, then its close code (RFC 6455 §7.1.2), even if the client was
sending meanwhile. Once the plugin connection is open it is closed on every way out,
a client that left during the handshake included.

Memory is bounded per connection: no message larger than the route's
``max_message_bytes`` is assembled in either direction. The plugin's is refused
by the websockets client as its frame header arrives (the client, proxy side,
closes the plugin with 1009); the client's by the relay (uvicorn's own
``--ws-max-size`` bounds what it assembles first). Either way both sides get
1009 ("message too big", RFC 6455 §7.4.1). At most ``_MAX_QUEUE`` frames from the
plugin wait for a slow client before the proxy stops reading the plugin.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from ._accesslog import finish_exchange, refusal
from ._exchange import Exchange
from ._forward import Forward
from ._respond import error_body
from ._types import RawHeaders, Receive, Scope, Send
from ._upstream import retry_refused
from .errors import BadRequest, ProxyError, UpstreamProtocolError, UpstreamRefused, UpstreamTimeout
from .headers import client_request_id, drop_fields_containing, inspect_request, new_request_id
from .routing import Route

if TYPE_CHECKING:
    from .metrics import ProxyMetrics

logger = logging.getLogger("mint_proxy")

# The handshake headers the websockets client makes itself (RFC 6455 §4.1).
_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
# Close codes that may not be sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE = frozenset({1005, 1006, 1015})
_TOO_BIG = 1009  # RFC 6455 §7.4.1: a message too big to process
# Frames read from the plugin ahead of a slow client (websockets pauses reading above this): with
# messages up to max_message_bytes each, this is what a connection may hold in memory at most.
_MAX_QUEUE = 4
# How the client-to-plugin relay ended.
_CLIENT_LEFT, _PLUGIN_CLOSED, _CLIENT_TOO_BIG = range(3)
# A plugin's refusal keeps its status, and the headers that status needs to mean anything:
# RFC 9110 §11.6.1 (401), §15.5.6 (405), §10.2.3 (503/429), RFC 6455 §4.4 (426 version).
_REFUSAL_HEADERS = frozenset({"www-authenticate", "allow", "retry-after", "sec-websocket-version"})


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
    forward: Forward,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    retry_window: float,
    metrics: "ProxyMetrics | None",
) -> None:
    """Proxy one WebSocket to ``forward.route``'s plugin; ``retry_window`` bridges a refused connect."""
    route = forward.route
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    started = time.perf_counter()
    request_id = client_request_id(scope["headers"]) or new_request_id()
    try:
        info = inspect_request(
            scope["headers"], http_version=scope.get("http_version", "1.1"), via_marker=forward.via_marker
        )
        request_id = info.request_id
        target = forward.target(scope)
        if b"#" in target:
            raise BadRequest("a WebSocket URI must not have a fragment (RFC 6455 §3)")
        headers = [(n, v) for n, v in info.headers if n not in _HANDSHAKE] + forward.fields(scope, info)
        secret = forward.token_mark  # (any internal token, as on the HTTP path)
        upstream = await _open(route, target, headers, scope.get("subprotocols") or [], retry_window)
    except InvalidStatus as exc:
        # A refusal (4xx/5xx) keeps its status; any other answer to an upgrade is not a WebSocket.
        # (A 407 would ask the client to authenticate to a proxy: not the plugin's to ask.)
        status = exc.response.status_code
        if status >= 400 and status != 407:
            kept: RawHeaders = [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in exc.response.headers.raw_items()
                if name.lower() in _REFUSAL_HEADERS
            ]
            if secret:
                kept, dropped = drop_fields_containing(kept, secret)
                if dropped:  # (e.g. WWW-Authenticate: Bearer <token>)
                    names = ", ".join(sorted({name.decode("latin-1") for name in dropped}))
                    logger.warning(
                        "plugin %s put its internal token in response header(s) %s: dropped", route.plugin, names
                    )
            refused = UpstreamRefused("the plugin refused the WebSocket", status=status)
            await deny_websocket(metrics, scope, send, refused, request_id, started, route.plugin, headers=kept)
        else:
            error = UpstreamProtocolError("the plugin did not accept the WebSocket upgrade")
            await deny_websocket(metrics, scope, send, error, request_id, started, route.plugin)
        return
    except ProxyError as exc:
        await deny_websocket(metrics, scope, send, exc, request_id, started, route.plugin)
        return

    relays: list[asyncio.Future[Any]] = []
    close_code, close_reason = 1000, ""
    if metrics is not None:
        metrics.websocket_opened(route.plugin)
    try:
        accept = {"type": "websocket.accept", "subprotocol": upstream.subprotocol}
        await send({**accept, "headers": [(b"x-request-id", request_id)]})
        to_upstream = asyncio.ensure_future(_client_to_upstream(receive, upstream, route.max_message_bytes))
        to_client = asyncio.ensure_future(_upstream_to_client(upstream, send))
        relays = [to_upstream, to_client]
        await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        ended = to_upstream.result() if to_upstream.done() and to_upstream.exception() is None else None
        if ended == _PLUGIN_CLOSED:
            await to_client  # the plugin closed while the client was sending: relay the rest, then its close
        elif ended == _CLIENT_TOO_BIG:
            to_client.cancel()  # (before the close below ends it, so the client gets one close: this one)
            close_code, close_reason = _TOO_BIG, "message too big"
            await send({"type": "websocket.close", "code": close_code, "reason": close_reason})
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await upstream.close(close_code, close_reason)
        if metrics is not None:
            metrics.websocket_closed(route.plugin)
        trace = info.trace_id
        finish_exchange(
            metrics, Exchange(scope, route.plugin, request_id, 101, time.perf_counter() - started, trace_id=trace)
        )


class _connect(connect):
    """``websockets.connect`` that never follows a plugin's redirect: the proxy only
    ever connects to the configured upstream, and only for the path the client asked."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def _open(
    route: Route, target: bytes, headers: list[tuple[bytes, bytes]], subprotocols: list[str], retry_window: float
) -> ClientConnection:
    upstream = route.upstream
    options: dict[str, Any] = {
        "additional_headers": [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
        "subprotocols": [Subprotocol(p) for p in subprotocols] or None,
        "compression": None,  # loopback: compression only costs CPU
        "user_agent_header": None,  # the client's own User-Agent is forwarded
        "open_timeout": route.connect_timeout,
        "ping_interval": None,
        "max_size": route.max_message_bytes,
        "max_queue": _MAX_QUEUE,
        "create_connection": _UpstreamConnection,
    }

    async def open_connection() -> ClientConnection:
        try:
            if upstream.unix_path:
                uri = "ws://localhost" + target.decode("latin-1")
                return await _connect(uri, unix=True, path=upstream.unix_path, proxy=None, **options)
            authority = upstream.origin.removeprefix("http://")
            return await _connect(f"ws://{authority}{target.decode('latin-1')}", proxy=None, **options)
        except TimeoutError:
            raise UpstreamTimeout(
                "the plugin did not complete the WebSocket handshake within connect_timeout"
            ) from None
        except InvalidHandshake as exc:
            if isinstance(exc, InvalidStatus):
                raise
            raise UpstreamProtocolError("the plugin sent an invalid WebSocket handshake") from exc

    return await retry_refused(open_connection, retry_window=retry_window)


async def _client_to_upstream(receive: Receive, upstream: ClientConnection, limit: int) -> int:
    """Relay client messages until the client leaves, the plugin closes, or a message is over ``limit``."""
    while True:
        message = await receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            data: str | bytes = text if text is not None else message.get("bytes") or b""
            # (UTF-8 takes 1 to 4 bytes a character: encode only when the length alone cannot tell.)
            if len(data) > limit or (isinstance(data, str) and len(data) * 4 > limit and len(data.encode()) > limit):
                return _CLIENT_TOO_BIG
            try:
                await upstream.send(data)
            except ConnectionClosed:
                return _PLUGIN_CLOSED
        elif message["type"] == "websocket.disconnect":
            code = message.get("code", 1000)
            await upstream.close(1000 if code in _UNSENDABLE else code, message.get("reason") or "")
            return _CLIENT_LEFT


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
    sent = upstream.protocol.close_sent
    if sent is not None and sent.code == _TOO_BIG and upstream.protocol.close_rcvd_then_sent is not True:
        # The proxy closed the plugin for a message over max_message_bytes: tell the client why.
        await send({"type": "websocket.close", "code": _TOO_BIG, "reason": "message too big"})
    elif close is None or close.code in _UNSENDABLE:
        await send({"type": "websocket.close", "code": 1011 if close is None else 1000, "reason": ""})
    else:
        await send({"type": "websocket.close", "code": close.code, "reason": close.reason})


async def deny_websocket(
    metrics: "ProxyMetrics | None",
    scope: Scope,
    send: Send,
    error: ProxyError,
    request_id: bytes,
    started: float,
    plugin: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Refuse a WebSocket before accepting it: the JSON error (plus ``headers``) as an HTTP
    response where the server supports the ``websocket.http.response`` extension, else a
    close (the server then answers 403)."""
    sent = 0
    if "websocket.http.response" in scope.get("extensions", {}):
        body, fields = error_body(error.error, error.detail, request_id)
        fields += [*error.headers, *headers]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": fields})
        await send({"type": "websocket.http.response.body", "body": body})
        sent = len(body)
    else:
        await send(
            {"type": "websocket.close", "code": 1011 if error.status >= 500 else 1008, "reason": error.detail[:120]}
        )
    duration = time.perf_counter() - started if started else 0.0
    refusal(metrics, scope, plugin, request_id, error, duration=duration, bytes_out=sent)
