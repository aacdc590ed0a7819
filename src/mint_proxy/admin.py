"""The admin views: one ASGI app serving ``/healthz``, ``/metrics`` and ``/routes``.

    admin = AdminApp(routes, metrics=metrics, plugin_status=supervisor.statuses)
    platform.mount("/_mint", admin)          # behind the platform's own admin auth

The standalone app (``uvicorn mint_proxy:app``) serves the same app under
``[settings] admin_path`` (default ``/_mint``). Paths are taken relative to the
scope's ``root_path`` (where the app is mounted). Nothing here shows a secret:
routes list prefix, plugin, upstream (which never holds user info) and options;
plugin statuses leave out the log tail and the environment.

* ``GET healthz``: ``{"status": "ok"}`` while the process serves requests.
* ``GET metrics``: Prometheus text (``ProxyMetrics.render``); 404 when metrics are off.
* ``GET routes``: ``{"routes": [...]}``, each route's client-visible ``path``,
  ``prefix``, ``plugin``, ``upstream``, options and, when the plugin is supervised,
  its ``state``, ``pid``, ``restarts``, ``since``, ``last_exit``, ``retry_after``.
"""

import json
import math
from collections.abc import Mapping
from typing import Any

from ._respond import send_error
from ._types import Receive, Scope, Send
from .headers import client_request_id, new_request_id
from .metrics import CONTENT_TYPE, MetricsUnavailable, PluginStatusProvider, ProxyMetrics
from .plugins.spec import PluginStatus
from .routing import Route, RouteTable

_STATUS_FIELDS = ("state", "pid", "restarts", "since", "last_exit", "retry_after", "start_seconds")


class AdminApp:
    """Health, metrics and the route table as one ASGI app (``http`` only)."""

    def __init__(
        self,
        routes: RouteTable,
        *,
        metrics: ProxyMetrics | None = None,
        plugin_status: PluginStatusProvider | None = None,
        mount_path: str = "",
    ) -> None:
        self.routes = routes
        self.metrics = metrics
        self.plugin_status = plugin_status if plugin_status is not None else (metrics and metrics.plugin_status)
        self.mount_path = mount_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008, "reason": "not a WebSocket endpoint"})
            return
        request_id = client_request_id(scope["headers"]) or new_request_id()
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        view = {"/healthz": self._healthz, "/metrics": self._metrics, "/routes": self._routes}.get(path)
        if view is None:
            await send_error(send, 404, "not_found", "no admin view here: try healthz, metrics or routes", request_id)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(send, 405, "method_not_allowed", "admin views answer GET and HEAD", request_id)
            return
        try:
            status, content_type, body = view()
        except MetricsUnavailable as exc:
            await send_error(send, 404, "not_found", str(exc), request_id)
            return
        headers = [
            (b"content-type", content_type.encode("ascii")),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
            (b"x-request-id", request_id),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def _healthz(self) -> tuple[int, str, bytes]:
        return 200, "application/json", b'{"status":"ok"}'

    def _metrics(self) -> tuple[int, str, bytes]:
        if self.metrics is None:
            raise MetricsUnavailable("metrics are off (pass metrics=ProxyMetrics() to the proxy and this app)")
        return 200, CONTENT_TYPE, self.metrics.render()

    def _routes(self) -> tuple[int, str, bytes]:
        statuses: Mapping[str, PluginStatus] = self.plugin_status() if self.plugin_status else {}
        by_prefix = {status.prefix: status for status in statuses.values()}
        listed = [self._route(route, by_prefix.get(route.prefix)) for route in self.routes.routes()]
        body = json.dumps({"mount_path": self.mount_path, "routes": listed}, indent=2).encode()
        return 200, "application/json", body

    def _route(self, route: Route, status: PluginStatus | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.mount_path + route.prefix,
            "prefix": route.prefix,
            "plugin": route.plugin,
            "upstream": str(route.upstream),
            "strip_prefix": route.strip_prefix,
            "connect_timeout": _seconds(route.connect_timeout),
            "read_timeout": _seconds(route.read_timeout),
            "max_body_bytes": route.max_body_bytes,
            "supervised": status is not None,
        }
        if status is not None:
            full = status.to_json()
            data.update({key: full[key] for key in _STATUS_FIELDS})
        return data


def _seconds(value: float) -> float | None:
    return None if math.isinf(value) else value  # JSON has no Infinity: null means "never"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
