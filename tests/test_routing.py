"""Upstream URLs, Route validation and the copy-on-write RouteTable (tier 1: pure functions, no I/O)."""

import sys
import threading
from typing import Any

import pytest

from mint_proxy.routing import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, Route, RouteTable, Upstream

URL = "http://127.0.0.1:8005"
OTHER_URL = "http://127.0.0.1:8006"


# --- Upstream.parse ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # TCP, with and without a port
        pytest.param("http://127.0.0.1:8005", Upstream(host="127.0.0.1", port=8005), id="ip-and-port"),
        pytest.param("http://127.0.0.1", Upstream(host="127.0.0.1", port=80), id="default-port-80"),
        pytest.param("http://plugin.local:1", Upstream(host="plugin.local", port=1), id="lowest-port"),
        pytest.param("http://plugin.local:65535", Upstream(host="plugin.local", port=65535), id="highest-port"),
        pytest.param("http://Plugin.Local:8005", Upstream(host="plugin.local", port=8005), id="host-lowercased"),
        pytest.param("HTTP://plugin.local:8005", Upstream(host="plugin.local", port=8005), id="scheme-any-case"),
        # IPv6 literals keep their brackets
        pytest.param("http://[::1]:8000", Upstream(host="[::1]", port=8000), id="ipv6-and-port"),
        pytest.param("http://[::1]", Upstream(host="[::1]", port=80), id="ipv6-default-port"),
        pytest.param("http://[2001:DB8::1]:8000", Upstream(host="[2001:db8::1]", port=8000), id="ipv6-lowercased"),
        # base paths, trailing '/' dropped
        pytest.param("http://h:8005/base", Upstream(host="h", port=8005, base_path="/base"), id="base-path"),
        pytest.param("http://h:8005/a/b", Upstream(host="h", port=8005, base_path="/a/b"), id="nested-base-path"),
        pytest.param("http://h:8005/base/", Upstream(host="h", port=8005, base_path="/base"), id="base-trailing-slash"),
        pytest.param("http://h:8005/", Upstream(host="h", port=8005), id="root-base-path-is-empty"),
        pytest.param("http://h:8005/a%20b", Upstream(host="h", port=8005, base_path="/a%20b"), id="percent-encoded"),
        # Unix sockets
        pytest.param("unix:/run/mint/lcms.sock", Upstream(unix_path="/run/mint/lcms.sock"), id="unix-socket"),
    ],
)
def test_parse_accepts_a_valid_upstream(url: str, expected: Upstream) -> None:
    assert Upstream.parse(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        # schemes other than http and unix
        pytest.param("https://127.0.0.1:8005", id="https"),
        pytest.param("ftp://127.0.0.1:8005", id="ftp"),
        pytest.param("ws://127.0.0.1:8005", id="ws"),
        pytest.param("127.0.0.1:8005", id="no-scheme"),
        pytest.param("//127.0.0.1:8005", id="scheme-relative"),
        pytest.param("", id="empty"),
        # Unix socket paths must be absolute
        pytest.param("unix:run/mint.sock", id="unix-relative-path"),
        pytest.param("unix:", id="unix-empty-path"),
        pytest.param("unix:/run/mint\x00.sock", id="unix-nul"),
        # query, fragment, user info, spaces, backslash
        pytest.param("http://h:8005/?a=1", id="query"),
        pytest.param("http://h:8005/#top", id="fragment"),
        pytest.param("http://user:pw@h:8005", id="userinfo"),
        pytest.param("http://h :8005", id="space-in-authority"),
        pytest.param("http://h:8005/a b", id="space-in-path"),
        pytest.param("http://h:8005/a\tb", id="tab-in-path"),
        pytest.param("http://h:8005\\x", id="backslash"),
        # bad hosts
        pytest.param("http://", id="no-host"),
        pytest.param("http://:8005", id="port-without-host"),
        pytest.param("http://a_b:8005", id="underscore-in-host"),
        pytest.param("http://h%41:8005", id="percent-in-host"),
        pytest.param("http://a:b:8005", id="two-colons"),
        pytest.param("http://::1:8005", id="ipv6-without-brackets"),
        pytest.param("http://[zz]:8005", id="ipv6-not-hex"),
        pytest.param("http://[::1]8005", id="ipv6-junk-after-bracket"),
        pytest.param("http://[:]:8005", id="ipv6-colon-only"),
        pytest.param("http://[::1::2]:8005", id="ipv6-two-double-colons"),
        pytest.param("http://[1.2.3.4]:8005", id="ipv4-in-brackets"),
        pytest.param("http://-:8005", id="hyphen-only"),
        pytest.param("http://...:8005", id="dots-only"),
        pytest.param("http://a..b:8005", id="empty-label"),
        pytest.param("http://-a.b:8005", id="label-starts-with-hyphen"),
        # dot segments and empty segments in the base path
        pytest.param("http://h:8005/a/../b", id="dot-dot-segment"),
        pytest.param("http://h:8005/./b", id="dot-segment"),
        pytest.param("http://h:8005/..", id="trailing-dot-dot"),
        pytest.param("http://h:8005//b", id="empty-segment"),
        pytest.param("http://h:8005/a|b", id="pipe-in-path"),
    ],
)
def test_parse_rejects_an_invalid_upstream(url: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        Upstream.parse(url)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://h:0", id="zero"),
        pytest.param("http://h:65536", id="above-65535"),
        pytest.param("http://h:abc", id="letters"),
        pytest.param("http://h:", id="empty"),
        pytest.param("http://h:-1", id="negative"),
        pytest.param("http://h:+80", id="plus-sign"),
        pytest.param("http://[::1]:", id="ipv6-empty"),
        pytest.param("http://[::1]:99999", id="ipv6-above-65535"),
    ],
)
def test_parse_rejects_a_bad_port(url: str) -> None:
    with pytest.raises(ValueError, match="invalid port"):
        Upstream.parse(url)


