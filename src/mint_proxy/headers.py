"""Header rewriting rules, as pure functions over raw ASGI header lists.

Theory of operation
-------------------
A request header list (lowercase ``bytes`` names, order and repeats kept) goes
through ``inspect_request`` once. That single pass:

* drops hop-by-hop headers (RFC 9110 §7.6.1): ``Connection`` and every header it
  names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``,
  ``Transfer-Encoding``, ``Upgrade``, ``Proxy-Authorization``;
* drops the client's framing (``Content-Length``/``Transfer-Encoding``) after
  checking it is unambiguous: the upstream request is framed anew (RFC 9112 §6.3,
  the request-smuggling rules);
* drops ``Expect`` (the ASGI server answers ``100-continue`` itself);
* drops every header the proxy owns and sets itself: ``Forwarded``,
  ``X-Forwarded-*``, ``X-Real-IP``, ``X-Request-Id``, ``X-Mint-Internal-Token``,
  including aliases that servers such as CGI/WSGI gateways fold onto the same
  name (``X_Mint_Internal_Token``, ``X.Mint.Internal.Token``, any case);
* keeps everything else exactly as sent, ``Authorization``, ``Cookie`` and
  ``Host`` included, in order, duplicates included.

The proxy's own headers are appended afterwards (``_forward.Forward.fields``),
so no ``Connection`` token can remove them. Response headers go through
``filter_response``: hop-by-hop and framing headers, and any internal token,
are removed; ``X-Request-Id`` is replaced by the request's; ``Location``
pointing at the upstream is mapped back to the client-visible path, only when the
result is a plain path on the client's host (a rewrite never changes the host).
``drop_fields_containing`` removes fields that carry the request's internal token.
"""

import os
import re
from dataclasses import dataclass

from . import _names
from .errors import BadRequest, HeadersTooLarge, LoopDetected
from .routing import Route

# The proxy's own header names as ASGI servers hand them over: lowercase bytes, derived from
# the one spelling in ``_names`` (public as ``mint_proxy.REQUEST_ID_HEADER`` etc., str).
REQUEST_ID_FIELD = _names.REQUEST_ID_HEADER.lower().encode("ascii")
INTERNAL_TOKEN_FIELD = _names.INTERNAL_TOKEN_HEADER.lower().encode("ascii")
TRACEPARENT_HEADER = b"traceparent"

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
    }
)
# Headers the proxy sets itself; a client's copy is never forwarded.
PROXY_OWNED = frozenset({b"forwarded", b"x-real-ip", REQUEST_ID_FIELD, INTERNAL_TOKEN_FIELD})
_DROP_FROM_REQUEST = HOP_BY_HOP | PROXY_OWNED | {b"content-length", b"expect"}
# Request headers the inspection loop looks at; every other lowercase name is kept as is.
_NOTED = _DROP_FROM_REQUEST | {b"host", b"via"}
_NOTED_BUT_HOST = _NOTED - {b"host"}
# Never removed by a Connection token: the request cannot be routed without it.
_PROTECTED = frozenset({b"host"})
# Response headers never passed to the client. Content-Length is re-added when the
# body length is known; Date and Server are set by the ASGI server in front of us
# (uvicorn, hypercorn, granian all do), so a proxied response looks like a native one
# instead of carrying two of each.
_DROP_FROM_RESPONSE = HOP_BY_HOP | {b"content-length", b"date", b"server", REQUEST_ID_FIELD, INTERNAL_TOKEN_FIELD}

MAX_REQUEST_ID_LENGTH = 128
# Request head limits the proxy enforces itself (431), whatever the ASGI server let
# through: httptools has no limit, and h11's only applies to a head arriving in pieces.
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# W3C Trace Context §3.2: version-traceid-parentid-flags, lowercase hex; version ff, an all-zero
# trace id or parent id are invalid; a future version may append fields after a '-'.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[ -~]*)?")
_ZERO_TRACE = b"0" * 32
_DIGITS = re.compile(rb"[0-9]{1,18}")
_VALUE_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])  # RFC 9110 field-value bytes, and tab
_PLAIN_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-\n"  # lowercase names, newline-joined


