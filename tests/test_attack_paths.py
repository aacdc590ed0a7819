"""Path attacks: traversal vectors, generated paths that must never cross routes, paths built to
cost the route lookup quadratic time, and request targets over 8 KiB."""

import time
from collections.abc import Callable
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mint_proxy import ProxyMiddleware, Route, RouteTable

from .attack_rig import Rig, StartSite, by_parser, first_response, request_once
from .utils import (
    RawBackend,
    Response,
    assert_proxy_error,
    assert_server_refused,
    exchange,
    make_request,
    one_response,
)

pytestmark = pytest.mark.anyio


PATHS = [
    # dot segments, raw or encoded, that cross from /peak into /admin: refused, never normalised
    (b"/peak/../admin", "refused", "refused"),
    (b"/peak/%2e%2e/admin", "refused", "refused"),
    (b"/peak/.%2e/admin", "refused", "refused"),
    (b"/peak/..%2fadmin", "refused", "refused"),  # decodes to /peak/../admin
    (b"/peak%2f..%2fadmin", "refused", "refused"),
    (b"/peak/%2f..%2fadmin", "refused", "refused"),
    (b"/x/../admin", "refused", "refused"),  # resolves into a route
    (b"/peak//../admin", "refused", "refused"),
    (b"/peak;/../admin", "refused", "refused"),  # "peak;" is a segment; ".." still resolves to /admin
    # no dot segment once decoded once: forwarded to the route of the decoded path, raw path intact
    (b"/peak/%252e%252e/admin", "/peak /peak/%252e%252e/admin", "/peak /peak/%252e%252e/admin"),
    (b"/peak/..\\admin", "/peak /peak/..\\admin", "/peak /peak/..\\admin"),  # '\' is not a separator
    (b"/peak/..%5cadmin", "/peak /peak/..%5cadmin", "/peak /peak/..%5cadmin"),
    (b"/peak/..;/admin", "/peak /peak/..;/admin", "/peak /peak/..;/admin"),  # "..;" is not ".."
    (b"/peak/%00/x", "/peak /peak/%00/x", "/peak /peak/%00/x"),
    (b"/peak/..%00/admin", "/peak /peak/..%00/admin", "/peak /peak/..%00/admin"),
    (b"/peak//x", "/peak /peak//x", "/peak /peak//x"),
    (b"/%61dmin/x", "/admin /%61dmin/x", "/admin /%61dmin/x"),  # matching is on the decoded path
    # segments that are not a route prefix: the platform's, untouched
    (b"/peak\\..\\admin", "platform", "platform"),
    (b"/peak%5c..%5cadmin", "platform", "platform"),
    (b"/peak;x/y", "platform", "platform"),
    (b"/admin%00", "platform", "platform"),
    (b"//admin", "platform", "platform"),
    (b"//peak/x", "platform", "platform"),
    (b"/x//../peak/y", "platform", "platform"),  # RFC 3986: ".." removes the empty segment -> /x/peak/y
    # absolute-form: h11 hands the app the whole URL as the path; httptools only its path
    (b"http://evil/peak/x", "platform", "/peak /peak/x"),
    (b"http://evil/admin/x", "platform", "/admin /admin/x"),
    (b"*", "platform", "platform"),  # asterisk-form (OPTIONS *), sent with GET here
    # '#' never belongs in a request target: h11 keeps it in the path, httptools drops the fragment
    (b"/peak/x#/../../admin", "refused", "/peak /peak/x"),
    (b"/peak#/admin", "platform", "/peak /peak"),
]


def check_outcome(rig: Rig, raw: bytes, expected: str) -> None:
    response = one_response(raw)
    handled = [(p, app.seen) for p, app in rig.plugins.items() if app.seen]
    if expected == "refused":
        assert_proxy_error(response, 400, "bad_request")
        rig.untouched()
        assert rig.platform.seen == []
    elif expected == "server":
        assert_server_refused(response)
        rig.untouched()
    elif expected == "platform":
        assert response.status == 200 and "platform" in response.json()
        assert handled == []
        assert len(rig.platform.seen) == 1
    else:
        prefix, raw_path = expected.split(" ")
        assert response.status == 200
        assert [(p, [r["raw_path"] for r in seen]) for p, seen in handled] == [(prefix, [raw_path])]
        assert rig.platform.seen == []