def test_parse_rejects_a_port_of_non_ascii_digits() -> None:
    with pytest.raises(ValueError, match="invalid port"):
        Upstream.parse("http://h:\u0668\u0660")  # ARABIC-INDIC DIGITS EIGHT ZERO


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1:8000"], ids=["no-port", "port-swallowed"])
def test_parse_rejects_an_unclosed_ipv6_bracket(url: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        Upstream.parse(url)


def test_parse_rejects_a_non_string() -> None:
    with pytest.raises(TypeError, match="string"):
        Upstream.parse(b"http://h:1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        pytest.param("http://127.0.0.1:8005", "http://127.0.0.1:8005", id="explicit-port"),
        pytest.param("http://127.0.0.1", "http://127.0.0.1", id="default-port-omitted"),
        pytest.param("http://127.0.0.1:80", "http://127.0.0.1", id="port-80-omitted"),
        pytest.param("http://h:8005/base", "http://h:8005", id="base-path-not-in-origin"),
        pytest.param("http://[::1]:8000", "http://[::1]:8000", id="ipv6"),
        pytest.param("unix:/run/mint.sock", "", id="unix-has-none"),
    ],
)
def test_origin_is_scheme_and_authority(url: str, origin: str) -> None:
    assert Upstream.parse(url).origin == origin


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8005", "http://127.0.0.1", "http://h:8005/base", "unix:/run/mint.sock"],
    ids=["tcp", "default-port", "base-path", "unix"],
)
def test_str_parses_back_to_the_same_upstream(url: str) -> None:
    upstream = Upstream.parse(url)

    assert str(upstream) == url
    assert Upstream.parse(str(upstream)) == upstream


# --- Route -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("/peak-picking", id="one-segment"),
        pytest.param("/api/peak", id="two-segments"),
        pytest.param("/a", id="one-letter"),
        pytest.param("/v1.2", id="dot-inside"),
        pytest.param("/a..b", id="dots-inside"),
        pytest.param("/A_b~c", id="unreserved"),
    ],
)
def test_route_accepts_a_valid_prefix(prefix: str) -> None:
    assert Route(prefix, URL, plugin="p").prefix == prefix


@pytest.mark.parametrize(
    "prefix",
    [
        # must start with '/' and must not end with '/'
        pytest.param("", id="empty"),
        pytest.param("/", id="root"),
        pytest.param("peak", id="no-leading-slash"),
        pytest.param("/peak/", id="trailing-slash"),
        # no empty, '.' or '..' segments
        pytest.param("//peak", id="empty-first-segment"),
        pytest.param("/a//b", id="empty-middle-segment"),
        pytest.param("/.", id="dot"),
        pytest.param("/..", id="dot-dot"),
        pytest.param("/a/./b", id="dot-in-middle"),
        pytest.param("/a/../b", id="dot-dot-in-middle"),
        # only unencoded pchar
        pytest.param("/a b", id="space"),
        pytest.param("/a%20b", id="percent-encoding"),
        pytest.param("/a?b", id="question-mark"),
        pytest.param("/a#b", id="hash"),
        pytest.param("/a\\b", id="backslash"),
        pytest.param("/caf\u00e9", id="non-ascii"),
    ],
)
def test_route_rejects_an_invalid_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Route(prefix, URL, plugin="p")


