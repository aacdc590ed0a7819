"""``uvicorn mint_proxy:app``: the proxy, and the plugins ``config.dev.toml`` describes, from one file.

Nothing happens at import time. At lifespan startup (or on the first request
when the server runs without lifespan) the app reads ``$MINT_PROXY_CONFIG``
(default ``./config.dev.toml``), builds the same ``ProxyMiddleware`` the platform
mounts, and runs one loop that polls three things every ``POLL_INTERVAL``:

- the config file (``ConfigWatcher``): routes apply live; a changed plugin entry
  restarts only that plugin;
- ``<runtime_dir>/state.json`` (``StateWatcher``): plugins the supervisor reports
  down are answered 503 ``plugin_unavailable`` at once, in every worker;
- the supervisor lock (``SupervisorLock``): under ``uvicorn --workers N`` exactly
  one process supervises the runtime dir; the others only route, and one of them
  takes over within a poll when the supervising process dies (its plugins die
  with it; the new supervisor sweeps what is left and starts them again).
  ``MINT_PROXY_SUPERVISE=off`` makes a process only route, for when
  ``mint-proxy supervise`` runs the plugins as its own service.

Internal tokens are signed with ``$MINT_INTERNAL_TOKEN_SECRET``; without it, with a
secret generated once into the runtime dir (0600) that every worker reads, so a
token minted in one worker verifies in another. ``$MINT_INTERNAL_TOKEN_KID`` sets
the tokens' ``kid``. With a platform, the config's ``[shared."/prefix"]`` plugins are
mounted in-process in front of it (``SharedPluginsMiddleware``, their lifespans run with
the platform's), while the supervisor runs the ``[proxy]`` ones: one spec file, both
modes, URLs of one shape. A broken config makes startup fail with the ``DevConfigError``
message, so uvicorn exits non-zero showing it.

Startup logs which file was loaded and which routes are active (a WARNING when
there are none: every request would be a 404). The admin views (``admin.AdminApp``)
answer under ``[settings] admin_path`` (default ``/_mint``), with each supervised
plugin's state from ``state.json``; metrics are on when ``prometheus_client`` is
installed (``mint-proxy[metrics]``) unless ``[settings] metrics = false``. The log
format is ``$MINT_PROXY_LOG_FORMAT`` (``text`` or ``json``).
"""

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from ._accesslog import formatter_for
from ._platform import LifespanRunner, platform_app
from ._types import ASGIApp, Receive, Scope, Send
from .admin import AdminApp
from .asgi import ProxyMiddleware
from .devconfig import (
    KID_ENV,
    SECRET_ENV,
    ConfigWatcher,
    DevConfig,
    config_path_from_environ,
    describe_routes,
    kid_from_environ,
    load_dev_config,
    log_format_from_environ,
    secret_from_environ,
)
from .errors import MintProxyError
from .metrics import PluginStatusProvider, ProxyMetrics
from .plugins._election import SupervisorLock
from .plugins._secret import shared_secret
from .plugins._watch import StateWatcher
from .plugins.spec import PluginSpec, PluginStatus
from .tokens import TokenIssuer

logger = logging.getLogger("mint_proxy")

SUPERVISE_ENV = "MINT_PROXY_SUPERVISE"  # "auto" (default) or "off"
PLATFORM_ENV = "MINT_PROXY_PLATFORM"  # import string or URL of the platform behind the proxy
PLATFORM_URL_ENV = "MINT_PLATFORM_URL"  # told to plugins, so they can call the platform back
POLL_INTERVAL = 0.5
ELECT_RETRY = 10.0  # seconds between attempts to supervise after a start that failed


