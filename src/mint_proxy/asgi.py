"""ProxyMiddleware: the pure-ASGI reverse proxy.

Theory of operation
-------------------
For each ``http`` or ``websocket`` scope the middleware finds the route whose
prefix matches the decoded path (relative to ``mount_path``) at a segment
boundary, longest prefix first. No match: the wrapped app gets the request
untouched. A match is proxied:

1. Refuse what must not be forwarded (dot segments, a bad or over-long target,
   ambiguous framing, a loop through this proxy, a method that echoes or tunnels)
   with a JSON error; see ``headers.py``.
2. Read the first body message. If it holds the whole body, the request head and
   body go upstream in one write; otherwise the body streams chunk by chunk,
   framed anew (``Content-Length`` when the client gave one, else chunked), with
   ``drain()`` providing back-pressure and ``max_body_bytes`` enforced as bytes
   arrive (413 without reading the rest).
3. Once the body is sent, the exchange watches ``receive()`` for the client
   going away (``Connection.watch_client``: a task, started only for exchanges
   still running after ``WATCH_DELAY``, that aborts the upstream connection, so
   the plugin stops working for nobody and the connection is never pooled).
4. The response head is filtered (``headers.filter_response``; fields carrying the
   request's own internal token are dropped first, see ``_drop_secret``) and sent; body
   chunks are passed on as they arrive. ``Content-Length`` is kept when the
   plugin sent one, otherwise the ASGI server chunks the response.
5. A failure before the response starts becomes a JSON error (502/504/...). After
   it starts, the client connection is aborted instead: a truncated body must
   never look like a complete one.

Retries. Refused connections are retried inside the pool for ``retry_window``.
A pooled connection that turns out to be closed before any response byte
arrived is retried once on a new connection, only when the whole request is
still in hand (its body came in one message, so it went out in the same write
as the head) and the method is idempotent (RFC 9110 §9.2.2): a plugin that
crashed after reading a POST must not get it twice, and a body that streamed
through cannot be sent again (nginx with request buffering off does the same).
"""

import asyncio
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._accesslog import Failure, access_logger, finish_http, refusal
from ._forward import Forward, Via
from ._respond import send_proxy_error
from ._types import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from ._upstream import Connection, UpstreamPool
from ._websocket import deny_websocket, proxy_websocket
from .errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PluginUnavailable,
    ProxyError,
    RequestTimeout,
    UpstreamUnavailable,
)
from .headers import (
    RequestInfo,
    client_request_id,
    drop_fields_containing,
    filter_response,
    inspect_request,
    new_request_id,
)
from .plugins._watch import plugin_unavailable
from .routing import DEFAULT_RETRY_WINDOW, Route, RouteTable, check_mount_path
from .tokens import TokenIssuer

if TYPE_CHECKING:
    from .metrics import ProxyMetrics

logger = logging.getLogger("mint_proxy")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods never forwarded to a plugin (405): TRACE and TRACK echo the request, internal token
# included (RFC 9110 §9.3.8 lets a server reflect it); CONNECT asks for a tunnel, which an
# HTTP/1.1 server in front of a plugin would then be in (h11 switches protocol on a 2xx);
# PRI is only ever the HTTP/2 connection preface (RFC 9113 §3.4). Everything else passes.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK", "PRI"})
# A '.' or '..' segment after a '/' (one C scan; a split into segments costs 30 times more on long paths).
_DOT_SEGMENT = re.compile(r"/\.\.?(?=/|\Z)")
CLIENT_CLOSED = 499  # nginx's status for "client closed request", used in the access log only
# (reason, error, aborted) for the access line when the client left.
_CLIENT_LEFT: Failure = ("client closed the connection", None, False)
# What ASGI servers guarantee, checked again: a middleware in front that rewrote the body without
# its Content-Length would otherwise make the plugin read the rest as a second request.
_LENGTH_MISMATCH = "the request body does not match its Content-Length"