def test_route_rejects_a_non_string_prefix() -> None:
    with pytest.raises(TypeError, match="prefix"):
        Route(b"/peak", URL)  # type: ignore[arg-type]


def test_route_rejects_an_invalid_url() -> None:
    with pytest.raises(ValueError, match="upstream"):
        Route("/peak", "https://127.0.0.1:8005")


def test_route_parses_its_url_into_an_upstream() -> None:
    assert Route("/peak", "http://127.0.0.1:8005/base").upstream == Upstream("127.0.0.1", 8005, base_path="/base")


@pytest.mark.parametrize(
    ("prefix", "plugin", "expected"),
    [
        pytest.param("/peak-picking", "", "peak-picking", id="default-one-segment"),
        pytest.param("/api/peak", "", "api/peak", id="default-two-segments"),
        pytest.param("/peak-picking", "lcms-sequence", "lcms-sequence", id="explicit"),
    ],
)
def test_plugin_slug_defaults_to_the_prefix_without_its_slash(prefix: str, plugin: str, expected: str) -> None:
    assert Route(prefix, URL, plugin=plugin).plugin == expected


@pytest.mark.parametrize(
    "plugin",
    ["lcms sequence", "tab\tname", "caf\u00e9", "new\nline"],
    ids=["space", "tab", "non-ascii", "newline"],
)
def test_route_rejects_an_invalid_plugin_slug(plugin: str) -> None:
    with pytest.raises(ValueError, match="plugin"):
        Route("/peak", URL, plugin=plugin)


def test_route_defaults_to_no_strip_default_timeouts_and_no_body_limit() -> None:
    route = Route("/peak", URL)

    assert route.strip_prefix is False
    assert route.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert route.read_timeout == DEFAULT_READ_TIMEOUT
    assert route.max_body_bytes is None


def test_route_rejects_a_non_bool_strip_prefix() -> None:
    with pytest.raises(TypeError, match="strip_prefix"):
        Route("/peak", URL, strip_prefix=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["connect_timeout", "read_timeout"])
@pytest.mark.parametrize("value", [0.5, 1, 3600, float("inf")], ids=["half", "int", "hour", "inf"])
def test_route_accepts_a_positive_timeout(name: str, value: float) -> None:
    options: dict[str, Any] = {name: value}

    assert getattr(Route("/peak", URL, **options), name) == value


@pytest.mark.parametrize("name", ["connect_timeout", "read_timeout"])
@pytest.mark.parametrize(
    "value",
    [
        # not positive
        pytest.param(0, id="zero"),
        pytest.param(-1.0, id="negative"),
        pytest.param(float("nan"), id="nan"),
        # not a number; bool is an int subclass but never a timeout
        pytest.param(True, id="true"),
        pytest.param("5", id="string"),
        pytest.param(None, id="none"),
    ],
)
def test_route_rejects_a_bad_timeout(name: str, value: Any) -> None:
    options: dict[str, Any] = {name: value}

    with pytest.raises(ValueError, match=name):
        Route("/peak", URL, **options)


@pytest.mark.parametrize("limit", [None, 0, 1, 10 * 2**20], ids=["none", "zero", "one", "10MiB"])
def test_route_accepts_a_valid_max_body_bytes(limit: int | None) -> None:
    assert Route("/peak", URL, max_body_bytes=limit).max_body_bytes == limit


@pytest.mark.parametrize("limit", [-1, True, 1.5, "10"], ids=["negative", "bool", "float", "string"])
def test_route_rejects_a_bad_max_body_bytes(limit: Any) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        Route("/peak", URL, max_body_bytes=limit)


def test_route_allows_websocket_messages_of_16_mib_by_default() -> None:
    """uvicorn's own --ws-max-size default."""
    assert Route("/peak", URL).max_message_bytes == 16 * 2**20


@pytest.mark.parametrize(
    "limit", [0, -1, True, 1.5, "10", None], ids=["zero", "negative", "bool", "float", "string", "none"]
)
def test_route_rejects_a_bad_max_message_bytes(limit: Any) -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        Route("/peak", URL, max_message_bytes=limit)


