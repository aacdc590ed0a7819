"""Routes and the route table: which prefix goes to which plugin upstream.

The table is copy-on-write: every change builds a new dict and swaps it in with
one assignment, so a lookup always sees one consistent table and a request that
already holds its ``Route`` keeps it until it finishes, whatever changes meanwhile.
Lookup probes the path's segment boundaries from the longest candidate down, one
dict probe each, but only the boundaries a configured prefix could end at: at most
as many segments as the deepest prefix has, and never a slice longer than the
longest prefix. Its cost is one scan of the path's first segments plus a few
short probes, whatever the path's length and depth and however many routes there
are (a path of 28,000 segments used to cost 28,000 slices and hashes).
"""

import ipaddress
import math
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RouteNotFound

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRY_WINDOW = 2.0  # seconds refused connections to a plugin are retried (a restart)
DEFAULT_READ_TIMEOUT = 300.0
# uvicorn's --ws-max-size default: the largest WebSocket message relayed in either direction.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# One path segment of a prefix: RFC 3986 pchar without percent-encoding.
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")
# A host name (RFC 1123 labels, which covers dotted IPv4) or a bracketed IPv6 address (checked by ipaddress).
_HOST = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\]"
)
_BASE_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")
_PLUGIN = re.compile(r"[!-~]+")  # printable ASCII, no spaces: it becomes the token's `sub`


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a plugin listens: a TCP ``host:port`` or a Unix socket path, plus a base path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""
    base_path: str = ""
    # Where connections go (``host:port`` or the socket path): the connection pool's key.
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        address = f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"
        object.__setattr__(self, "address", address)

    @classmethod
    def parse(cls, url: str) -> "Upstream":
        """Parse ``http://host[:port][/base]`` or ``unix:/path/to.sock``; raise ``ValueError``."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a string, not {type(url).__name__}")
        if url.startswith("unix:"):
            path = url[len("unix:") :]
            if not path.startswith("/") or "\x00" in path:
                raise ValueError(f"unix upstream {url!r} must be 'unix:/absolute/path.sock'")
            return cls(unix_path=path)
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise ValueError(f"upstream URL {url!r} must look like 'http://host:port' or 'unix:/path.sock'")
        if scheme.lower() != "http":
            raise ValueError(f"upstream URL {url!r} has scheme {scheme!r}: only 'http' and 'unix' are supported")
        if any(c in rest for c in "?#@\\") or any(c.isspace() for c in rest):
            raise ValueError(f"upstream URL {url!r} must not contain a query, fragment, user info or spaces")
        authority, slash, path = rest.partition("/")
        base_path = (slash + path).rstrip("/")
        if not _BASE_PATH.fullmatch(base_path) or any(s in (".", "..") for s in base_path.split("/")):
            raise ValueError(f"upstream URL {url!r} has an invalid base path")
        host, port = authority, 80
        if authority.startswith("["):
            if "]" not in authority:
                raise ValueError(f"upstream URL {url!r} has an invalid host (unclosed '[')")
            host, _, after = authority.partition("]")
            host += "]"
            if after:
                if not after.startswith(":"):
                    raise ValueError(f"upstream URL {url!r} has an invalid host")
                port = _parse_port(url, after[1:])
        elif ":" in authority:
            host, _, port_text = authority.rpartition(":")
            port = _parse_port(url, port_text)
        if not host or not _HOST.fullmatch(host) or (host.startswith("[") and not _is_ipv6(host[1:-1])):
            raise ValueError(f"upstream URL {url!r} has an invalid host")
        return cls(host=host.lower(), port=port, base_path=base_path)

    @property
    def origin(self) -> str:
        """The ``scheme://authority`` a plugin uses in absolute ``Location`` headers."""
        if self.unix_path:
            return ""
        return f"http://{self.host}" if self.port == 80 else f"http://{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else self.origin + self.base_path


_PORT = re.compile(r"[0-9]{1,5}")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def seconds(value: object) -> float | None:
    """``value`` as float seconds if it is a real number (not a bool), else ``None``; huge ints become inf."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _parse_port(url: str, text: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise ValueError(f"upstream URL {url!r} has an invalid port {text!r}")
    return int(text)


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, not {type(prefix).__name__}")
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix {prefix!r} must start with '/' and must not end with '/'")
    for segment in prefix[1:].split("/"):
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"prefix {prefix!r} has an invalid segment {segment!r}: use letters, digits and -._~ "
                "with no empty, '.' or '..' segments"
            )
    return prefix


def check_mount_path(mount_path: str) -> str:
    """Return ``mount_path`` if it is ``""`` or a path like ``/api``; raise ``ValueError``."""
    if not isinstance(mount_path, str):
        raise TypeError(f"mount_path must be a string, not {type(mount_path).__name__}")
    if mount_path:
        try:
            _check_prefix(mount_path)
        except ValueError:
            raise ValueError(
                f'mount_path {mount_path!r} must be "" or a path like "/api": '
                "a leading '/', no trailing '/', no empty or dot segments"
            ) from None
    return mount_path


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule: requests under ``prefix`` go to the plugin at ``url``.

        Route("/peak-picking", "http://127.0.0.1:8005")
        Route("/lcms", "unix:/run/mint/lcms.sock", plugin="lcms-sequence", strip_prefix=True)

    ``plugin`` defaults to the prefix without its leading ``/`` and is the ``sub``
    of the internal token. Timeouts are in seconds; ``read_timeout`` is the longest
    the plugin may stay silent (before its response head or between body chunks).
    ``max_message_bytes`` is the largest WebSocket message relayed either way; a
    larger one closes both sides with 1009 (RFC 6455 §7.4.1, "message too big").
    """

    prefix: str
    url: str
    plugin: str = ""
    strip_prefix: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_body_bytes: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    upstream: Upstream = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)
        object.__setattr__(self, "upstream", Upstream.parse(self.url))
        plugin = self.plugin or self.prefix[1:]
        if not isinstance(plugin, str) or not _PLUGIN.fullmatch(plugin):
            raise ValueError(f"plugin {plugin!r} must be a non-empty slug of printable ASCII without spaces")
        object.__setattr__(self, "plugin", plugin)
        if not isinstance(self.strip_prefix, bool):
            raise TypeError("strip_prefix must be a bool")
        for name in ("connect_timeout", "read_timeout"):
            given = getattr(self, name)
            value = seconds(given)
            if value is None or not value > 0:  # (inf: never time out)
                raise ValueError(f"{name} must be a positive number of seconds, got {given!r}")
            object.__setattr__(self, name, value)
        limit = self.max_body_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"max_body_bytes must be a non-negative integer or None, got {limit!r}")
        size = self.max_message_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"max_message_bytes must be a positive integer, got {size!r}")