@pytest.mark.parametrize("target, h11, httptools", [pytest.param(*p, id=p[0].decode()) for p in PATHS])
def test_traversal_vector_reaches_only_the_route_of_its_decoded_path(
    rig: Rig, target: bytes, h11: str, httptools: str
) -> None:
    """Refused, or forwarded with the raw path to the route of the decoded path, or the platform's."""
    method = "OPTIONS" if target == b"*" else "GET"
    raw, _ = exchange(rig.port, make_request(target, "Connection: close", method=method))
    check_outcome(rig, raw, by_parser(rig.http, h11, httptools))
    check_path_invariant(rig, raw)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, written out from the RFC (independent of the proxy's implementation)."""
    source, output = path, ""
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = "/" + source[3:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../") or source == "/..":
            source = "/" + source[4:]
            output = output[: max(output.rfind("/"), 0)]
        elif source in (".", ".."):
            source = ""
        else:
            end = source.find("/", 1)
            end = len(source) if end < 0 else end
            output, source = output + source[:end], source[end:]
    return output


def route_of(path: str) -> str | None:
    for prefix in ("/admin", "/peak"):
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return None


def check_path_invariant(rig: Rig, raw: bytes) -> None:
    """Whatever happened: a plugin only ever gets a raw path whose decoded, normalised path is under
    its own prefix (nothing reaches /admin unless it decodes to /admin/...), and the platform gets
    only paths that no route claims, as written or normalised."""
    for prefix, app in rig.plugins.items():
        for record in app.seen:
            decoded = unquote(record["raw_path"])
            assert route_of(decoded) == prefix and route_of(remove_dot_segments(decoded)) == prefix, record
    for raw_path, path in rig.platform.seen:
        if raw_path.startswith(b"/"):
            assert route_of(path) is None and route_of(remove_dot_segments(path)) is None, path


PIECES = ["peak", "admin", "..", ".", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%5c", "%252e", ";", "", "x", "%00"]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6))
def test_generated_paths_never_cross_routes(shared_rig: Rig, pieces: list[str]) -> None:
    """Either a 4xx, or the plugin that answered is the route of the normalised decoded
    path and received exactly the raw path the proxy saw; else the platform, which no route claims."""
    shared_rig.reset()
    target = ("/" + "/".join(pieces)).encode()
    raw, _ = exchange(shared_rig.port, make_request(target, "Connection: close"))
    response = one_response(raw)
    if 400 <= response.status < 500:
        shared_rig.untouched()
        return
    assert response.status == 200
    decoded = unquote(target.decode())
    expected = route_of(decoded)
    handled = {prefix: app.seen for prefix, app in shared_rig.plugins.items() if app.seen}
    if expected is None:
        assert handled == {} and shared_rig.platform.seen == [(target, decoded)]
        assert route_of(remove_dot_segments(decoded)) is None
    else:
        assert list(handled) == [expected] and [r["raw_path"] for r in handled[expected]] == [target.decode()]
        assert route_of(remove_dot_segments(decoded)) == expected
        assert shared_rig.platform.seen == []


DEEP_PATH = "/zz/" + "a/" * 28_000  # the attack: 56 KB of one-letter segments


FLAT_PATH = "/zz/" + "a" * 56_000  # the same length as one segment


def cpu_seconds(call: Callable[[], object], *, times: int) -> float:
    """The least CPU time this thread spent on ``times`` calls, over three rounds (noise only adds)."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(times):
            call()
        best = min(best, time.thread_time() - started)
    return best


@pytest.mark.parametrize("mount_path", ["", "/api"])
def test_deep_path_lookup_costs_what_a_flat_path_of_the_same_length_costs(mount_path: str) -> None:
    """Regression test: the lookup sliced and hashed the path at every '/', 190 ms for 56 KB of
    segments against 3 ms for one segment, so a few requests a second pinned the proxy's core.
    It looks at no more segments than the deepest prefix has."""
    routes = RouteTable([Route("/peak", "http://127.0.0.1:9"), Route("/a/b/c", "http://127.0.0.1:9")])
    middleware = ProxyMiddleware(None, routes=routes, mount_path=mount_path)
    deep, flat = mount_path + DEEP_PATH, mount_path + FLAT_PATH
    assert middleware._match(deep) is None and middleware._match(flat) is None
    deep_cost = cpu_seconds(lambda: middleware._match(deep), times=50)
    flat_cost = cpu_seconds(lambda: middleware._match(flat), times=50)
    assert deep_cost < 5 * flat_cost + 0.002, (deep_cost, flat_cost)


@pytest.mark.parametrize("mount_path", ["", "/api"])
@pytest.mark.parametrize("dots", ["/.", "/..", "/../zz/./a"])
def test_dot_segment_path_lookup_cost_grows_linearly_with_the_path(mount_path: str, dots: str) -> None:
    """Regression test: a path with a dot segment was looked up twice (as sent and resolved), each
    time at the quadratic cost. Resolving it is one pass over its segments: four times the
    segments cost about four times the time, not sixteen."""
    routes = RouteTable([Route("/peak", "http://127.0.0.1:9"), Route("/a/b/c", "http://127.0.0.1:9")])
    middleware = ProxyMiddleware(None, routes=routes, mount_path=mount_path)
    short, long = (mount_path + "/zz/" + "a/" * n + dots for n in (7_000, 28_000))
    assert middleware._match(short) is None and middleware._match(long) is None
    short_cost = cpu_seconds(lambda: middleware._match(short), times=8)
    long_cost = cpu_seconds(lambda: middleware._match(long), times=2) * 4
    assert long_cost < 8 * short_cost + 0.004, (long_cost, short_cost)


def test_route_table_probes_only_as_deep_as_its_deepest_prefix() -> None:
    """A lookup sees the routes of its depth, and a table change brings the new depth with it."""
    table = RouteTable({"/a": "http://127.0.0.1:9"})
    deep = "/a/b/c/" + "x/" * 10_000
    assert table.match(deep) == table.get("/a")
    table.set("/a/b/c", "http://127.0.0.1:8")
    assert table.match(deep) == table.get("/a/b/c")
    assert table.match("/a/b/cc/x") == table.get("/a")
    table.remove("/a/b/c")
    assert table.match(deep) == table.get("/a")
    table.replace({})
    assert table.match(deep) is None


def test_deep_path_does_not_stall_other_clients(start_site: StartSite, ok_backend: RawBackend) -> None:
    """Regression test: six clients sending 56 KB of one-letter segments made another client's
    one-line GET wait 0.9 s. The deep path now costs the server about what a flat one does, and
    gets its answer: the proxy's 404 alone, the platform's own 404 when mounted."""
    # (h11 refuses a head over 16 KiB that arrives in pieces, before the proxy sees it: let it through.)
    site = start_site([Route("/peak", ok_backend.url)], h11_max_incomplete_event_size=256 * 1024)

    def cost(path: str) -> tuple[float, list[Response]]:
        started = time.process_time()  # the whole process: the server's thread does the work
        answers = [request_once(site, path) for _ in range(4)]
        return time.process_time() - started, answers

    cost(FLAT_PATH)  # warm up (imports, first-request setup)
    deep_cost, deep_answers = min((cost(DEEP_PATH) for _ in range(2)), key=lambda result: result[0])
    flat_cost, flat_answers = min((cost(FLAT_PATH) for _ in range(2)), key=lambda result: result[0])
    for response in deep_answers + flat_answers:
        assert response.status == 404
        if site.base:
            assert response.json() == {"detail": "Not Found"}  # the platform's, not the proxy's
        else:
            assert_proxy_error(response, 404, "not_found")
    assert deep_cost < 5 * flat_cost + 0.05, (deep_cost, flat_cost)
    assert request_once(site, "/peak/x").status == 200
    assert ok_backend.connections == 1


@pytest.mark.parametrize("where", ["path", "query"])
def test_request_target_over_8_kib_is_a_414_and_never_reaches_the_plugin(
    start_site: StartSite, ok_backend: RawBackend, where: str
) -> None:
    """Regression test: a 60 KB target was forwarded (and written to the access log). The target
    as sent (path, '?', query) may be 8 KiB, like nginx's request line; one byte more is a 414."""
    site = start_site([Route("/peak", ok_backend.url)])

    def target(size: int) -> str:
        head = site.base + "/peak/x"
        if where == "path":
            return "/peak/x" + "a" * (size - len(head))
        return "/peak/x?q=" + "b" * (size - len(head) - 3)

    response = request_once(site, target(8193), "X-Request-Id: long-1")
    assert_proxy_error(response, 414, "uri_too_long", request_id="long-1")
    assert ok_backend.connections == 0
    assert request_once(site, target(8192)).status == 200
    assert len(ok_backend.requests) == 1


def test_websocket_target_over_8_kib_is_refused_with_414(start_site: StartSite, ok_backend: RawBackend) -> None:
    """(uvicorn's websockets implementations refuse a request line over 8 KiB themselves; wsproto's
    does not, so the proxy's own limit answers there.)"""
    site = start_site([Route("/peak", ok_backend.url)], ws="wsproto")
    handshake = make_request(
        site.base + "/peak/" + "w" * 9000,
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    )
    assert_proxy_error(first_response(site.port, handshake), 414, "uri_too_long")
    assert ok_backend.connections == 0