def test_routes_with_the_same_fields_are_equal() -> None:
    assert Route("/peak", URL, read_timeout=10) == Route("/peak", URL, read_timeout=10)
    assert Route("/peak", URL) != Route("/peak", OTHER_URL)


# --- RouteTable: building and changing ---------------------------------------------------------


def test_table_from_a_mapping_equals_table_from_routes() -> None:
    from_mapping = RouteTable({"/a": URL, "/b": OTHER_URL})
    from_routes = RouteTable([Route("/a", URL), Route("/b", OTHER_URL)])

    assert from_mapping == from_routes
    assert [route.prefix for route in from_mapping] == ["/a", "/b"]


def test_empty_table_matches_nothing() -> None:
    table = RouteTable()

    assert len(table) == 0
    assert table.match("/a") is None


def test_duplicate_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        RouteTable([Route("/a", URL), Route("/a", OTHER_URL)])


def test_table_refuses_an_item_that_is_not_a_route() -> None:
    with pytest.raises(TypeError, match="Route"):
        RouteTable(["/a"])  # type: ignore[list-item]


def test_table_from_a_mapping_validates_its_urls() -> None:
    with pytest.raises(ValueError, match="upstream"):
        RouteTable({"/a": "https://127.0.0.1:8005"})


def test_set_adds_a_route_with_options_and_returns_it() -> None:
    table = RouteTable()

    route = table.set("/lcms", "unix:/run/mint/lcms.sock", read_timeout=3600, strip_prefix=True)

    assert table.get("/lcms") is route
    assert route.read_timeout == 3600
    assert route.strip_prefix is True


def test_set_replaces_the_route_for_an_existing_prefix() -> None:
    table = RouteTable({"/a": URL})

    table.set("/a", OTHER_URL)

    assert len(table) == 1
    assert table.match("/a") == Route("/a", OTHER_URL)


def test_add_inserts_a_prebuilt_route() -> None:
    table = RouteTable()
    route = Route("/a", URL)

    table.add(route)

    assert table.get("/a") is route


def test_add_refuses_a_non_route() -> None:
    with pytest.raises(TypeError, match="Route"):
        RouteTable().add("/a")  # type: ignore[arg-type]


def test_remove_drops_the_route() -> None:
    table = RouteTable({"/a": URL, "/b": OTHER_URL})

    table.remove("/a")

    assert "/a" not in table
    assert table.match("/a/x") is None
    assert table.match("/b/x") == Route("/b", OTHER_URL)


def test_remove_of_a_missing_prefix_is_a_key_error() -> None:
    table = RouteTable({"/a": URL})

    with pytest.raises(KeyError):
        table.remove("/b")
    assert len(table) == 1


@pytest.mark.parametrize(
    "source",
    [
        pytest.param({"/b": OTHER_URL}, id="mapping"),
        pytest.param([Route("/b", OTHER_URL)], id="routes"),
        pytest.param(RouteTable({"/b": OTHER_URL}), id="route-table"),
    ],
)
def test_replace_swaps_in_a_whole_new_set(source: Any) -> None:
    table = RouteTable({"/a": URL})

    table.replace(source)

    assert table == RouteTable({"/b": OTHER_URL})


def test_replace_from_a_table_does_not_share_later_changes() -> None:
    source = RouteTable({"/a": URL})
    table = RouteTable()

    table.replace(source)
    source.set("/b", OTHER_URL)

    assert "/b" not in table


def test_failed_replace_leaves_the_table_unchanged() -> None:
    table = RouteTable({"/a": URL})

    with pytest.raises(ValueError, match="duplicate"):
        table.replace([Route("/b", URL), Route("/b", OTHER_URL)])

    assert table == RouteTable({"/a": URL})


# --- RouteTable.match --------------------------------------------------------------------------

