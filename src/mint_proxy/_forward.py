"""What is sent upstream for a route: the request target and the header fields the proxy adds.

One ``Forward`` per route, built when the route changes (``ProxyMiddleware`` keeps them by
prefix) and used by both the HTTP and the WebSocket path, so each rule has one home:

- the request target the plugin receives (``target``): the client's raw path, the route
  prefix stripped when the route says so, the upstream's base path in front;
- the fields the proxy adds after filtering the client's: ``X-Forwarded-*``, ``Via``,
  ``X-Request-Id`` and the plugin's internal token, as a header list (``fields``, for the
  WebSocket handshake) and, with the client's kept fields and the ``Host`` the client did not
  send, as the wire bytes of the upstream request's field lines (``field_lines``, for the HTTP
  path). The lines that only change with the route are serialised once per route, so a request
  formats its own values only. Nothing is parsed back;
- the authority for a ``Host`` the client did not send (``host_field``);
- the prefix the client's path has in front of the plugin's (``prefix``), for
  ``X-Forwarded-Prefix`` and for rewriting ``Location``.
"""

from urllib.parse import quote

from ._types import RawHeaders, Scope
from .errors import BadRequest, URITooLong
from .headers import (
    _PROTO_FIELDS,
    INTERNAL_TOKEN_FIELD,
    REQUEST_ID_FIELD,
    RequestInfo,
    _keep_only,
    field_lines,
    forwarded_fields,
    via_value,
)
from .routing import Route
from .tokens import TokenIssuer

# The longest request target (raw path, '?', query) forwarded: nginx's default, a request line
# that fits in one 8 KiB large_client_header_buffers buffer. Longer is a 414.
MAX_TARGET_BYTES = 8 * 1024
# The request target's path: printable ASCII without '#' and '?' (``raw.translate(_PATH_TABLE) == raw``);
# its query: any printable ASCII (uvicorn's h11 side leaves a '#fragment' in it; the plugin's server
# parses it as it would in-process). Nothing that could end or split the request line.
_PATH_TABLE = _keep_only(bytes(b for b in range(0x21, 0x7F) if b not in b"#?"))
_QUERY_TABLE = _keep_only(bytes(range(0x21, 0x7F)))
# ``forwarded_fields``'s X-Forwarded-Proto for the ASGI schemes, as a field line.
_PROTO_LINES = {scheme: b"%s: %s\r\n" % field for scheme, field in _PROTO_FIELDS.items()}
# A field as ``name: value`` (each pair joined in C: faster than formatting a line per field).
_NAME_VALUE = b": ".join


class Via:
    """This proxy's ``Via`` identity: the marker a loop is detected by, and its fields per HTTP version."""

    __slots__ = ("marker", "_fields")

    def __init__(self, pseudonym: str) -> None:
        self.marker = pseudonym.encode("ascii")
        self._fields = {v: (b"via", via_value(v, self.marker)) for v in ("1.0", "1.1", "2")}

    def field(self, http_version: str) -> tuple[bytes, bytes]:
        return self._fields.get(http_version) or (b"via", via_value(http_version, self.marker))

    def line(self, http_version: str) -> bytes:
        return b"via: %s\r\n" % self.field(http_version)[1]