class DevProxyApp:
    """The proxy built from a dev config file, supervising its plugins when it holds the lock.

    ``platform`` (or ``$MINT_PROXY_PLATFORM``): an ASGI app, an import string for one, or
    the URL of a platform the developer runs; requests that match no route go there.
    ``plugin_status`` feeds the admin views and metrics; by default, ``state.json``.
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        platform: ASGIApp | str | None = None,
        plugin_status: PluginStatusProvider | None = None,
    ) -> None:
        self._environ = environ
        self._platform = platform
        self.proxy: ProxyMiddleware | None = None
        self.watcher: ConfigWatcher | None = None
        self.state: StateWatcher | None = None
        self.lock: SupervisorLock | None = None
        self.supervisor: Any = None  # a PluginSupervisor while this process supervises
        self.config: DevConfig | None = None
        self._lifespan_runner: LifespanRunner | None = None
        self._plugin_status = plugin_status
        self.metrics: ProxyMetrics | None = None
        self.admin: AdminApp | None = None
        self._admin_path = ""
        self._watching: asyncio.Future[None] | None = None
        self._applying: asyncio.Lock | None = None
        self._specs: dict[str, PluginSpec] = {}
        self._elect_after = 0.0  # after a failed start, wait before taking the lock again

    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def setup(self) -> ProxyMiddleware:
        """Load the config and build the proxy; raise ``MintProxyError`` with a clear message."""
        from .plugins.runtime import ensure_runtime_dir

        environ = self.environ
        config = load_dev_config(config_path_from_environ(environ), environ=environ)
        runtime_dir = ensure_runtime_dir(config.runtime_dir)
        level = logging.INFO if len(config.routes) else logging.WARNING
        logger.log(level, "loaded %s: %s", os.path.abspath(config.path), describe_routes(config.routes))
        secret = secret_from_environ(environ)
        if secret is None:
            secret = shared_secret(runtime_dir)
            logger.warning(
                "%s is not set: internal tokens are signed with the secret generated in %s/ (shared by every "
                "process using this runtime dir); set it in production",
                SECRET_ENV,
                runtime_dir,
            )
        try:
            issuer = TokenIssuer(secret, kid=kid_from_environ(environ))
        except ValueError as exc:
            name = KID_ENV if str(exc).startswith("kid") else SECRET_ENV
            raise MintProxyError(f"{name}: {exc}") from None
        platform = self._platform if self._platform is not None else environ.get(PLATFORM_ENV) or None
        app = platform_app(platform) if isinstance(platform, str) else platform
        app = _mount_shared(app, config, issuer)
        self.state = StateWatcher(runtime_dir)
        self.state.check()
        plugin_status = self._plugin_status or self._statuses
        if config.metrics and importlib.util.find_spec("prometheus_client") is not None:
            self.metrics = ProxyMetrics(plugin_status=plugin_status, environ=environ)
        self.proxy = ProxyMiddleware(
            app,
            routes=config.routes,
            tokens=issuer,
            mount_path=config.mount_path,
            retry_window=config.retry_window,
            unavailable=self.state.unavailable,
            metrics=self.metrics,
        )
        self._admin_path = config.admin_path
        if config.admin_path:
            self.admin = AdminApp(
                config.routes, metrics=self.metrics, plugin_status=plugin_status, mount_path=config.mount_path
            )
        self.config = config
        self.watcher = ConfigWatcher(config.path, config.routes, environ=environ, on_reload=self._reloaded)
        self.lock = SupervisorLock(runtime_dir)
        return self.proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        proxy = self.proxy
        if proxy is None:
            # Served without lifespan: set up on the first request (setup() never awaits,
            # so two first requests cannot both run it) and poll from now on.
            proxy = self.setup()
            self._watching = asyncio.ensure_future(self._poll())
        admin = self._admin_path
        if admin and scope["type"] != "lifespan":
            path: str = scope["path"]
            if path.startswith(admin) and (len(path) == len(admin) or path[len(admin)] == "/"):
                assert self.admin is not None
                await self.admin({**scope, "root_path": scope.get("root_path", "") + admin}, receive, send)
                return
        await proxy(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            _show_access_log(log_format_from_environ(self.environ))
            await self.start(state=scope.get("state"))
        except MintProxyError as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def start(self, *, state: dict[str, Any] | None = None) -> None:
        """Set up, start the platform's lifespan, supervise if elected, and start polling.

        ``mint-proxy supervise`` calls this (and ``close``) without serving HTTP: the
        same code path, in a process of its own. ``state`` is the server's lifespan state,
        shared with the platform's lifespan so its requests see what its startup stored.
        """
        proxy = self.setup()
        if proxy.app is not None:
            self._lifespan_runner = LifespanRunner(proxy.app, state=state)
            await self._lifespan_runner.startup()
        await self._elect()
        self._watching = asyncio.ensure_future(self._poll())

    async def close(self) -> None:
        """Stop polling, stop supervising (plugins stop), close idle connections, shut the platform down."""
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        if self.supervisor is not None:
            supervisor, self.supervisor = self.supervisor, None
            await supervisor.stop()
        if self.lock is not None:
            self.lock.release()
        if self._lifespan_runner is not None:
            await self._lifespan_runner.shutdown()
        if self.proxy is not None:
            self.proxy.pool.close()

    async def _elect(self) -> None:
        """Supervise if this process gets the lock (and may supervise); otherwise only route."""
        if self.lock is None or self.lock.held or time.monotonic() < self._elect_after:
            return
        if self.environ.get(SUPERVISE_ENV, "auto").lower() in ("off", "0", "no", "false"):
            return
        if not self.lock.try_acquire():
            return
        assert self.config is not None
        logger.info("supervising the plugins in %s (pid %d)", self.config.runtime_dir, os.getpid())
        await self._supervise(self.config.plugins)

    async def _supervise(self, specs: tuple[PluginSpec, ...]) -> None:
        """Start the supervisor (once there is a plugin to run: the lock alone costs nothing)."""
        if not specs:
            return
        from .plugins.supervisor import PluginSupervisor

        assert self.config is not None
        supervisor = PluginSupervisor(
            list(specs), runtime_dir=self.config.runtime_dir, platform_url=self.environ.get(PLATFORM_URL_ENV)
        )
        try:
            await supervisor.start()
        except MintProxyError as exc:
            logger.error(
                "cannot supervise %s: %s; routing only, trying again in %gs", self.config.runtime_dir, exc, ELECT_RETRY
            )
            self._elect_after = time.monotonic() + ELECT_RETRY
            if self.lock is not None:
                self.lock.release()
            return
        self.supervisor = supervisor
        self._specs = {spec.slug: spec for spec in specs}

    def _statuses(self) -> Mapping[str, PluginStatus]:
        """What the supervisor last wrote to ``state.json``, as this process's watcher read it."""
        return self.state.statuses if self.state is not None else {}

    def _reloaded(self, config: DevConfig | None) -> None:
        """ConfigWatcher's hook: count the reload; keep the new config; the supervisor applies changed plugins.

        ``config`` is None after a broken edit (the last good routes stay).
        """
        if self.metrics is not None:
            self.metrics.config_reloaded(config is not None)
        if config is None:
            return
        previous, self.config = self.config, config
        if previous is not None and previous.shared != config.shared:
            logger.warning("%s: [shared] plugins changed; restart the platform to mount them", config.path)
        if previous is not None and previous.runtime_dir != config.runtime_dir:
            logger.warning("%s: runtime_dir changed; restart the proxy to apply it", config.path)
            self.config = dataclasses.replace(config, runtime_dir=previous.runtime_dir)
        if self.lock is not None and self.lock.held:
            asyncio.ensure_future(self._apply(self.config.plugins))

    async def _apply(self, specs: tuple[PluginSpec, ...]) -> None:
        """Restart only the plugins whose entry changed; add new ones, remove deleted ones."""
        if self._applying is None:
            self._applying = asyncio.Lock()
        async with self._applying:
            supervisor = self.supervisor
            if supervisor is None:
                await self._supervise(specs)
                return
            before = dict(self._specs)
            wanted = {spec.slug: spec for spec in specs}
            for slug in before.keys() - wanted.keys():
                logger.info("plugin %s removed from the config: stopping it", slug)
            for slug in sorted(slug for slug in wanted.keys() & before.keys() if wanted[slug] != before[slug]):
                logger.info("plugin %s changed in the config: restarting it", slug)
            try:
                await supervisor.reconcile(specs)
            except (MintProxyError, KeyError, ValueError) as exc:
                logger.error("applying the plugin changes: %s", exc)
            self._specs = wanted

    async def _poll(self) -> None:
        """Every ``POLL_INTERVAL``: config edits, the plugins' state, and the supervisor lock."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                if self.watcher is not None:
                    self.watcher.check()
                if self.state is not None:
                    self.state.check()
                await self._elect()
            except Exception:
                logger.exception("error while polling the config, plugin state and supervisor lock")


def _mount_shared(app: ASGIApp | None, config: DevConfig, issuer: TokenIssuer) -> ASGIApp | None:
    """The platform with the config's shared plugins mounted in front of it, in this process."""
    if not config.shared:
        return app
    slugs = ", ".join(plugin.slug for plugin in config.shared)
    if app is None:
        logger.warning(
            "%s: [shared] plugins (%s) run inside the platform and are not mounted: give a platform (--platform or %s)",
            config.path,
            slugs,
            PLATFORM_ENV,
        )
        return None
    try:
        from .isolation.mount import SharedPluginsMiddleware
    except ImportError as exc:
        raise MintProxyError(
            f"{config.path}: [shared] plugins ({slugs}) need {exc.name}: pip install 'mint-proxy[isolation]'"
        ) from None
    return SharedPluginsMiddleware(app, plugins=config.shared, tokens=issuer, mount_path=config.mount_path)


def _show_access_log(log_format: str = "text") -> None:
    """Make the ``mint_proxy`` logger (and its child ``mint_proxy.access``) visible when the proxy runs alone.

    Follows uvicorn's own switches: ``--log-level`` sets the level and
    ``--no-access-log`` silences the access lines too (aborts and 502/504s, at
    WARNING, still show). Plugin output arrives on ``mint_proxy.plugins.<slug>``
    and shows through the same handler.
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
    logging.getLogger("mint_proxy.plugins").setLevel(min(level, logging.INFO))  # plugin output stays visible
