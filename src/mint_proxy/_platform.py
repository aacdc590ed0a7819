"""The platform behind the proxy in development: ``mint-proxy serve --platform TARGET``.

TARGET is an import string (``"mint.platform:app"``), served in-process behind the
proxy, or the URL of a platform the developer runs with its own ``--reload``:
requests that match no route are forwarded there by the same proxy machinery
(without an internal token: the platform is not a plugin). One port then serves
the whole product, and either side reloads on its own.
"""

import asyncio
import contextlib
import logging
from typing import Any

from ._types import ASGIApp, Message, Receive, Scope, Send
from ._websocket import proxy_websocket
from .errors import MintProxyError
from .routing import Route, RouteTable

logger = logging.getLogger("mint_proxy")

PLATFORM_SLUG = "platform"  # the plugin name in access lines for forwarded platform requests


class PlatformError(MintProxyError):
    """Raised when ``--platform`` names neither an importable ASGI app nor an http URL."""


def platform_app(target: str) -> ASGIApp:
    """An ASGI app for ``target``: the imported app, or a forwarder to the URL."""
    if target.startswith(("http://", "unix:")):
        return _forwarder(target)
    from uvicorn.importer import ImportFromStringError, import_from_string

    try:
        app: ASGIApp = import_from_string(target)
    except ImportFromStringError as exc:
        raise PlatformError(f"--platform {target!r}: {exc}") from None
    return app


def _forwarder(url: str) -> ASGIApp:
    from .asgi import ProxyMiddleware

    try:
        route = Route("/platform", url, plugin=PLATFORM_SLUG)
    except ValueError as exc:
        raise PlatformError(f"--platform {url!r}: {exc}") from None
    proxy = ProxyMiddleware(None, routes=RouteTable([route]), tokens=None)

    async def forward(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await proxy._proxy_http(scope, receive, send, route)
        elif scope["type"] == "websocket":
            forward_route = proxy._forward(route)
            await proxy_websocket(
                forward_route, scope, receive, send, retry_window=proxy.retry_window, metrics=proxy.metrics
            )
        elif scope["type"] == "lifespan":
            await proxy(scope, receive, send)

    return forward


class LifespanRunner:
    """Runs an inner app's lifespan from inside ours (the platform's startup and shutdown).

    An app that does not speak lifespan (it raises, or returns without answering) is
    run without it, as uvicorn's ``--lifespan auto`` does.
    """

    def __init__(self, app: ASGIApp, *, state: dict[str, Any] | None = None) -> None:
        self.app = app
        self.state = {} if state is None else state
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope: dict[str, Any] = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.ensure_future(self._run(scope))
        await self._to_app.put({"type": "lifespan.startup"})
        answer = await self._from_app.get()
        if answer["type"] == "lifespan.startup.failed":
            raise PlatformError(f"the platform's startup failed: {answer.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._from_app.get(), timeout=30)
        self._task.cancel()

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._to_app.get, self._from_app.put)
        except Exception:
            logger.info("the platform app does not speak lifespan; running it without")
        # Unanswered (or unsupported): let startup and shutdown go on.
        await self._from_app.put({"type": "lifespan.startup.complete"})
        await self._from_app.put({"type": "lifespan.shutdown.complete"})