class Forward:
    """What the proxy works out once per route rather than once per request."""

    __slots__ = (
        "route",
        "mount_path",
        "prefix",
        "host_field",
        "via_marker",
        "_via",
        "_tokens",
        "_clock",
        "_token_from",
        "_token_until",
        "token_field",
        "secret",
        "token_mark",
        "_token_line",
        "_lines_after_host",
    )

    def __init__(self, route: Route, *, mount_path: str, via: Via, tokens: TokenIssuer | None) -> None:
        self.route = route
        self.mount_path = mount_path
        # What the client's path has in front of the plugin's: mount_path + prefix when stripped.
        self.prefix = mount_path + route.prefix if route.strip_prefix else ""
        self.host_field = (b"host", _authority(route))
        self._via = via
        self.via_marker = via.marker  # a request whose Via carries it has looped through this proxy
        self._tokens = tokens
        self._clock = tokens.clock if tokens is not None else _never
        # When the token in ``secret`` stops being the issuer's answer (on its clock): [from, until).
        self._token_from = self._token_until = 0.0
        self.token_field = (INTERNAL_TOKEN_FIELD, b"")
        self.secret = b""  # the token the route's requests carry now, as bytes
        # The end of what every token of this issuer starts with (the last 16 bytes of its JWT header
        # and the dot, the needle ``Connection.begin`` searches with, cut once per renewal, not per
        # request): in a response header it marks an internal token, this one or one the plugin
        # kept from before a renewal.
        self.token_mark = b""
        self._token_line = b""  # token_field as a field line ("" without a TokenIssuer)
        # What follows X-Forwarded-Host and comes before X-Request-Id, by HTTP version: X-Forwarded-Prefix and Via.
        prefix_line = b"x-forwarded-prefix: %s\r\n" % self.prefix.encode("latin-1") if self.prefix else b""
        self._lines_after_host = {v: prefix_line + via.line(v) for v in ("1.0", "1.1", "2")}

    def target(self, scope: Scope) -> bytes:
        """The request-target the plugin receives: the client's raw path, unless stripped."""
        raw: bytes = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
        query: bytes = scope.get("query_string", b"")
        size = len(raw) + len(query)
        if size >= MAX_TARGET_BYTES and size + (1 if query else 0) > MAX_TARGET_BYTES:  # (the '?' counts)
            raise URITooLong(f"the request target is longer than {MAX_TARGET_BYTES} bytes")
        if raw[:1] != b"/" or raw.translate(_PATH_TABLE) != raw:
            raise BadRequest("the request target must be a path of printable ASCII characters")
        route = self.route
        if route.strip_prefix:
            raw = _strip_decoded(raw, len(self.mount_path) + len(route.prefix))
        base = route.upstream.base_path
        if base:
            raw = base.encode("ascii") + (b"" if raw == b"/" and route.strip_prefix else raw)
        elif not raw:
            raw = b"/"
        if not query:
            return raw
        if query.translate(_QUERY_TABLE) != query:
            raise BadRequest("the query string must be printable ASCII characters")
        return raw + b"?" + query

    def fields(self, scope: Scope, info: RequestInfo) -> RawHeaders:
        """Fields the proxy adds after filtering: forwarding, Via, request id, token.

        ``secret`` is then the token these fields carry (read it before the next call).
        """
        fields = forwarded_fields(
            info, client=scope.get("client"), scheme=scope.get("scheme", "http"), forwarded_prefix=self.prefix
        )
        fields.append(self._via.field(scope.get("http_version", "1.1")))
        fields.append((REQUEST_ID_FIELD, info.request_id))
        if self._tokens is not None:
            if not self._token_from <= self._clock() < self._token_until:
                self._renew()
            fields.append(self.token_field)
        return fields

    def field_lines(self, scope: Scope, info: RequestInfo) -> bytes:
        """The upstream request's field lines: the client's kept fields, ``fields``, then ``Host`` if none came.

        The bytes ``headers.field_lines`` makes of ``info.headers + fields(scope, info)`` (plus
        ``host_field`` when ``info.host`` is None), with the per-route lines serialised once.
        ``secret`` is then the token these lines carry, as after ``fields``.
        """
        client = scope.get("client")
        host = info.host
        proto = _PROTO_LINES.get(scope.get("scheme", "http"))
        after_host = self._lines_after_host.get(scope.get("http_version", "1.1"))
        headers = info.headers
        if client is None or host is None or proto is None or after_host is None or not headers:
            # Any other request: the list, serialised (its lines differ in which fields there are).
            added = self.fields(scope, info)
            return field_lines(info.headers + added if host is not None else info.headers + added + [self.host_field])
        if self._tokens is not None and not self._token_from <= self._clock() < self._token_until:
            self._renew()
        return b"%s\r\nx-forwarded-for: %s\r\n%sx-forwarded-host: %s\r\n%sx-request-id: %s\r\n%s" % (
            b"\r\n".join(map(_NAME_VALUE, headers)),  # (CRLF between the lines here, after the last above)
            client[0].encode("latin-1"),
            proto,
            host,
            after_host,
            info.request_id,
            self._token_line,
        )

    def _renew(self) -> None:
        """Take the issuer's current token: the one the route's requests carry from now on."""
        assert self._tokens is not None
        token, self._token_from, self._token_until = self._tokens.token_window(self.route.plugin)
        self.secret = token.encode("ascii")
        self.token_mark = self.secret[: self.secret.index(b".") + 1][-16:]
        self.token_field = (INTERNAL_TOKEN_FIELD, self.secret)
        self._token_line = b"%s: %s\r\n" % self.token_field


def _never() -> float:
    return 0.0


def _authority(route: Route) -> bytes:
    upstream = route.upstream
    if upstream.unix_path:
        return b"localhost"
    return upstream.origin.removeprefix("http://").encode("ascii")


def _strip_decoded(raw: bytes, length: int) -> bytes:
    """Drop the part of ``raw`` that decodes to the first ``length`` characters of the path.

    Route prefixes are ASCII, so each of their characters is one raw byte or one
    ``%XX`` escape; this keeps the rest of the path byte-for-byte as sent, except
    that the '/' the route matched on is a '/' even when it came as ``%2F`` (the
    plugin's path starts there, as under Starlette's ``Mount`` in-process).
    """
    pos = 0
    for _ in range(length):
        pos += 3 if raw[pos : pos + 1] == b"%" else 1
    rest = raw[pos:]
    return b"/" + rest[3:] if rest[:3] in (b"%2F", b"%2f") else rest