class ProxyMiddleware:
    """Forward requests under route prefixes to plugin servers; pass everything else to ``app``.

        platform.add_middleware(ProxyMiddleware, routes=table, tokens=TokenIssuer(secret), mount_path="/api")

    ``routes`` is a ``RouteTable`` (shared and changed at runtime by the platform)
    or a plain ``{prefix: url}`` mapping. With ``app=None`` unmatched paths get 404.
    ``metrics``: a ``ProxyMetrics`` to count requests in (``mint_proxy.metrics``).
    """

    def __init__(
        self,
        app: ASGIApp | None,
        *,
        routes: RouteTable | Mapping[str, str],
        tokens: TokenIssuer | None = None,
        mount_path: str = "",
        retry_window: float = DEFAULT_RETRY_WINDOW,
        client_body_timeout: float = 60.0,
        via_pseudonym: str | None = None,
        pool: UpstreamPool | None = None,
        unavailable: Mapping[str, float] | None = None,
        metrics: "ProxyMetrics | None" = None,
    ) -> None:
        check_mount_path(mount_path)
        if not retry_window >= 0:
            raise ValueError("retry_window must be >= 0 seconds")
        if not client_body_timeout > 0:
            raise ValueError("client_body_timeout must be a positive number of seconds")
        self.app = app
        self.routes = routes if isinstance(routes, RouteTable) else RouteTable(routes)
        self.tokens = tokens
        self.mount_path = mount_path
        self.retry_window = float(retry_window)
        self.client_body_timeout = float(client_body_timeout)
        self.via_pseudonym = via_pseudonym or f"mint-proxy-{os.urandom(4).hex()}"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.via_pseudonym):
            raise ValueError("via_pseudonym must be a token of letters, digits and -._")
        self._via = Via(self.via_pseudonym)
        self._forwards: dict[str, Forward] = {}
        self.pool = pool or UpstreamPool()
        # slug -> epoch when the plugin is expected back (inf: not by itself); a state watcher keeps it current.
        self.unavailable: Mapping[str, float] = {} if unavailable is None else unavailable
        self.metrics = metrics
        if metrics is not None:
            metrics.add_pool(self.pool)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http" or scope_type == "websocket":
            try:
                route = self._match(scope["path"])
            except BadRequest as exc:
                await self._refuse(scope, send, exc)
                return
            if route is not None:
                if route.plugin in self.unavailable and (error := self._unavailable(route.plugin)):
                    await self._refuse(scope, send, error, route.plugin)
                    return
                if scope_type == "http":
                    await self._proxy_http(scope, receive, send, route)
                else:
                    await proxy_websocket(
                        self._forward(route), scope, receive, send, retry_window=self.retry_window, metrics=self.metrics
                    )
                return
        elif scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope_type in ("http", "websocket"):
            await self._refuse(scope, send, NotFound("no route matches this path"))

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass lifespan through to the app; close idle upstream connections at shutdown.

        An app that returns without finishing the protocol (``if scope["type"] != "http":
        return`` is the usual way to not speak lifespan) leaves the rest to the middleware,
        which answers what is left, so the pool is still closed at shutdown. An app that
        raises is left to the server (uvicorn's ``--lifespan auto`` then carries on without
        lifespan, ``on`` stops): the middleware cannot tell "unsupported" from "broken".
        """
        unanswered: Message | None = None  # what the app received and returned without answering
        answered = ""

        async def receive_noting() -> Message:
            nonlocal unanswered
            unanswered = await receive()
            return unanswered

        async def send_closing_pool(message: Message) -> None:
            nonlocal unanswered, answered
            if message["type"].startswith("lifespan.shutdown."):
                self.pool.close()
            unanswered, answered = None, message["type"]
            await send(message)

        if self.app is not None:
            await self.app(scope, receive_noting, send_closing_pool)
            if answered.startswith(("lifespan.shutdown.", "lifespan.startup.failed")):
                return
        while True:
            message = unanswered or await receive()
            unanswered = None
            if message["type"] == "lifespan.startup":
                if not answered.startswith("lifespan.startup."):  # (an app may answer before it receives)
                    await send_closing_pool({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send_closing_pool({"type": "lifespan.shutdown.complete"})
                return

    def _unavailable(self, plugin: str) -> PluginUnavailable | None:
        """The 503 for a plugin the supervisor reports down, unless the retry window will bridge it."""
        back = self.unavailable.get(plugin)
        return None if back is None else plugin_unavailable(plugin, back, self.retry_window)

    def _match(self, path: str) -> Route | None:
        """The route for ``path``, or ``None`` to fall through to the app.

        A path with dot segments that touches a route, as written or once resolved,
        is refused (``BadRequest``); other dot-segment paths fall through untouched.
        """
        if "/." in path and (_DOT_SEGMENT.search(path) or path.partition("/")[0] in (".", "..")):
            if self._route(path) or self._route(_remove_dot_segments(path)):
                raise BadRequest("the path contains '.' or '..' segments")
            return None
        return self._route(path)

    def _route(self, path: str) -> Route | None:
        """The route for ``path`` relative to ``mount_path`` (``None`` outside it)."""
        mount = self.mount_path
        if mount:
            if not path.startswith(mount) or (len(path) != len(mount) and path[len(mount)] != "/"):
                return None
            path = path[len(mount) :]
        return self.routes.match(path)

    async def _refuse(self, scope: Scope, send: Send, error: ProxyError, plugin: str = "-") -> None:
        """Answer a request the proxy will not forward, HTTP or WebSocket alike."""
        request_id = client_request_id(scope["headers"]) or new_request_id()
        if scope["type"] == "http":
            sent = await send_proxy_error(send, error, request_id)
            refusal(self.metrics, scope, plugin, request_id, error, bytes_out=sent)
        else:
            await deny_websocket(self.metrics, scope, send, error, request_id, 0.0, plugin)

    def _forward(self, route: Route) -> Forward:
        """The route's ``Forward``, built again only when the route changed."""
        forward = self._forwards.get(route.prefix)
        if forward is None or forward.route is not route:
            forward = self._forwards[route.prefix] = Forward(
                route, mount_path=self.mount_path, via=self._via, tokens=self.tokens
            )
        return forward

    async def _proxy_http(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        # One coroutine from the request to the last body chunk: every await level
        # costs on each resume, so the hot path neither nests helpers nor awaits
        # what has already arrived.
        started = time.perf_counter()
        request_id = b""
        status = 0
        conn: Connection | None = None
        released = False
        # What the access line and the metrics need (``_accesslog.finish_http``), kept in few locals:
        # ``failure`` is (reason, error, aborted) once something went wrong.
        received = sent = 0
        ttfb: float | None = None
        failure: Failure | None = None
        info: RequestInfo | None = None
        metrics = self.metrics
        if metrics is not None:
            metrics.started += 1
        try:
            try:
                http_version: str = scope.get("http_version", "1.1")
                info = inspect_request(scope["headers"], http_version=http_version, via_marker=self._via.marker)
                request_id = info.request_id
                method: str = scope["method"]
                if method in REFUSED_METHODS:
                    raise MethodNotAllowed(f"{method} is not forwarded to plugins")
                forward = self._forward(route)
                target = forward.target(scope)
                limit = route.max_body_bytes
                if info.content_length or info.chunked or http_version not in ("1.1", "1.0"):
                    # (HTTP/2 and 3 may carry a body without any framing header, RFC 9113 §8.1.)
                    if limit is not None and info.content_length is not None and info.content_length > limit:
                        raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
                    message = await self._receive_body(receive)
                    if message["type"] != "http.request":
                        status, failure = CLIENT_CLOSED, _CLIENT_LEFT
                        return
                    body: bytes = message.get("body", b"")
                    more: bool = message.get("more_body", False)
                else:
                    # HTTP/1.x with neither Content-Length nor Transfer-Encoding has no body
                    # (RFC 9112 §6.3); its empty body message is left for the client watcher.
                    body, more = b"", False
                received = len(body)
                if limit is not None and received > limit:
                    raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
                declared = info.content_length
                if declared is not None and (received > declared or (not more and received != declared)):
                    raise BadRequest(_LENGTH_MISMATCH)
                whole = not more  # the whole request goes in one write: it can be sent again

                lines = forward.field_lines(scope, info)
                secret = forward.secret  # the token this request carries (the route's may be renewed meanwhile)
                chunked = info.content_length is None and (info.chunked or more)
                if chunked:
                    lines += b"transfer-encoding: chunked\r\n"
                    if body:
                        body = b"%x\r\n%s\r\n" % (len(body), body)
                    if not more:
                        body += b"0\r\n\r\n"
                elif info.content_length is not None or body:
                    length = len(body) if info.content_length is None else info.content_length
                    lines += b"content-length: %d\r\n" % length
                request = b"%s %s HTTP/1.1\r\n%s\r\n%s" % (method.encode("ascii"), target, lines, body)

                timeout = route.read_timeout
                conn = self.pool.take_idle(route.upstream) or await self.pool.connect(
                    route.upstream, connect_timeout=route.connect_timeout, retry_window=self.retry_window
                )
                conn.begin(head_request=method == "HEAD", secret=secret)
                conn.write(request)
                while more:
                    if conn.head is not None:
                        break  # the plugin answered early: stop sending, relay its answer
                    message = await self._receive_body(receive)
                    if message["type"] != "http.request":
                        status, failure = CLIENT_CLOSED, _CLIENT_LEFT
                        return
                    chunk: bytes = message.get("body", b"")
                    last_chunk = not message.get("more_body", False)
                    received += len(chunk)
                    if limit is not None and received > limit:
                        raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
                    if declared is not None and (received > declared or (last_chunk and received != declared)):
                        raise BadRequest(_LENGTH_MISMATCH)
                    if conn.head is not None:
                        break  # it answered while we waited for this chunk, which stays unsent (`more` too)
                    if chunked:
                        end = b"\r\n0\r\n\r\n" if last_chunk else b"\r\n"
                        conn.writelines([b"%x\r\n" % len(chunk), chunk, end] if chunk else [end[2:]])
                    elif chunk:
                        conn.write(chunk)
                    more = not last_chunk
                    await conn.drain(timeout)
                conn.request_complete = not more
                conn.watch_client(receive)
                try:
                    while conn.head is None:
                        await conn.wait(timeout)
                except UpstreamUnavailable:
                    if conn.client_gone or not whole or not _may_retry(conn, method):
                        raise
                    conn.abort()
                    if metrics is not None:
                        metrics.retried(route.plugin)
                    conn = await self.pool.connect(
                        route.upstream, connect_timeout=route.connect_timeout, retry_window=self.retry_window
                    )
                    conn.begin(head_request=method == "HEAD", secret=secret)
                    conn.write(request)
                    conn.request_complete = True
                    conn.watch_client(receive)
                    while conn.head is None:
                        await conn.wait(timeout)
                head = conn.head
                ttfb = time.perf_counter() - started
                fields = head.headers
                if conn.secret_in_head:
                    fields = _drop_secret(fields, secret, route)
                headers = filter_response(fields, request_id=request_id, route=route, client_prefix=forward.prefix)
                if head.content_length is not None:
                    headers.append((b"content-length", b"%d" % head.content_length))
                await send({"type": "http.response.start", "status": head.status, "headers": headers})
            except ProxyError as exc:
                if conn is not None:
                    conn.abort()
                    if conn.client_gone:
                        status, failure = CLIENT_CLOSED, _CLIENT_LEFT
                        return
                status, failure = exc.status, (f"{exc.error}: {exc.detail}", exc, False)
                if not request_id:
                    request_id = client_request_id(scope["headers"]) or new_request_id()
                sent = await send_proxy_error(send, exc, request_id)
                return

            # The response has started. From here a failure aborts the client's connection
            # instead of finishing it, so a truncated body never looks complete.
            status = head.status
            try:
                more = True
                while more:
                    piece = conn.next_body()
                    if piece is None:
                        await conn.wait(timeout)
                        continue
                    chunk, more = piece
                    if not more:
                        self.pool.release(conn)
                        released = True
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
            except ProxyError as exc:
                # One event, one line: the access line says the client got ``status`` and an abort.
                failure = _CLIENT_LEFT if conn.client_gone else (f"aborted: {exc.detail}", exc, True)
        finally:
            if conn is not None and not released:
                conn.abort()
            if metrics is not None or failure is not None or access_logger.isEnabledFor(logging.INFO):
                finish_http(
                    metrics, scope, route.plugin, request_id, status, started, received, sent, ttfb, failure, info
                )

    async def _receive_body(self, receive: Receive) -> Message:
        """The next body message; 408 when the client stays silent for ``client_body_timeout``."""
        try:
            async with asyncio.timeout(self.client_body_timeout):
                return await receive()
        except TimeoutError:
            raise RequestTimeout("the client stopped sending the request body") from None


def _drop_secret(fields: RawHeaders, secret: bytes, route: Route) -> RawHeaders:
    """The plugin's response fields without any that carries the token it was given, with a warning.

    The token opens the platform's internal API as this plugin; a client must never see it.
    """
    kept, dropped = drop_fields_containing(fields, secret)
    if dropped:  # (a token in the reason phrase goes nowhere: ASGI passes the status code only)
        names = ", ".join(sorted({name.decode("latin-1") for name in dropped}))
        logger.warning("plugin %s put its internal token in response header(s) %s: dropped", route.plugin, names)
    return kept


def _may_retry(conn: Connection, method: str) -> bool:
    return conn.reused and not conn.received_any and conn.request_complete and method in IDEMPOTENT_METHODS


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, for the route decision only (the path is never rewritten)."""
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    trailing = "/" if path.endswith(("/.", "/..")) else ""
    return "/" + "/".join(output) + trailing