def _keep_only(allowed: bytes) -> bytes:
    """A bytes.translate table that maps each allowed byte to itself and every other byte to another one."""
    return bytes(byte if byte in allowed else allowed[0] for byte in range(256))


# Whole-string character checks: ``text.translate(table) == text`` holds exactly when every
# byte of ``text`` is allowed. A translate with a table (and no ``delete``) is one C loop
# over the bytes, and returns ``text`` itself when nothing changed, so the comparison is
# free; it is about twice as fast as ``translate(None, delete)``, which builds its table
# on every call, and many times faster than a regex search.
_VALUE_TABLE = _keep_only(_VALUE_BYTES)
_PLAIN_NAME_TABLE = _keep_only(_PLAIN_NAME_BYTES)
# RFC 9110 §5.5: a field value is VCHAR, SP, HTAB and obs-text; no CR, LF, NUL or other controls.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110 §7.2: Host is uri-host [ ":" port ]; nothing that could smuggle a path or user info.
_HOST_VALUE = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
# A rewritten Location must be a path on this host whatever reads it: '/' then neither '/' nor '\\'
# (browsers read both "//evil" and "/\\evil" as another host) and only printable ASCII after it (they
# drop tabs and newlines anywhere in a URL and strip leading spaces and controls, so "/\t/evil" is "//evil").
_PLAIN_PATH = re.compile(rb"/(?:[!-.0-\[\]-~][!-~]*)?")
_ABSOLUTE_URL = re.compile(rb"(?i)(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?(?=[/?#]|$)")


# Request ids are drawn 256 at a time: one getrandom() syscall per 256 requests, and a
# list pop per request (cheaper than resuming a generator and slicing).
_id_pool: list[bytes] = []


def _refill_ids() -> None:
    block = os.urandom(16 * 256).hex().encode("ascii")
    _id_pool.extend([block[start : start + 32] for start in range(0, len(block), 32)])


# A forked worker must not hand out the ids its parent had already drawn.
os.register_at_fork(after_in_child=_id_pool.clear)


def new_request_id() -> bytes:
    """128 random bits (from os.urandom) as 32 lowercase hex characters."""
    try:
        return _id_pool.pop()
    except IndexError:
        _refill_ids()
        return _id_pool.pop()


def client_request_id(raw: list[tuple[bytes, bytes]]) -> bytes | None:
    """The client's ``X-Request-Id`` if it is acceptable (rule 8), else its trace id, else ``None``.

    Used on the error path, where ``inspect_request`` raised before returning it.
    """
    values = [value for name, value in raw if name == REQUEST_ID_FIELD]
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    return trace_id(raw)


def trace_id(raw: list[tuple[bytes, bytes]]) -> bytes | None:
    """The trace id of the request's one valid W3C ``traceparent``, else ``None``.

    The header itself (and ``tracestate``) is forwarded untouched either way; this only
    reads it, so that a request without its own ``X-Request-Id`` takes the trace id as
    its request id and the access log and the traces join.
    """
    values = [value for name, value in raw if name == TRACEPARENT_HEADER]
    if len(values) != 1:
        return None  # none, or several: the spec says to ignore them all (W3C Trace Context §3.2)
    match = _TRACEPARENT.fullmatch(values[0])
    if match is None or match[1] == b"ff" or match[2] == _ZERO_TRACE or match[3] == b"0" * 16:
        return None
    if match[1] == b"00" and match[4]:
        return None  # version 00 has exactly four fields
    return match[2]


def _canonical(name: bytes) -> bytes:
    """Fold the aliases some servers treat as equal: case, ``_`` and ``.`` for ``-``."""
    return name.lower().replace(b"_", b"-").replace(b".", b"-")


def _is_proxy_owned(name: bytes) -> bool:
    return name in PROXY_OWNED or name.startswith(b"x-forwarded-")


def _is_dropped_alias(name: bytes) -> bool:
    canonical = _canonical(name)
    return canonical in _DROP_FROM_REQUEST or _is_proxy_owned(canonical)


@dataclass(slots=True)
class RequestInfo:
    """What ``inspect_request`` learned from the client's headers."""

    headers: list[tuple[bytes, bytes]]
    request_id: bytes
    host: bytes | None
    content_length: int | None
    chunked: bool
    trace_id: bytes | None = None  # from a valid ``traceparent``


