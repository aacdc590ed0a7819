"""Shared mode: plugins mounted in-process under their prefixes, with their failures contained.

    from mint_proxy.isolation import SharedPlugin, SharedPluginsMiddleware

    platform.add_middleware(
        SharedPluginsMiddleware,
        plugins=[SharedPlugin("peak-picking", "peak_picking:app")],  # or the app object
        tokens=TokenIssuer(secret),
        mount_path="/api",
    )

A request under ``mount_path + "/" + slug`` goes to the plugin's ASGI app; everything
else goes to the platform. The plugin sees what it would see behind the proxy in
isolated mode: the path as the client sent it (or, with ``strip_prefix``, the
prefix moved into ``root_path``), an ``X-Request-Id`` (the client's if acceptable,
else a new one, by the proxy's rules), its own ``X-Mint-Internal-Token``, and
``mint_plugin.current_request`` set. A client's own token header is dropped.

Containment: an exception in a plugin becomes the proxy's JSON 500 (``error``,
``detail``, ``request_id``) for that request only, logged on the ``mint_proxy``
logger with the slug and request id; no traceback reaches the client. A 5xx
response start is held until the plugin finishes, so an exception that the
plugin's own framework already rendered (Starlette's plain-text 500, or its
debug traceback page) is replaced by the JSON 500 as well. After a response has
started streaming, the connection is aborted instead (a truncated body must not
look complete), as the proxy does.

Plugin lifespans run with the platform's (startup, shutdown), as the plugin host runs them
in isolated mode; a plugin whose startup fails answers 503 ``plugin_unavailable``. Each
plugin has its own lifespan ``state``, and its requests see a copy of it, not the platform's.

``SharedPlugin`` is the one type for a shared plugin (``mint_proxy.plugins.spec``): the
dev config's ``[shared."/prefix"]`` tables parse into it, with ``app`` as an import
string that the middleware imports when it is built.

The middleware also registers the platform with ``mint_plugin.client`` so shared
plugins call ``/api/internal`` in-process; those calls carry the platform's lifespan
state, as calls over HTTP do.
"""

import importlib
import logging
from collections.abc import Iterable
from typing import Any

from mint_plugin import RequestContext, current_request
from mint_plugin.client import serve_in_process

from .._respond import send_error
from .._types import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from ..errors import MintProxyError
from ..headers import INTERNAL_TOKEN_FIELD, REQUEST_ID_FIELD, client_request_id, new_request_id
from ..plugins.spec import SharedPlugin as SharedPlugin  # re-exported: the one shared-plugin type
from ..routing import check_mount_path
from ..tokens import TokenIssuer
from ._lifespan import PluginLifespan

logger = logging.getLogger("mint_proxy")

#: A held 5xx response is released once it holds this many body bytes (a streaming error page).
HOLD_LIMIT = 64 * 1024
_OWNED = frozenset({REQUEST_ID_FIELD, INTERNAL_TOKEN_FIELD})


class SharedPluginImportError(MintProxyError):
    """Raised when a shared plugin's ``app`` import string does not name an importable object."""