NESTED = RouteTable({"/peak-picking": URL, "/a": URL, "/a/b": OTHER_URL})


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        # the prefix itself, and anything below it at a segment boundary
        pytest.param("/peak-picking", "/peak-picking", id="exact"),
        pytest.param("/peak-picking/", "/peak-picking", id="trailing-slash"),
        pytest.param("/peak-picking/x", "/peak-picking", id="below"),
        pytest.param("/peak-picking/x/y/z", "/peak-picking", id="deep-below"),
        pytest.param("/peak-picking//x", "/peak-picking", id="empty-segment-below"),
        # never in the middle of a segment
        pytest.param("/peak-pickingX", None, id="longer-segment"),
        pytest.param("/peak-picking.json", None, id="suffix"),
        pytest.param("/peak", None, id="shorter-segment"),
        pytest.param("/PEAK-PICKING", None, id="case-sensitive"),
        # the longest prefix wins
        pytest.param("/a", "/a", id="outer-exact"),
        pytest.param("/a/x", "/a", id="outer-below"),
        pytest.param("/a/bc", "/a", id="outer-lookalike"),
        pytest.param("/a/b", "/a/b", id="inner-exact"),
        pytest.param("/a/b/", "/a/b", id="inner-trailing-slash"),
        pytest.param("/a/b/c", "/a/b", id="inner-below"),
        # nothing matches the root or an empty path
        pytest.param("", None, id="empty"),
        pytest.param("/", None, id="root"),
        pytest.param("//", None, id="double-slash"),
        pytest.param("peak-picking", None, id="no-leading-slash"),
        pytest.param("/other", None, id="unknown"),
    ],
)
def test_match_finds_the_longest_prefix_at_a_segment_boundary(path: str, prefix: str | None) -> None:
    route = NESTED.match(path)

    assert (route.prefix if route else None) == prefix


# --- RouteTable: container protocol ------------------------------------------------------------


def test_table_iterates_routes_in_insertion_order() -> None:
    table = RouteTable({"/b": URL, "/a": URL})
    table.set("/c", URL)

    assert [route.prefix for route in table] == ["/b", "/a", "/c"]
    assert len(table) == 3


def test_contains_and_get_use_the_exact_prefix() -> None:
    table = RouteTable({"/a": URL})

    assert "/a" in table
    assert "/a/x" not in table
    assert 1 not in table
    assert table.get("/a") == Route("/a", URL)
    assert table.get("/a/x") is None


def test_tables_are_equal_by_their_routes() -> None:
    assert RouteTable({"/a": URL}) == RouteTable({"/a": URL})
    assert RouteTable({"/a": URL}) != RouteTable({"/a": OTHER_URL})
    assert RouteTable({"/a": URL}) != RouteTable({"/a": URL, "/b": URL})
    assert RouteTable({"/a": URL}) != {"/a": URL}


def test_table_is_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(RouteTable())


def test_repr_lists_the_routes() -> None:
    assert "/peak" in repr(RouteTable({"/peak": URL}))


# --- RouteTable: copy-on-write -----------------------------------------------------------------


def test_iterator_taken_before_a_change_sees_the_old_routes() -> None:
    table = RouteTable({"/a": URL, "/b": URL})
    iterator = iter(table)

    table.set("/c", URL)
    table.remove("/a")

    assert [route.prefix for route in iterator] == ["/a", "/b"]


def test_table_can_change_while_being_iterated() -> None:
    table = RouteTable({"/a": URL, "/b": URL})

    for route in table:
        table.remove(route.prefix)

    assert len(table) == 0


def test_matched_route_is_unaffected_by_a_later_change() -> None:
    table = RouteTable({"/a": URL})
    held = table.match("/a/x")

    table.set("/a", OTHER_URL, read_timeout=1)
    table.remove("/a")

    assert held == Route("/a", URL)
    assert held is not None and held.upstream.origin == URL
    assert table.match("/a/x") is None


def test_replace_does_not_change_a_held_route() -> None:
    table = RouteTable({"/a": URL})
    held = table.match("/a")

    table.replace({"/a": OTHER_URL})

    assert held == Route("/a", URL)
    assert table.match("/a") == Route("/a", OTHER_URL)


def test_a_huge_integer_timeout_means_never_like_inf() -> None:
    """A config may say 10**400: it is no number of seconds a float can hold, so it is inf (never)."""
    assert Route("/peak", URL, connect_timeout=10**400).connect_timeout == float("inf")


def test_writers_on_several_threads_lose_no_change() -> None:
    """Copy-on-write needs its writers serialised: a platform may change routes from worker threads."""
    table = RouteTable({f"/seed{i}": URL for i in range(200)})
    batches = [[Route(f"/t{t}-{i}", URL) for i in range(2000)] for t in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to widen any race
    try:

        def add_all(batch: list[Route]) -> None:
            for route in batch:
                table.add(route)

        threads = [threading.Thread(target=add_all, args=(batch,)) for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(table) == 200 + 4 * 2000
