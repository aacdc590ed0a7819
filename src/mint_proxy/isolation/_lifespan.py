"""Running a shared plugin's ASGI lifespan inside the platform's, as uvicorn's ``lifespan="auto"`` would.

The plugin host runs an isolated plugin's lifespan; in shared mode the mount does: the
plugin's startup runs when the platform's does, its shutdown when the platform's does.
An app that does not speak lifespan (it raises or returns at once) is served without one.
A plugin whose startup fails is logged and marked failed; the platform starts anyway.
"""

import asyncio
import logging
from typing import Any

from .._types import ASGIApp, Message

logger = logging.getLogger("mint_proxy")

SHUTDOWN_TIMEOUT = 10.0


class PluginLifespan:
    """One plugin app's lifespan session: ``await start()``, later ``await stop()``."""

    def __init__(self, slug: str, app: ASGIApp, state: dict[str, Any] | None = None) -> None:
        self.slug = slug
        self.app = app
        self.failed = False
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        if state is not None:
            self._scope["state"] = state

    async def _run(self) -> None:
        try:
            await self.app(self._scope, self._to_app.get, self._from_app.put)
        except BaseException as exc:  # reported through the queue; never crashes the platform
            await self._from_app.put({"type": "_raised", "error": exc})
        else:
            await self._from_app.put({"type": "_returned"})

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mint-lifespan-{self.slug}")
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        kind = message["type"]
        if kind == "lifespan.startup.failed":
            self.failed = True
            logger.error("plugin=%s: startup failed: %s", self.slug, message.get("message", ""))
        elif kind != "lifespan.startup.complete":
            # It raised or returned before completing startup: like uvicorn's lifespan="auto",
            # that means the app does not speak lifespan; it is served without one.
            self._task = None

    async def stop(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        try:
            message = await asyncio.wait_for(self._from_app.get(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            logger.error("plugin=%s: shutdown did not finish within %gs", self.slug, SHUTDOWN_TIMEOUT)
            self._task.cancel()
            return
        if message["type"] in ("lifespan.shutdown.failed", "_raised"):
            logger.error("plugin=%s: shutdown failed: %s", self.slug, message.get("message", message.get("error")))
