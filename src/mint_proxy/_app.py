"""``uvicorn mint_proxy:app``: the proxy alone, configured from ``config.dev.toml``.

Nothing happens at import time. At lifespan startup (or on the first request
when the server runs without lifespan) the app reads ``$MINT_PROXY_CONFIG``
(default ``./config.dev.toml``) and ``$MINT_INTERNAL_TOKEN_SECRET``, builds the
same ``ProxyMiddleware`` the platform mounts, and starts watching the file for
edits. A broken config makes startup fail with the ``DevConfigError`` message,
so uvicorn exits non-zero showing it.
"""

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Mapping

from ._types import Receive, Scope, Send
from .asgi import ProxyMiddleware
from .devconfig import SECRET_ENV, ConfigWatcher, config_path_from_environ, load_dev_config, secret_from_environ
from .errors import MintProxyError
from .tokens import TokenIssuer

logger = logging.getLogger("mint_proxy")


class DevProxyApp:
    """An ASGI app that is only a ``ProxyMiddleware`` built from a dev config file."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self.proxy: ProxyMiddleware | None = None
        self.watcher: ConfigWatcher | None = None
        self._watching: asyncio.Future[None] | None = None

    def setup(self) -> ProxyMiddleware:
        """Load the config and build the proxy; raise ``MintProxyError`` with a clear message."""
        environ = os.environ if self._environ is None else self._environ
        config = load_dev_config(config_path_from_environ(environ))
        secret = secret_from_environ(environ)
        if secret is None:
            secret = secrets.token_urlsafe(48)
            logger.warning(
                "%s is not set: internal tokens are signed with a random secret for this process only", SECRET_ENV
            )
        try:
            issuer = TokenIssuer(secret)
        except ValueError as exc:
            raise MintProxyError(f"{SECRET_ENV}: {exc}") from None
        self.proxy = ProxyMiddleware(
            None, routes=config.routes, tokens=issuer, mount_path=config.mount_path, retry_window=config.retry_window
        )
        self.watcher = ConfigWatcher(config.path, config.routes)
        return self.proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        proxy = self.proxy
        if proxy is None:
            # Served without lifespan: set up on the first request (setup() never awaits,
            # so two first requests cannot both run it) and watch the file from now on.
            proxy = self.setup()
            assert self.watcher is not None
            self._watching = asyncio.ensure_future(self.watcher.run())
        await proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            _show_access_log()
            self.setup()
        except MintProxyError as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        assert self.watcher is not None and self.proxy is not None
        self._watching = asyncio.ensure_future(self.watcher.run())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        self._watching.cancel()
        self.proxy.pool.close()
        await send({"type": "lifespan.shutdown.complete"})


def _show_access_log() -> None:
    """Make the ``mint_proxy`` logger visible when the proxy runs alone.

    Follows uvicorn's own switches: ``--log-level`` sets the level and
    ``--no-access-log`` silences the access lines too.
    """
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    level = logging.INFO
    if "uvicorn" in sys.modules:
        level = max(level, logging.getLogger("uvicorn.error").getEffectiveLevel())
        access = logging.getLogger("uvicorn.access")
        if not access.handlers and not access.propagate:
            level = max(level, logging.WARNING)  # uvicorn --no-access-log
    logger.setLevel(level)
