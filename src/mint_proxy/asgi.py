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
2. Read the first body message (``_check_body``: ``max_body_bytes`` and the declared
   ``Content-Length``, as for every later message). If it holds the whole body, the
   request head and body go upstream in one write (``_request_bytes``, ``Connection.begin``);
   otherwise the body streams chunk by chunk, framed anew (``Content-Length`` when the
   client gave one, else chunked; ``_body_pieces``), with ``drain()`` providing
   back-pressure and the limits enforced as bytes arrive (413 without reading the rest).
3. Once the body is read, the exchange watches ``receive()`` for the client going
   away (``_disconnect.watch_client``, handed to ``Connection.when_slow``: a task,
   started only for exchanges still running a tick or two later, that aborts the
   upstream connection, so the plugin stops working for nobody and the connection
   is never pooled).
4. The response head is filtered (``_response_headers``: ``headers.filter_response``;
   fields carrying an internal token of the issuer are dropped first, see
   ``_drop_secret``) and sent; body chunks are passed on as they arrive.
   ``Content-Length`` is kept when the plugin sent one, otherwise the ASGI server
   chunks the response.
5. A failure before the response starts becomes a JSON error (502/504/...). After
   it starts, the client connection is aborted instead: a truncated body must
   never look like a complete one. A client that left is logged as 499.

