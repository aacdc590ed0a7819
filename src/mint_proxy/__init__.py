"""mint_proxy: the forwarding layer that runs MINT plugins out of process.

    from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer

    routes = RouteTable({"/peak-picking": "http://127.0.0.1:8005"})
    platform.add_middleware(ProxyMiddleware, routes=routes, tokens=TokenIssuer(secret), mount_path="/api")

``uvicorn mint_proxy:app`` runs the proxy alone from ``config.dev.toml``.

``__all__`` is what a platform touches. Everything else is importable from its module and may
change: the ``ProxyError`` subclasses (each becomes a JSON error response, never reaching the
caller), ``devconfig.DevConfig``/``ConfigWatcher``, ``_upstream.UpstreamPool`` and
``routing.Upstream``.
"""

from ._accesslog import enable_access_log
from ._app import DevProxyApp
from ._names import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER
from .admin import AdminApp
from .asgi import ProxyMiddleware
from .devconfig import load_dev_config
from .errors import DevConfigError, InvalidInternalToken, MintProxyError, RouteNotFound
from .metrics import ProxyMetrics
from .plugins import PluginSpec, PluginSupervisor, RestartPolicy
from .routing import Route, RouteTable
from .tokens import InternalTokenAuth, InternalTokenClaims, TokenIssuer, verify_internal_token

__version__ = "0.1.0"

# The standalone app: `uvicorn mint_proxy:app`. Building it reads nothing; it loads at startup.
app = DevProxyApp()

__all__ = [
    "INTERNAL_TOKEN_HEADER",
    "REQUEST_ID_HEADER",
    "AdminApp",
    "DevConfigError",
    "DevProxyApp",
    "InternalTokenAuth",
    "InternalTokenClaims",
    "InvalidInternalToken",
    "MintProxyError",
    "PluginSpec",
    "PluginSupervisor",
    "ProxyMetrics",
    "ProxyMiddleware",
    "RestartPolicy",
    "Route",
    "RouteNotFound",
    "RouteTable",
    "TokenIssuer",
    "app",
    "enable_access_log",
    "load_dev_config",
    "verify_internal_token",
]