class SharedPluginsMiddleware:
    """Route ``mount_path + prefix`` to in-process plugin apps; everything else to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        plugins: Iterable[SharedPlugin],
        tokens: TokenIssuer | None = None,
        mount_path: str = "",
        register_client: bool = True,
    ) -> None:
        self.app = app
        self.mount_path = check_mount_path(mount_path)
        self.tokens = tokens
        self._plugins: dict[str, SharedPlugin] = {}
        for plugin in map(_resolved, plugins):
            if plugin.prefix in self._plugins:
                raise ValueError(f"two shared plugins have the prefix {plugin.prefix!r}")
            self._plugins[plugin.prefix] = plugin
        self._failed: set[str] = set()
        # Each plugin's lifespan state, as a server keeps one per app: its requests get a copy.
        self._states: dict[str, dict[str, Any]] = {plugin.slug: {} for plugin in self._plugins.values()}
        self._platform_state: dict[str, Any] | None = None  # the server's lifespan state, once it starts
        if register_client:
            serve_in_process(self._serve_in_process)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start each plugin's lifespan with the platform's, and stop it with the platform's."""
        self._platform_state = scope.get("state")
        sessions = [
            PluginLifespan(plugin.slug, plugin.app, self._states[plugin.slug]) for plugin in self._plugins.values()
        ]
        asked = False  # the platform received lifespan.startup

        async def receive_with_plugins() -> Message:
            nonlocal asked
            message = await receive()
            if message["type"] == "lifespan.startup":
                asked = True
                await self._start(sessions)
            elif message["type"] == "lifespan.shutdown":
                for session in reversed(sessions):
                    await session.stop()
            return message

        await self.app(scope, receive_with_plugins, send)
        if asked or not sessions:
            return
        # The platform returned without speaking lifespan (``if scope["type"] != "http": return``):
        # speak it for the plugins, whose startup and shutdown must still run.
        await receive()  # lifespan.startup
        await self._start(sessions)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        for session in reversed(sessions):
            await session.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self, sessions: list[PluginLifespan]) -> None:
        for session in sessions:
            await session.start()
            if session.failed:
                self._failed.add(session.slug)

    async def _serve_in_process(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What ``mint_plugin.client`` calls in-process: this app, with a copy of the platform's
        lifespan state in each request as the server gives it to requests over HTTP."""
        if self._platform_state is not None and "state" not in scope:
            scope = {**scope, "state": self._platform_state.copy()}
        await self(scope, receive, send)

    def match(self, path: str) -> SharedPlugin | None:
        """The plugin whose prefix matches ``path`` at a segment boundary, longest first."""
        mount = self.mount_path
        if mount:
            if not path.startswith(mount) or (len(path) > len(mount) and path[len(mount)] != "/"):
                return None
            path = path[len(mount) :]
        end = len(path)
        while end > 0:
            plugin = self._plugins.get(path[:end])
            if plugin is not None:
                return plugin
            end = path.rfind("/", 0, end)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        plugin = self.match(scope["path"])
        if plugin is None:
            await self.app(scope, receive, send)
            return
        raw: RawHeaders = scope["headers"]
        request_id = client_request_id(raw) or new_request_id()
        if plugin.slug in self._failed:
            if scope["type"] == "http":
                detail = f"plugin {plugin.slug!r} failed to start"
                await send_error(send, 503, "plugin_unavailable", detail, request_id)
            else:
                await send({"type": "websocket.close", "code": 1011, "reason": ""})
            return
        token = self.tokens.token_for(plugin.slug) if self.tokens is not None else None
        headers = [(name, value) for name, value in raw if name not in _OWNED]
        headers.append((REQUEST_ID_FIELD, request_id))
        if token is not None:
            headers.append((INTERNAL_TOKEN_FIELD, token.encode("ascii")))
        inner = dict(scope, headers=headers, state=self._states[plugin.slug].copy())
        if plugin.strip_prefix:
            inner["root_path"] = scope.get("root_path", "") + self.mount_path + plugin.prefix
        reset = current_request.set(RequestContext(request_id.decode("ascii"), token))
        try:
            if scope["type"] == "http":
                await _serve_http(plugin, inner, receive, send, request_id)
            else:
                await _serve_websocket(plugin, inner, receive, send, request_id)
        finally:
            current_request.reset(reset)


async def _serve_http(plugin: SharedPlugin, scope: Scope, receive: Receive, send: Send, request_id: bytes) -> None:
    held: list[Message] = []
    held_bytes = 0
    started = False  # a response start went to the client

    async def send_with_request_id(message: Message) -> None:
        nonlocal started, held_bytes
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != REQUEST_ID_FIELD]
            message = {**message, "headers": [*headers, (REQUEST_ID_FIELD, request_id)]}
            if message["status"] >= 500:
                held.append(message)
                return
            started = True
        elif held:
            held.append(message)
            held_bytes += len(message.get("body", b""))
            if held_bytes < HOLD_LIMIT or not message.get("more_body", False):
                return  # complete or small: held until the plugin returns or raises
            started = True
            for item in held:
                await send(item)
            held.clear()
            return
        await send(message)

    try:
        await plugin.app(scope, receive, send_with_request_id)
    except Exception:
        logger.exception("plugin=%s request_id=%s: the plugin raised", plugin.slug, request_id.decode("ascii"))
        if started:
            raise _Aborted() from None  # the server aborts the connection; the truncated body never looks complete
        await send_error(send, 500, "plugin_error", f"plugin {plugin.slug!r} failed on this request", request_id)
        return
    for item in held:  # the plugin answered a 5xx itself, and finished without raising
        await send(item)


class _Aborted(Exception):
    """Raised to make the server abort a response that had already started when the plugin failed."""


async def _serve_websocket(plugin: SharedPlugin, scope: Scope, receive: Receive, send: Send, request_id: bytes) -> None:
    accepted = False

    async def send_tracking(message: Message) -> None:
        nonlocal accepted
        if message["type"] == "websocket.accept":
            accepted = True
        await send(message)

    try:
        await plugin.app(scope, receive, send_tracking)
    except Exception:
        logger.exception("plugin=%s request_id=%s: the plugin raised", plugin.slug, request_id.decode("ascii"))
        # RFC 6455 7.4.1: 1011, the server met an unexpected condition; before accepting, a close is a 403.
        await send({"type": "websocket.close", "code": 1011 if accepted else 1008, "reason": ""})


def _resolved(plugin: SharedPlugin) -> SharedPlugin:
    """``plugin`` with its ``app`` import string (``"module:attr.attr"``) replaced by the object."""
    if not isinstance(plugin.app, str):
        return plugin
    module, _, attr = plugin.app.partition(":")
    try:
        target: object = importlib.import_module(module)
        for part in (attr or "app").split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise SharedPluginImportError(f"shared plugin {plugin.slug!r}: cannot import {plugin.app!r}: {exc}") from None
    if not callable(target):
        raise SharedPluginImportError(f"shared plugin {plugin.slug!r}: {plugin.app!r} is not an ASGI app")
    return SharedPlugin(plugin.slug, target, plugin.prefix, plugin.strip_prefix)