def inspect_request(raw: list[tuple[bytes, bytes]], http_version: str, via_marker: bytes) -> RequestInfo:
    """Validate and filter a request's headers; raise ``BadRequest`` or ``LoopDetected``.

    The checks that look at every byte run once over all names and all values
    joined (one C-level translate pass each); the per-header loop only sorts names,
    and the common request (plain names, one Host, nothing to drop) never reaches it.
    """
    count = len(raw)
    if count > MAX_HEADERS:
        raise HeadersTooLarge(f"more than {MAX_HEADERS} request headers")
    # zip(*raw) splits the pairs into a names tuple and a values tuple in C, faster than two
    # comprehensions. Not strict=True: that keyword alone costs more than the rest of the line,
    # and ASGI (and the annotation) promise two-item headers.
    name_list, value_list = zip(*raw) if raw else ((), ())  # noqa: B905
    names = b"\n".join(name_list)
    values = b"\t".join(value_list)  # a tab is a valid value byte
    # The joins add 2 * (count - 1) separator bytes: only a join past the limit needs the exact sum.
    if len(names) + len(values) > MAX_HEADER_BYTES and len(names) + len(values) - 2 * (count - 1) > MAX_HEADER_BYTES:
        raise HeadersTooLarge(f"the request headers are larger than {MAX_HEADER_BYTES} bytes")
    if values.translate(_VALUE_TABLE) != values:
        name = next(name for name, value in raw if _BAD_VALUE.search(value))
        raise BadRequest(f"header {name.decode('latin-1')!r} contains a control character")
    # Aliases (case, '_', '.') and X-Forwarded-* need a closer look; usually there are none.
    # (find, not `in`: bytes.__contains__ first tries its argument as an int, which costs more than the search.)
    unusual = names.translate(_PLAIN_NAME_TABLE) != names or names.find(b"x-forwarded-") >= 0
    if unusual or not _NOTED_BUT_HOST.isdisjoint(name_list) or name_list.count(b"host") != 1:
        return _inspect_fully(raw, names, unusual, http_version=http_version, via_marker=via_marker)
    # The common request: plain names and one Host, nothing to drop (what ``_inspect_fully`` would
    # decide for it, in fewer steps; a property test in tests/test_headers.py holds the two together).
    host = value_list[name_list.index(b"host")]
    if host not in _valid_hosts:
        _check_host(host)
    kept = raw if type(raw) is list else list(raw)  # (nothing is dropped: the list itself, never changed)
    if names.find(TRACEPARENT_HEADER) < 0:
        return RequestInfo(kept, new_request_id(), host, None, False)
    trace = trace_id(raw)
    return RequestInfo(kept, trace or new_request_id(), host, None, False, trace)