Retries. Refused connections are retried inside the pool for ``retry_window``.
A pooled connection that turns out to be closed before any response byte
arrived is retried on a new connection (step 3 again, the same code), only when
the whole request is still in hand (its body came in one message, so it went
out in the same write as the head) and the method is idempotent (RFC 9110
§9.2.2): a plugin that crashed after reading a POST must not get it twice, and
a body that streamed through cannot be sent again (nginx with request buffering
off does the same). ``_upstream.may_retry`` makes that decision.
"""

import asyncio
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._accesslog import Failure, access_log_answers, finish_http, refusal
from ._disconnect import ClientGone, watch_client
from ._forward import Forward, Via
from ._http11 import ResponseHead
from ._respond import send_proxy_error
from ._types import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from ._upstream import Connection, UpstreamPool, may_retry
from ._websocket import deny_websocket, proxy_websocket
from .errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PluginUnavailable,
    ProxyError,
    RequestTimeout,
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
                path: str = scope["path"]
                if "/." in path:
                    route = self._match(path)
                else:  # (without a mount path, the table's own lookup: one call less)
                    route = self.routes.match(path) if not self.mount_path else self._route(path)
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
        (``__call__`` goes straight to ``_route`` for a path without ``/.``: one call less.)
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
        """The steps of the module docstring, each a named call.

        One coroutine from the request to the last body chunk: every await level costs on
        each resume, so the awaits stay here and the synchronous work is in plain functions.
        """
        started = time.monotonic()  # (the pool's clock too: for a request without a body, one reading serves both)
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
                # 1. Refuse what must not be forwarded.
                http_version: str = scope.get("http_version", "1.1")
                info = inspect_request(scope["headers"], http_version, self._via.marker)
                request_id = info.request_id
                method: str = scope["method"]
                if method in REFUSED_METHODS:
                    raise MethodNotAllowed(f"{method} is not forwarded to plugins")
                forward = self._forward(route)
                target = forward.target(scope)
                limit, declared = route.max_body_bytes, info.content_length
                now = started  # (the pool's clock: read again below after waiting for the client)

                # 2. The first body message: the whole request is in hand when it holds the whole body.
                if declared or info.chunked or http_version not in ("1.1", "1.0"):
                    # (HTTP/2 and 3 may carry a body without any framing header, RFC 9113 §8.1.)
                    if declared is not None:
                        _check_body(declared, False, limit, declared)  # too large: 413 before reading any
                    message = await self._receive_body(receive)
                    now = time.monotonic()
                    if message["type"] != "http.request":
                        status, failure = CLIENT_CLOSED, _CLIENT_LEFT
                        return
                    body: bytes = message.get("body", b"")
                    more: bool = message.get("more_body", False)
                    received = len(body)
                    _check_body(received, not more, limit, declared)
                else:
                    # HTTP/1.x with neither Content-Length nor Transfer-Encoding has no body
                    # (RFC 9112 §6.3); its empty body message is left for the client watch.
                    body, more = b"", False
                whole = not more
                request, chunked = _request_bytes(forward, scope, info, method, target, body, more)
                # Any internal token in the response head is dropped: the one just sent, or one the plugin
                # kept from before a renewal (still valid), found by what every token of the issuer starts with.
                secret = forward.token_mark

                # 2-3. Send it, stream the rest, watch the client; once more on a new connection if a
                # pooled one turns out closed and ``may_retry`` allows.
                timeout = route.read_timeout
                conn = self.pool.take_idle(route.upstream, now)
                while True:
                    if conn is None:
                        conn = await self.pool.connect(
                            route.upstream, connect_timeout=route.connect_timeout, retry_window=self.retry_window
                        )
                    try:
                        conn.begin(request, whole, method == "HEAD", secret)  # (complete, head_request, secret)
                        while more and conn.head is None:  # (an early answer stops the upload)
                            message = await self._receive_body(receive)
                            if message["type"] != "http.request":
                                status, failure = CLIENT_CLOSED, _CLIENT_LEFT
                                return
                            chunk: bytes = message.get("body", b"")
                            more = message.get("more_body", False)
                            received += len(chunk)
                            _check_body(received, not more, limit, declared)
                            if conn.head is not None:
                                break  # it answered while we waited for this chunk, which stays unsent
                            conn.send_body(_body_pieces(chunk, more, chunked), last=not more)
                            await conn.drain(timeout)
                        conn.when_slow(watch_client, receive)  # (the client may now leave: watch for it)
                        while conn.head is None:
                            await conn.wait(timeout)
                        break
                    except ProxyError as exc:
                        if not may_retry(exc, method, reused=conn.reused, received_any=conn.received_any, whole=whole):
                            raise
                        conn.abort()
                        conn = None
                        if metrics is not None:
                            metrics.retried(route.plugin)

                # 4. The response head, filtered.
                head = conn.head
                ttfb = time.monotonic() - started
                headers = _response_headers(conn, head, request_id, route, forward.prefix, secret)
                await send({"type": "http.response.start", "status": head.status, "headers": headers})
            except ProxyError as exc:
                # 5. A failure before the response started: a JSON error (499 in the log if the client left).
                if conn is not None:
                    conn.abort()
                if isinstance(exc, ClientGone):
                    status, failure = CLIENT_CLOSED, _CLIENT_LEFT
                    return
                status, failure = exc.status, (f"{exc.error}: {exc.detail}", exc, False)
                if not request_id:
                    request_id = client_request_id(scope["headers"]) or new_request_id()
                sent = await send_proxy_error(send, exc, request_id)
                return

            # 4. The body, relayed as it arrives. From here a failure aborts the client's
            # connection instead of finishing it, so a truncated body never looks complete.
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
                failure = _CLIENT_LEFT if isinstance(exc, ClientGone) else (f"aborted: {exc.detail}", exc, True)
        finally:
            if conn is not None and not released:
                conn.abort()
            # (a plugin's own 502 or 504 is a WARNING line: logged even when INFO lines are not)
            if (
                metrics is not None
                or failure is not None
                or status == 502
                or status == 504
                or access_log_answers.get(logging.INFO, True)
            ):
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
    """The plugin's response fields without any that carries an internal token, with a warning.

    ``secret`` is ``Forward.token_mark``, the end of the start every token of the issuer shares. A token
    opens the platform's internal API as this plugin; a client must never see one.
    """
    kept, dropped = drop_fields_containing(fields, secret)
    if dropped:  # (a token in the reason phrase goes nowhere: ASGI passes the status code only)
        names = ", ".join(sorted({name.decode("latin-1") for name in dropped}))
        logger.warning("plugin %s put its internal token in response header(s) %s: dropped", route.plugin, names)
    return kept


def _check_body(received: int, last: bool, limit: int | None, declared: int | None) -> None:
    """Refuse a request body over the route's limit (413) or not the length it declared (400).

    ``received``: the body bytes so far; ``last``: that is all of them.
    """
    if limit is not None and received > limit:
        raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
    if declared is not None and (received > declared or (last and received != declared)):
        raise BadRequest(_LENGTH_MISMATCH)


def _request_bytes(
    forward: Forward, scope: Scope, info: RequestInfo, method: str, target: bytes, body: bytes, more: bool
) -> tuple[bytes, bool]:
    """The request as it goes upstream (head and the body in hand), and whether its body is chunked.

    The body keeps the client's ``Content-Length`` when it gave one; one that streams without
    is chunked anew, and one that came whole gets its length.
    """
    lines = forward.field_lines(scope, info)
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
    return b"".join((method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", lines, b"\r\n", body)), chunked


def _body_pieces(chunk: bytes, more: bool, chunked: bool) -> list[bytes]:
    """A streamed body message as it goes upstream (its own chunk when the body is chunked)."""
    if not chunked:
        return [chunk]
    end = b"\r\n" if more else b"\r\n0\r\n\r\n"
    return [b"%x\r\n" % len(chunk), chunk, end] if chunk else [end[2:]]


def _response_headers(
    conn: Connection, head: ResponseHead, request_id: bytes, route: Route, client_prefix: str, secret: bytes
) -> RawHeaders:
    """The plugin's response fields as the client gets them (``headers.filter_response``)."""
    fields = head.headers
    if conn.secret_in_head:
        fields = _drop_secret(fields, secret, route)
    headers = filter_response(fields, request_id, route, client_prefix)
    if head.content_length is not None:
        headers.append((b"content-length", b"%d" % head.content_length))
    return headers


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