RouteSource = Mapping[str, str] | Iterable[Route]


def _build(routes: RouteSource) -> dict[str, Route]:
    items: Iterable[Route]
    if isinstance(routes, Mapping):
        items = [Route(prefix, url) for prefix, url in routes.items()]
    else:
        items = routes
    table: dict[str, Route] = {}
    for route in items:
        if not isinstance(route, Route):
            raise TypeError(f"routes must be a {{prefix: url}} mapping or Route objects, got {route!r}")
        if route.prefix in table:
            raise ValueError(f"duplicate route for prefix {route.prefix!r}")
        table[route.prefix] = route
    return table


class RouteTable:
    """The production routing table, safe to change while requests flow.

        table = RouteTable({"/peak-picking": "http://127.0.0.1:8005"})
        table.set("/lcms", "unix:/run/mint/lcms.sock", read_timeout=3600)
        table.remove("/peak-picking")
        table.replace([Route("/a", "http://127.0.0.1:9001")])
        for route in table.routes(): print(route.prefix, route.upstream)

    Changes are atomic and never affect requests already in flight.
    """

    def __init__(self, routes: RouteSource = ()) -> None:
        self._routes: dict[str, Route] = {}
        self._lookup: tuple[dict[str, Route], int, int] = ({}, 0, 0)
        # Writers copy, change and swap under this lock (a platform may change routes from worker
        # threads); readers never take it: they see the old dict or the new one.
        self._writing = threading.Lock()
        self._swap(_build(routes))

    def _swap(self, routes: dict[str, Route]) -> None:
        """Make ``routes`` the table. ``match`` reads one tuple, so it never pairs a dict with another's bounds."""
        depth = max((route.prefix.count("/") for route in routes.values()), default=0)
        longest = max((len(prefix) for prefix in routes), default=0)
        self._routes = routes
        self._lookup = (routes, depth, longest)

    def set(self, prefix: str, url: str, **options: Any) -> Route:
        """Add or replace the route for ``prefix``; return it."""
        route = Route(prefix, url, **options)
        self.add(route)
        return route

    def add(self, route: Route) -> None:
        """Add or replace a route built elsewhere."""
        if not isinstance(route, Route):
            raise TypeError(f"expected a Route, got {route!r}")
        with self._writing:
            routes = dict(self._routes)
            routes[route.prefix] = route
            self._swap(routes)

    def remove(self, prefix: str) -> Route:
        """Remove the route for ``prefix`` and return it.

        Raise ``RouteNotFound`` (a ``KeyError`` and a ``MintProxyError``) naming the prefix
        if there is none: removing a route that is not there is a caller's mistake (a typo,
        or a double teardown) worth seeing; ``if prefix in table`` makes it a no-op.
        """
        with self._writing:
            routes = dict(self._routes)
            try:
                route = routes.pop(prefix)
            except KeyError:
                raise RouteNotFound(prefix) from None
            self._swap(routes)
        return route

    def routes(self) -> list[Route]:
        """The routes in the table now, longest prefix first (the order requests are matched in).

        One consistent snapshot: a change made meanwhile is either all in it or not at all.
        """
        return sorted(self._routes.values(), key=lambda route: (-len(route.prefix), route.prefix))

    def replace(self, routes: "RouteSource | RouteTable") -> None:
        """Swap in a whole new set of routes at once."""
        new = dict(routes._routes) if isinstance(routes, RouteTable) else _build(routes)
        with self._writing:
            self._swap(new)

    def match(self, path: str) -> Route | None:
        """Return the route with the longest prefix matching ``path`` at a segment boundary."""
        routes, depth, longest = self._lookup
        # The end of the path's first `depth` segments: no prefix has more. (find is memchr:
        # one pass over those segments, never over the rest of the path.)
        end = path.find("/", 1)
        while depth > 1 and end >= 0:  # (no range(): the usual table has depth 1 or 2)
            end = path.find("/", end + 1)
            depth -= 1
        if end < 0:
            end = len(path)
        if end > longest:  # no prefix is that long: start at the last boundary one could end at
            end = path.rfind("/", 0, longest + 1)
        while end > 0:
            route = routes.get(path[:end])
            if route is not None:
                return route
            end = path.rfind("/", 0, end)
        return None

    def get(self, prefix: str) -> Route | None:
        return self._routes.get(prefix)

    def __contains__(self, prefix: object) -> bool:
        return prefix in self._routes

    def __iter__(self) -> Iterator[Route]:
        return iter(list(self._routes.values()))

    def __len__(self) -> int:
        return len(self._routes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteTable) and self._routes == other._routes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RouteTable({list(self._routes.values())!r})"
