"""mint_proxy: the forwarding layer that runs MINT plugins out of process.

    from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer

    routes = RouteTable({"/peak-picking": "http://127.0.0.1:8005"})
    platform.add_middleware(ProxyMiddleware, routes=routes, tokens=TokenIssuer(secret), mount_path="/api")

``uvicorn mint_proxy:app`` runs the proxy alone from ``config.dev.toml``.
"""

from ._accesslog import enable_access_log
from ._app import DevProxyApp
from ._names import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER
from ._upstream import UpstreamPool
from .admin import AdminApp
from .asgi import ProxyMiddleware
from .devconfig import ConfigWatcher, DevConfig, load_dev_config
from .errors import (
    BadRequest,
    DevConfigError,
    HeadersTooLarge,
    InvalidInternalToken,
    LoopDetected,
    MethodNotAllowed,
    MintProxyError,
    NotFound,
    PayloadTooLarge,
    PluginUnavailable,
    ProxyError,
    RequestTimeout,
    RouteNotFound,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    URITooLong,
)
from .metrics import ProxyMetrics
from .routing import Route, RouteTable, Upstream
from .tokens import (
    InternalTokenAuth,
    InternalTokenClaims,
    TokenIssuer,
    verify_internal_token,
)

__version__ = "0.1.0"

# The standalone app: `uvicorn mint_proxy:app`. Building it reads nothing; it loads at startup.
app = DevProxyApp()

__all__ = [
    "INTERNAL_TOKEN_HEADER",
    "REQUEST_ID_HEADER",
    "AdminApp",
    "BadRequest",
    "ConfigWatcher",
    "DevConfig",
    "DevConfigError",
    "DevProxyApp",
    "HeadersTooLarge",
    "InternalTokenAuth",
    "InternalTokenClaims",
    "InvalidInternalToken",
    "LoopDetected",
    "MethodNotAllowed",
    "MintProxyError",
    "NotFound",
    "PayloadTooLarge",
    "PluginUnavailable",
    "ProxyError",
    "ProxyMetrics",
    "ProxyMiddleware",
    "RequestTimeout",
    "Route",
    "RouteNotFound",
    "RouteTable",
    "TokenIssuer",
    "URITooLong",
    "Upstream",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "app",
    "enable_access_log",
    "load_dev_config",
    "verify_internal_token",
]
