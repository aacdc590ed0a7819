"""Exceptions raised by mint_proxy.

    MintProxyError
    ├── DevConfigError            config.dev.toml is unreadable or invalid
    ├── InvalidInternalToken      an internal token failed verification
    ├── RouteNotFound             RouteTable.remove of a prefix it does not hold (also a KeyError)
    └── ProxyError                a request cannot be proxied; carries the HTTP status
        ├── BadRequest                 400  the request is malformed or ambiguous
        ├── NotFound                   404  no route matches and there is no app behind the proxy
        ├── MethodNotAllowed           405  CONNECT, TRACE, TRACK or PRI on a route prefix
        ├── RequestTimeout             408  the client stopped sending its body
        ├── PayloadTooLarge            413  the body exceeds the route's max_body_bytes
        ├── URITooLong                 414  the request target exceeds MAX_TARGET_BYTES
        ├── HeadersTooLarge            431  the request headers exceed the proxy's limit
        ├── LoopDetected               508  the request already passed through this proxy
        ├── UpstreamUnavailable        502  the plugin refused or dropped the connection
        ├── UpstreamProtocolError      502  the plugin answered with invalid HTTP
        ├── UpstreamRefused            4xx/5xx  the plugin refused a WebSocket upgrade
        ├── PluginUnavailable          503  the supervisor reports the plugin down (BACKOFF, FATAL, STOPPED)
        └── UpstreamTimeout            504  the plugin did not connect or answer in time

Every ``ProxyError`` becomes a JSON response in exactly one place
(``mint_proxy._respond.error_body``). Messages never contain upstream
addresses, exception text from the network layer, or secrets.
"""


class MintProxyError(Exception):
    """Base class of every exception mint_proxy raises on purpose."""


class DevConfigError(MintProxyError):
    """Raised when a dev config file is missing, unparsable or invalid.

    The message names the file, the key and the problem.
    """

    def __init__(self, message: str, *, path: str = "", key: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.key = key


class InvalidInternalToken(MintProxyError):
    """Raised when an internal token is missing, malformed, expired or not for this plugin."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RouteNotFound(MintProxyError, KeyError):
    """Raised by ``RouteTable.remove`` for a prefix the table does not hold; names the prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__(f"no route for prefix {prefix!r}")
        self.prefix = prefix

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


class ProxyError(MintProxyError):
    """A request that cannot be proxied. ``status`` is the HTTP status the client receives."""

    status: int = 502
    error: str = "bad_gateway"
    #: Answer with ``Connection: close``: the rest of the request body is not worth reading.
    close_connection: bool = False
    #: Headers the status needs to mean anything (``Allow`` for 405), sent with the JSON error.
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ProxyError):
    """Raised for a malformed or ambiguous request (framing, dot segments, bad target)."""

    status = 400
    error = "bad_request"
    # RFC 9112 §6.3: after refusing a request whose framing may be misread, close the
    # connection, so no byte that followed it is ever read as a request of its own.
    close_connection = True


class NotFound(ProxyError):
    """Raised when no route matches and there is no app to fall through to."""

    status = 404
    error = "not_found"


class MethodNotAllowed(ProxyError):
    """Raised for a method the proxy never forwards to a plugin (CONNECT, TRACE, TRACK, PRI)."""

    status = 405
    error = "method_not_allowed"
    # Whatever follows a CONNECT head is tunnel data to a server that said yes: never read it as requests.
    close_connection = True
    # RFC 9110 §15.5.6: a 405 lists the methods the target supports. Plugins answer any other
    # method themselves; these are the ones they usually implement.
    headers = ((b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),)


class RequestTimeout(ProxyError):
    """Raised when the client goes idle for too long while sending its body."""

    status = 408
    error = "request_timeout"
    close_connection = True


class PayloadTooLarge(ProxyError):
    """Raised when a request body exceeds the route's ``max_body_bytes``."""

    status = 413
    error = "payload_too_large"
    close_connection = True


class URITooLong(ProxyError):
    """Raised when the request target (path and query, as sent) is longer than the proxy's limit."""

    status = 414
    error = "uri_too_long"
    close_connection = True


class HeadersTooLarge(ProxyError):
    """Raised when the request headers exceed the proxy's size limits."""

    status = 431
    error = "request_header_fields_too_large"
    close_connection = True


class LoopDetected(ProxyError):
    """Raised when a request carries this proxy's own ``Via`` pseudonym (a routing loop)."""

    status = 508
    error = "loop_detected"


class UpstreamUnavailable(ProxyError):
    """Raised when the plugin refuses the connection (after retries) or drops it."""

    status = 502
    error = "bad_gateway"


class UpstreamProtocolError(ProxyError):
    """Raised when the plugin's response is not valid HTTP/1.1."""

    status = 502
    error = "bad_gateway"


class UpstreamRefused(ProxyError):
    """Raised when the plugin refuses a WebSocket upgrade (4xx/5xx); carries the plugin's status."""

    error = "upstream_refused"

    def __init__(self, detail: str, *, status: int) -> None:
        super().__init__(detail)
        self.status = status


class UpstreamTimeout(ProxyError):
    """Raised when connecting to the plugin or waiting for its response times out."""

    status = 504
    error = "gateway_timeout"


class PluginUnavailable(ProxyError):
    """Raised when the supervisor reports the plugin BACKOFF, FATAL or STOPPED beyond the retry window.

    ``retry_after`` (whole seconds) becomes the response's ``Retry-After``.
    """

    status = 503
    error = "plugin_unavailable"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.headers = ((b"retry-after", b"%d" % retry_after),)