def _inspect_fully(
    raw: list[tuple[bytes, bytes]], names: bytes, unusual: bool, *, http_version: str, via_marker: bytes
) -> RequestInfo:
    """``inspect_request``'s rules, field by field, once the checks over all bytes have passed.

    ``names`` is every name joined by newlines; ``unusual``: whether any may be an alias
    ('_', '.', uppercase) or an ``X-Forwarded-*``.
    """
    kept: list[tuple[bytes, bytes]] = []
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    request_ids: list[bytes] = []
    connection_tokens: set[bytes] = set()
    for item in raw:
        name = item[0]
        if name in _NOTED:
            value = item[1]
            if name == b"host":
                hosts.append(value)
            elif name == b"via":
                if via_marker in value and _via_names(value, via_marker):
                    raise LoopDetected("the request already passed through this proxy (a route points back at it)")
            else:
                if name == b"content-length":
                    lengths.extend(v.strip() for v in value.split(b","))
                elif name == b"transfer-encoding":
                    encodings.append(value)
                elif name == b"connection":
                    connection_tokens.update(t.strip().lower() for t in value.split(b","))
                elif name == REQUEST_ID_FIELD:
                    request_ids.append(value)
                continue
        elif unusual and _is_dropped_alias(name):
            continue
        kept.append(item)

    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if hosts:
        _check_host(hosts[0])
    if not hosts and http_version == "1.1":
        raise BadRequest("HTTP/1.1 request without a Host header")

    content_length = None
    if encodings:
        if lengths:
            raise BadRequest("both Content-Length and Transfer-Encoding are present")
        if http_version != "1.1":
            raise BadRequest(f"Transfer-Encoding is not allowed in an HTTP/{http_version} request")
        if len(encodings) != 1 or encodings[0].strip().lower() != b"chunked":
            raise BadRequest("Transfer-Encoding must be exactly 'chunked'")
    elif lengths:
        # One value only: a list, even of equal values, is refused like nginx does (the
        # desync corpus classes "Content-Length: 1000,1000" as severe).
        if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0]):
            raise BadRequest("Content-Length must be one non-negative decimal number")
        content_length = int(lengths[0])

    if connection_tokens:
        connection_tokens -= _PROTECTED
        connection_tokens.discard(b"")
        if connection_tokens - {b"keep-alive", b"close"}:
            kept = [(n, v) for n, v in kept if n not in connection_tokens]

    valid = len(request_ids) == 1 and _REQUEST_ID.fullmatch(request_ids[0])
    request_id = request_ids[0] if valid else None
    trace = trace_id(raw) if names.find(TRACEPARENT_HEADER) >= 0 else None
    return RequestInfo(
        kept,
        request_id or trace or new_request_id(),
        hosts[0] if hosts else None,
        content_length,
        bool(encodings),
        trace,
    )


# Host values that passed ``_HOST_VALUE``: a client sends the same one on every request, and a set
# lookup costs a tenth of the match. Cleared when full, so it stays small whatever clients send.
_valid_hosts: set[bytes] = set()
_MAX_VALID_HOSTS = 256


def _check_host(host: bytes) -> None:
    if host not in _valid_hosts:
        if not _HOST_VALUE.fullmatch(host):
            raise BadRequest("the Host header is not a host[:port]")
        if len(_valid_hosts) >= _MAX_VALID_HOSTS:
            _valid_hosts.clear()
        _valid_hosts.add(host)


def _via_names(value: bytes, marker: bytes) -> bool:
    """Whether ``marker`` is the received-by of any entry in a Via list (not just a substring)."""
    for entry in value.split(b","):
        parts = entry.split()
        if len(parts) >= 2 and parts[1] == marker:
            return True
    return False


_PROTO_FIELDS = {
    "http": (b"x-forwarded-proto", b"http"),
    "https": (b"x-forwarded-proto", b"https"),
    "ws": (b"x-forwarded-proto", b"http"),
    "wss": (b"x-forwarded-proto", b"https"),
}


def forwarded_fields(
    info: RequestInfo, *, client: tuple[str, int] | None, scheme: str, forwarded_prefix: str
) -> list[tuple[bytes, bytes]]:
    """The ``X-Forwarded-*`` fields, built only from the ASGI scope (never from client headers).

    The ASGI server decides which upstream proxies to trust (uvicorn's
    ``--forwarded-allow-ips``) and has already put the result in the scope.
    """
    proto = _PROTO_FIELDS.get(scheme) or (b"x-forwarded-proto", scheme.encode("latin-1"))
    fields = [(b"x-forwarded-for", client[0].encode("latin-1")), proto] if client else [proto]
    if info.host is not None:
        fields.append((b"x-forwarded-host", info.host))
    if forwarded_prefix:
        fields.append((b"x-forwarded-prefix", forwarded_prefix.encode("latin-1")))
    return fields


