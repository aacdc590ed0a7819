"""``uvicorn mint_proxy:app``: the proxy alone, configured from ``config.dev.toml``.

Nothing happens at import time. At lifespan startup (or on the first request
when the server runs without lifespan) the app reads ``$MINT_PROXY_CONFIG``
(default ``./config.dev.toml``) and ``$MINT_INTERNAL_TOKEN_SECRET``, builds the
same ``ProxyMiddleware`` the platform mounts, and starts watching the file for
edits. A broken config makes startup fail with the ``DevConfigError`` message,
so uvicorn exits non-zero showing it.

Startup logs which file was loaded and which routes are active (a WARNING when
there are none: every request would be a 404). The admin views (``admin.AdminApp``)
answer under ``[settings] admin_path`` (default ``/_mint``); metrics are on when
``prometheus_client`` is installed (``mint-proxy[metrics]``). The log format is
``$MINT_PROXY_LOG_FORMAT`` (``text`` or ``json``).
"""

import asyncio
import importlib.util
import logging
import os
import secrets
import sys
from collections.abc import Mapping

from ._accesslog import formatter_for
from ._types import Receive, Scope, Send
from .admin import AdminApp
from .asgi import ProxyMiddleware
from .devconfig import (
    SECRET_ENV,
    ConfigWatcher,
    config_path_from_environ,
    describe_routes,
    load_dev_config,
    log_format_from_environ,
    secret_from_environ,
)
from .errors import MintProxyError
from .metrics import PluginStatusProvider, ProxyMetrics
from .tokens import TokenIssuer

logger = logging.getLogger("mint_proxy")


class DevProxyApp:
    """An ASGI app that is only a ``ProxyMiddleware`` built from a dev config file."""

    def __init__(
        self, *, environ: Mapping[str, str] | None = None, plugin_status: PluginStatusProvider | None = None
    ) -> None:
        self._environ = environ
        self._plugin_status = plugin_status
        self.proxy: ProxyMiddleware | None = None
        self.watcher: ConfigWatcher | None = None
        self.metrics: ProxyMetrics | None = None
        self.admin: AdminApp | None = None
        self._admin_path = ""
        self._watching: asyncio.Future[None] | None = None

    def setup(self) -> ProxyMiddleware:
        """Load the config and build the proxy; raise ``MintProxyError`` with a clear message."""
        environ = os.environ if self._environ is None else self._environ
        config = load_dev_config(config_path_from_environ(environ))
        level = logging.INFO if len(config.routes) else logging.WARNING
        logger.log(level, "loaded %s: %s", os.path.abspath(config.path), describe_routes(config.routes))
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
        if importlib.util.find_spec("prometheus_client") is not None:
            self.metrics = ProxyMetrics(plugin_status=self._plugin_status, environ=environ)
        self.proxy = ProxyMiddleware(
            None,
            routes=config.routes,
            tokens=issuer,
            mount_path=config.mount_path,
            retry_window=config.retry_window,
            metrics=self.metrics,
        )
        self._admin_path = config.admin_path
        if config.admin_path:
            self.admin = AdminApp(
                config.routes, metrics=self.metrics, plugin_status=self._plugin_status, mount_path=config.mount_path
            )
        on_reload = self.metrics.config_reloaded if self.metrics is not None else None
        self.watcher = ConfigWatcher(config.path, config.routes, on_reload=on_reload)
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
        admin = self._admin_path
        if admin and scope["type"] != "lifespan":
            path: str = scope["path"]
            if path.startswith(admin) and (len(path) == len(admin) or path[len(admin)] == "/"):
                assert self.admin is not None
                await self.admin({**scope, "root_path": scope.get("root_path", "") + admin}, receive, send)
                return
        await proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            _show_access_log(log_format_from_environ(os.environ if self._environ is None else self._environ))
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


def _show_access_log(log_format: str = "text") -> None:
    """Make the ``mint_proxy`` logger (and its child ``mint_proxy.access``) visible when the proxy runs alone.

    Follows uvicorn's own switches: ``--log-level`` sets the level and
    ``--no-access-log`` silences the access lines too (aborts and 502/504s, at
    WARNING, still show).
    """
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    logger.addHandler(handler)
    logger.propagate = False
    level = logging.INFO
    if "uvicorn" in sys.modules:
        level = max(level, logging.getLogger("uvicorn.error").getEffectiveLevel())
        access = logging.getLogger("uvicorn.access")
        if not access.handlers and not access.propagate:
            level = max(level, logging.WARNING)  # uvicorn --no-access-log
    logger.setLevel(level)