def field_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``name: value`` CRLF for each header, as they go on the wire."""
    return b"".join([b"%s: %s\r\n" % field for field in headers])


def via_value(http_version: str, pseudonym: bytes) -> bytes:
    """RFC 9110 §7.6.3: ``received-protocol received-by``; HTTP is implied, so ``1.1 name``."""
    return http_version.encode("latin-1") + b" " + pseudonym


def filter_response(
    raw: list[tuple[bytes, bytes]], request_id: bytes, route: Route, client_prefix: str
) -> list[tuple[bytes, bytes]]:
    """Remove hop-by-hop, framing and internal headers; set the request id; map ``Location``."""
    # The usual response needs one pass: drop the fixed set, keep the rest as is. A
    # Connection header (its tokens name more headers to drop, possibly ones already
    # kept), a Location, or a name with '_' or '.' (an alias of an internal header)
    # sends it through the full rules below instead. Names already kept once are
    # remembered: a set lookup instead of three checks.
    out: list[tuple[bytes, bytes]] = []
    for item in raw:
        name = item[0]
        if name in _DROPPED_AS_IS:
            continue
        if name not in _plain_response_names:
            if name == b"connection" or name == b"location" or name.find(b"_") >= 0 or name.find(b".") >= 0:
                return _filter_response_fully(raw, request_id=request_id, route=route, client_prefix=client_prefix)
            if len(_plain_response_names) >= _MAX_PLAIN_RESPONSE_NAMES:
                _plain_response_names.clear()
            _plain_response_names.add(name)
        out.append(item)
    out.append((REQUEST_ID_FIELD, request_id))
    return out


# Response fields ``filter_response`` drops without a second look (Connection needs one: its tokens).
_DROPPED_AS_IS = _DROP_FROM_RESPONSE - {b"connection"}
# Names ``filter_response`` kept as they are (the same few on every response of a plugin). Cleared
# when full, so it stays small whatever a plugin sends.
_plain_response_names: set[bytes] = set()
_MAX_PLAIN_RESPONSE_NAMES = 256


def _filter_response_fully(
    raw: list[tuple[bytes, bytes]], *, request_id: bytes, route: Route, client_prefix: str
) -> list[tuple[bytes, bytes]]:
    connection_tokens: set[bytes] = set()
    for name, value in raw:
        if name == b"connection":
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
    out: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        if name in _DROP_FROM_RESPONSE or name in connection_tokens:
            continue
        if b"_" in name or b"." in name:
            canonical = _canonical(name)
            if canonical in (REQUEST_ID_FIELD, INTERNAL_TOKEN_FIELD):
                continue
        if name == b"location":
            value = rewrite_location(value, route=route, client_prefix=client_prefix)
        out.append((name, value))
    out.append((REQUEST_ID_FIELD, request_id))
    return out


def rewrite_location(value: bytes, *, route: Route, client_prefix: str) -> bytes:
    """Map a ``Location`` on the upstream's own origin back to the path the client sees.

    ``client_prefix`` is what the client's path has in front of the upstream's
    path: ``mount_path + prefix`` when the route strips its prefix, else ``""``.
    An absolute URL on any other origin, and relative references, are left alone.
    Like nginx's ``proxy_redirect default``.
    """
    upstream = route.upstream
    match = _ABSOLUTE_URL.match(value)
    if match is not None:
        scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
        default = b"80" if scheme == b"http" else b"443"
        same_origin = (
            scheme == b"http"
            and not upstream.unix_path
            and host == upstream.host.encode("latin-1")
            and int(port or default) == upstream.port
        )
        if not same_origin:
            return value
        path = value[match.end() :]
        if not path.startswith(b"/"):
            path = b"/" + path  # "http://host?q" means the root with a query
    elif value.startswith(b"/") and not value.startswith(b"//") and (client_prefix or upstream.base_path):
        path = value
    else:
        return value
    base = upstream.base_path.encode("latin-1")
    if base:
        if not (path == base or path.startswith(base + b"/") or path.startswith(base + b"?")):
            return value  # outside the base path: not something the client can reach through us
        path = path[len(base) :]
        if not path.startswith(b"/"):
            path = b"/" + path
    rewritten = client_prefix.encode("latin-1") + path
    # A rewrite never changes the host: a result a browser could read as another host (or that
    # needs a browser's clean-up to be read at all) leaves the plugin's own value in place, which
    # at worst names the plugin's origin.
    return rewritten if _PLAIN_PATH.fullmatch(rewritten) else value


def drop_fields_containing(
    raw: list[tuple[bytes, bytes]], secret: bytes
) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """``raw`` without the fields whose value contains ``secret``, and the names of those dropped."""
    kept: list[tuple[bytes, bytes]] = []
    dropped: list[bytes] = []
    for name, value in raw:
        if secret in value or secret in name:
            dropped.append(name)
        else:
            kept.append((name, value))
    return kept, dropped
