"""Request and response header rules (tier 1: pure functions over raw ASGI header lists)."""

import re
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from mint_proxy import headers
from mint_proxy.errors import BadRequest, HeadersTooLarge, LoopDetected
from mint_proxy.headers import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    RequestInfo,
    _filter_response_fully,
    _inspect_fully,
    _valid_hosts,
    client_request_id,
    filter_response,
    forwarded_fields,
    inspect_request,
    new_request_id,
    rewrite_location,
    via_value,
)
from mint_proxy.routing import Route

Headers = list[tuple[bytes, bytes]]

MARKER = b"mint-proxy-test"
HOST = (b"host", b"proxy.example")
KEPT = (b"x-kept", b"1")
NEW_ID = re.compile(rb"[0-9a-f]{32}")

ROUTE = Route("/peak-picking", "http://127.0.0.1:8005")
OUR_ID = b"our-request-id"


def inspect(raw: Headers, *, http_version: str = "1.1") -> RequestInfo:
    return inspect_request(raw, http_version=http_version, via_marker=MARKER)


def filter_(raw: Headers, *, route: Route = ROUTE, client_prefix: str = "") -> Headers:
    return filter_response(raw, request_id=OUR_ID, route=route, client_prefix=client_prefix)


# --- inspect_request: what is forwarded --------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        # RFC 9110 §7.6.1
        pytest.param((b"connection", b"keep-alive"), id="connection"),
        pytest.param((b"keep-alive", b"timeout=5"), id="keep-alive"),
        pytest.param((b"proxy-connection", b"keep-alive"), id="proxy-connection"),
        pytest.param((b"te", b"trailers"), id="te"),
        pytest.param((b"trailer", b"x-checksum"), id="trailer"),
        pytest.param((b"transfer-encoding", b"chunked"), id="transfer-encoding"),
        pytest.param((b"upgrade", b"websocket"), id="upgrade"),
        pytest.param((b"proxy-authorization", b"Basic dXNlcjpwdw=="), id="proxy-authorization"),
        # the client's framing: the upstream request is framed anew
        pytest.param((b"content-length", b"0"), id="content-length"),
        # the ASGI server answers 100-continue itself
        pytest.param((b"expect", b"100-continue"), id="expect"),
    ],
)
def test_hop_by_hop_request_header_is_not_forwarded(header: tuple[bytes, bytes]) -> None:
    assert inspect([HOST, header, KEPT]).headers == [HOST, KEPT]


@pytest.mark.parametrize(
    "connection",
    [b"x-foo, x-bar", b"X-Foo,X-Bar", b" x-foo ,, x-bar ", b"close, x-foo, x-bar"],
    ids=["list", "any-case-no-spaces", "spaces-and-empty-token", "with-close"],
)
def test_header_named_by_connection_is_not_forwarded(connection: bytes) -> None:
    raw = [HOST, (b"x-foo", b"1"), (b"connection", connection), (b"x-bar", b"2"), KEPT]

    assert inspect(raw).headers == [HOST, KEPT]


@pytest.mark.parametrize("connection", [b"keep-alive", b"close", b"Keep-Alive, Close"])
def test_connection_without_field_names_removes_nothing_else(connection: bytes) -> None:
    raw = [HOST, (b"connection", connection), (b"close", b"x"), KEPT]

    assert inspect(raw).headers == [HOST, (b"close", b"x"), KEPT]


@pytest.mark.parametrize("connection", [b"host", b"Host, x-foo"], ids=["host", "host-and-other"])
def test_connection_naming_host_never_removes_host(connection: bytes) -> None:
    info = inspect([(b"connection", connection), HOST])

    assert info.headers == [HOST]
    assert info.host == HOST[1]


@pytest.mark.parametrize(
    "name",
    [
        # headers the proxy sets itself
        pytest.param(b"forwarded", id="forwarded"),
        pytest.param(b"x-forwarded-for", id="x-forwarded-for"),
        pytest.param(b"x-forwarded-proto", id="x-forwarded-proto"),
        pytest.param(b"x-forwarded-host", id="x-forwarded-host"),
        pytest.param(b"x-forwarded-prefix", id="x-forwarded-prefix"),
        pytest.param(b"x-forwarded-anything", id="x-forwarded-any-suffix"),
        pytest.param(b"x-real-ip", id="x-real-ip"),
        pytest.param(b"x-mint-internal-token", id="internal-token"),
        pytest.param(b"x-request-id", id="request-id"),
        # aliases that CGI/WSGI gateways fold onto the same name
        pytest.param(b"x_mint_internal_token", id="internal-token-underscores"),
        pytest.param(b"x.mint.internal.token", id="internal-token-dots"),
        pytest.param(b"X-MINT-INTERNAL-TOKEN", id="internal-token-uppercase"),
        pytest.param(b"X_Mint.Internal-Token", id="internal-token-mixed"),
        pytest.param(b"X_Forwarded_For", id="x-forwarded-for-underscores"),
        pytest.param(b"x.forwarded.host", id="x-forwarded-host-dots"),
        pytest.param(b"X-Real-IP", id="x-real-ip-mixed-case"),
        pytest.param(b"FORWARDED", id="forwarded-uppercase"),
        pytest.param(b"x_request_id", id="request-id-underscores"),
        # aliases of hop-by-hop headers
        pytest.param(b"proxy_authorization", id="proxy-authorization-underscore"),
        pytest.param(b"Keep-Alive", id="keep-alive-mixed-case"),
    ],
)
def test_proxy_owned_request_header_is_not_forwarded(name: bytes) -> None:
    assert inspect([HOST, (name, b"spoofed"), KEPT]).headers == [HOST, KEPT]


@pytest.mark.parametrize(
    "name",
    [
        b"x_custom",
        b"x.custom",
        b"X-Custom",
        b"x-forwarded",
        b"x-request-ids",
        b"x_mint_internal",
        b"my-x-forwarded-for",
    ],
    ids=[
        "underscore",
        "dot",
        "mixed-case",
        "x-forwarded-without-suffix",
        "request-id-lookalike",
        "token-prefix",
        "x-forwarded-inside-the-name",
    ],
)
def test_header_that_only_looks_like_an_alias_is_kept(name: bytes) -> None:
    assert inspect([HOST, (name, b"v")]).headers == [HOST, (name, b"v")]


def test_end_to_end_headers_are_kept_in_order_with_repeats() -> None:
    raw = [
        (b"x-custom", b"1"),
        HOST,
        (b"authorization", b"Bearer abc"),
        (b"cookie", b"a=1"),
        (b"accept", b"*/*"),
        (b"x-custom", b"2"),
        (b"cookie", b"b=2"),
        (b"via", b"1.1 other-proxy"),
    ]

    assert inspect(raw).headers == raw


def _headers_of_total_size(count: int, total: int) -> Headers:
    """``count`` headers, Host first, whose names and values add up to ``total`` bytes."""
    raw = [HOST] + [(b"x-h%d" % i, b"") for i in range(1, count)]
    used = sum(len(name) + len(value) for name, value in raw)
    return [*raw[:-1], (raw[-1][0], raw[-1][1] + b"v" * (total - used))]


@pytest.mark.parametrize("count", [1, 2, 9, MAX_HEADERS])
def test_headers_up_to_the_size_limit_are_accepted(count: int) -> None:
    raw = _headers_of_total_size(count, MAX_HEADER_BYTES)

    assert inspect(raw).headers == raw


@pytest.mark.parametrize("count", [1, 2, 9, MAX_HEADERS])
def test_headers_over_the_size_limit_are_too_large(count: int) -> None:
    with pytest.raises(HeadersTooLarge, match="larger than"):
        inspect(_headers_of_total_size(count, MAX_HEADER_BYTES + 1))


def test_more_than_the_maximum_number_of_headers_is_too_large() -> None:
    with pytest.raises(HeadersTooLarge, match="more than"):
        inspect([HOST] + [KEPT] * MAX_HEADERS)


# --- inspect_request: request id ---------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param(b"a", id="one-char"),
        pytest.param(b"0f3c-77aa", id="hex-and-dash"),
        pytest.param(b"A.b_c:d-e", id="every-punctuation"),
        pytest.param(b"r" * 128, id="128-chars"),
    ],
)
def test_valid_client_request_id_is_kept(request_id: bytes) -> None:
    info = inspect([HOST, (b"x-request-id", request_id)])

    assert info.request_id == request_id
    assert info.headers == [HOST]  # the proxy appends its own copy later


@pytest.mark.parametrize(
    "raw",
    [
        # not 1-128 characters of [A-Za-z0-9._:-]
        pytest.param([(b"x-request-id", b"r" * 129)], id="129-chars"),
        pytest.param([(b"x-request-id", b"")], id="empty"),
        pytest.param([(b"x-request-id", b"a b")], id="space"),
        pytest.param([(b"x-request-id", b"a/b")], id="slash"),
        pytest.param([(b"x-request-id", "caf\u00e9".encode())], id="utf8"),
        pytest.param([(b"x-request-id", b"caf\xe9")], id="latin-1"),
        # ambiguous
        pytest.param([(b"x-request-id", b"a"), (b"x-request-id", b"b")], id="two-values"),
        pytest.param([(b"x-request-id", b"a"), (b"x-request-id", b"a")], id="two-equal-values"),
        # absent
        pytest.param([], id="missing"),
    ],
)
def test_invalid_or_missing_client_request_id_is_replaced(raw: Headers) -> None:
    info = inspect([HOST, *raw])

    assert NEW_ID.fullmatch(info.request_id)
    assert info.headers == [HOST]


def test_new_request_ids_differ() -> None:
    ids = {new_request_id() for _ in range(100)}

    assert len(ids) == 100
    assert all(NEW_ID.fullmatch(request_id) for request_id in ids)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param([(b"x-request-id", b"abc-123")], b"abc-123", id="valid"),
        pytest.param([(b"x-request-id", b"r" * 129)], None, id="too-long"),
        pytest.param([(b"x-request-id", b"a b")], None, id="space"),
        pytest.param([(b"x-request-id", b"a"), (b"x-request-id", b"b")], None, id="two-values"),
        pytest.param([(b"x_request_id", b"abc")], None, id="alias"),
        pytest.param([], None, id="missing"),
    ],
)
def test_client_request_id_follows_the_same_rules_on_the_error_path(raw: Headers, expected: bytes | None) -> None:
    assert client_request_id([HOST, *raw]) == expected


def test_request_id_alias_is_not_taken_as_the_request_id() -> None:
    info = inspect([HOST, (b"x_request_id", b"spoofed")])

    assert info.request_id != b"spoofed"


# --- inspect_request: framing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "http_version"),
    [
        # both Content-Length and Transfer-Encoding (RFC 9112 §6.3 item 3)
        pytest.param([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], "1.1", id="cl-and-te"),
        pytest.param([(b"transfer-encoding", b"chunked"), (b"content-length", b"0")], "1.1", id="te-and-cl-0"),
        # Transfer-Encoding other than exactly one 'chunked'
        pytest.param([(b"transfer-encoding", b"gzip, chunked")], "1.1", id="te-gzip-chunked"),
        pytest.param([(b"transfer-encoding", b"chunked, chunked")], "1.1", id="te-chunked-twice"),
        pytest.param([(b"transfer-encoding", b"chunked")] * 2, "1.1", id="te-two-headers"),
        pytest.param([(b"transfer-encoding", b"identity")], "1.1", id="te-identity"),
        pytest.param([(b"transfer-encoding", b"gzip")], "1.1", id="te-gzip"),
        pytest.param([(b"transfer-encoding", b"")], "1.1", id="te-empty"),
        pytest.param([(b"transfer-encoding", b"chunked;x=1")], "1.1", id="te-with-parameter"),
        # Transfer-Encoding on HTTP/1.0 (RFC 9112 §6.1)
        pytest.param([(b"transfer-encoding", b"chunked")], "1.0", id="te-on-http-1.0"),
        # Content-Length that is not one plain decimal number
        pytest.param([(b"content-length", b"+3")], "1.1", id="cl-plus-sign"),
        pytest.param([(b"content-length", b"0x3")], "1.1", id="cl-hex"),
        pytest.param([(b"content-length", b"-1")], "1.1", id="cl-negative"),
        pytest.param([(b"content-length", b"")], "1.1", id="cl-empty"),
        pytest.param([(b"content-length", b" ")], "1.1", id="cl-space"),
        pytest.param([(b"content-length", b"3 3")], "1.1", id="cl-space-separated"),
        pytest.param([(b"content-length", b"3,4")], "1.1", id="cl-list-different"),
        pytest.param([(b"content-length", b"3,")], "1.1", id="cl-list-trailing-comma"),
        pytest.param([(b"content-length", b"3.0")], "1.1", id="cl-decimal-point"),
        pytest.param([(b"content-length", b"1" * 19)], "1.1", id="cl-19-digits"),
        pytest.param([(b"content-length", "\u0663".encode())], "1.1", id="cl-non-ascii-digit"),
        pytest.param([(b"content-length", b"3"), (b"content-length", b"4")], "1.1", id="cl-two-headers-different"),
    ],
)
def test_ambiguous_request_framing_is_a_bad_request(raw: Headers, http_version: str) -> None:
    with pytest.raises(BadRequest):
        inspect([HOST, *raw], http_version=http_version)


@pytest.mark.parametrize(
    ("raw", "content_length", "chunked"),
    [
        # no body framing at all
        pytest.param([], None, False, id="none"),
        # one Content-Length, possibly repeated with the same value
        pytest.param([(b"content-length", b"0")], 0, False, id="cl-0"),
        pytest.param([(b"content-length", b"3")], 3, False, id="cl-3"),
        pytest.param([(b"content-length", b"007")], 7, False, id="cl-leading-zeros"),
        pytest.param([(b"content-length", b"1" * 18)], int("1" * 18), False, id="cl-18-digits"),
        # exactly one 'chunked', any case
        pytest.param([(b"transfer-encoding", b"chunked")], None, True, id="te-chunked"),
        pytest.param([(b"transfer-encoding", b"Chunked")], None, True, id="te-capitalised"),
        pytest.param([(b"transfer-encoding", b" CHUNKED ")], None, True, id="te-uppercase-padded"),
    ],
)
def test_request_framing_is_read_and_not_forwarded(raw: Headers, content_length: int | None, chunked: bool) -> None:
    info = inspect([HOST, *raw])

    assert (info.content_length, info.chunked) == (content_length, chunked)
    assert info.headers == [HOST]


def test_content_length_on_http_1_0_is_accepted() -> None:
    assert inspect([(b"content-length", b"3")], http_version="1.0").content_length == 3


@pytest.mark.parametrize(
    "header",
    [
        # in a header that is forwarded
        pytest.param((b"x-kept", b"a\rb"), id="cr"),
        pytest.param((b"x-kept", b"a\nb"), id="lf"),
        pytest.param((b"x-kept", b"a\x00b"), id="nul"),
        pytest.param((b"x-kept", b"a\r\nx-injected: 1"), id="crlf-injection"),
        # in a header that is dropped anyway
        pytest.param((b"x-forwarded-for", b"1.2.3.4\n"), id="lf-in-dropped-header"),
        pytest.param((b"content-length", b"3\r"), id="cr-in-content-length"),
    ],
)
def test_control_character_in_a_header_value_is_a_bad_request(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(BadRequest, match="control character"):
        inspect([HOST, header])


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"content-length", b"3")] * 2, id="cl-two-identical-headers"),
        pytest.param([(b"content-length", b"3, 3")], id="cl-identical-list"),
    ],
)
def test_content_length_repeated_even_with_equal_values_is_a_bad_request(headers: list[tuple[bytes, bytes]]) -> None:
    """Like nginx; the desync corpus classes ``Content-Length: 1000,1000`` as severe."""
    with pytest.raises(BadRequest, match="Content-Length"):
        inspect([HOST, *headers])


@pytest.mark.parametrize("value", [b"\x01", b"a\x1fb", b"\x7f"], ids=["soh", "us", "del"])
def test_other_control_characters_in_a_value_are_a_bad_request(value: bytes) -> None:
    with pytest.raises(BadRequest, match="control character"):
        inspect([HOST, (b"x-custom", value)])


@pytest.mark.parametrize("value", [b"a b", b"x/y", b"u@x", b"x?y", b"x#y", b"h:8:9"])
def test_host_that_is_not_host_port_is_a_bad_request(value: bytes) -> None:
    with pytest.raises(BadRequest, match="Host"):
        inspect([(b"host", value)])


@pytest.mark.parametrize("value", [b"example.com", b"example.com:8001", b"127.0.0.1:80", b"[::1]:8000", b"plugin_host"])
def test_host_of_host_and_port_is_kept(value: bytes) -> None:
    assert inspect([(b"host", value)]).host == value


# --- inspect_request: Host and Via -------------------------------------------------------------


def test_host_is_reported_and_forwarded() -> None:
    info = inspect([HOST, KEPT])

    assert info.host == b"proxy.example"
    assert info.headers == [HOST, KEPT]


@pytest.mark.parametrize("http_version", ["1.0", "1.1"])
def test_more_than_one_host_is_a_bad_request(http_version: str) -> None:
    with pytest.raises(BadRequest, match="Host"):
        inspect([HOST, (b"host", b"other.example")], http_version=http_version)


def test_missing_host_on_http_1_1_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="Host"):
        inspect([KEPT], http_version="1.1")


def test_missing_host_on_http_1_0_is_accepted() -> None:
    info = inspect([KEPT], http_version="1.0")

    assert info.host is None
    assert info.headers == [KEPT]


@pytest.mark.parametrize(
    "via",
    [b"1.1 mint-proxy-test", b"1.0 other, 1.1 mint-proxy-test", b"1.1 mint-proxy-test (comment)"],
    ids=["only-us", "after-another-proxy", "with-comment"],
)
def test_via_with_our_marker_is_a_loop(via: bytes) -> None:
    with pytest.raises(LoopDetected):
        inspect([HOST, (b"via", via)])


def test_via_from_another_proxy_is_kept() -> None:
    raw = [HOST, (b"via", b"1.1 nginx, 1.0 squid")]

    assert inspect(raw).headers == raw


def test_a_host_accepted_before_does_not_let_an_invalid_one_through() -> None:
    inspect([(b"host", b"example.com")])

    with pytest.raises(BadRequest, match="Host"):
        inspect([(b"host", b"example.com/evil")])


def test_the_accepted_hosts_remembered_stay_few_whatever_clients_send() -> None:
    for n in range(2000):
        inspect([(b"host", b"h%d.example" % n)])

    assert 0 < len(_valid_hosts) <= 256


_REQUEST_NAMES = [
    b"host", b"Host", b"accept", b"x-a", b"cookie", b"via", b"content-length", b"transfer-encoding",
    b"connection", b"keep-alive", b"expect", b"te", b"x-request-id", b"x_request_id", b"traceparent",
    b"X-Mint-Internal-Token", b"x-forwarded-for", b"x.forwarded.host", b"forwarded", b"x-real-ip",
]  # fmt: skip
_REQUEST_VALUES = [
    b"proxy.example", b"[::1]:8000", b"bad/host", b"", b"5", b"5, 5", b"chunked", b"x-a, close", b"keep-alive",
    b"abc-123", b"1.1 mint-proxy-test", b"1.1 nginx", b"00-" + b"4" * 32 + b"-" + b"5" * 16 + b"-01",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    raw=st.lists(
        st.tuples(
            # the plain names and values of the common request, half of the time
            st.sampled_from([b"host", b"accept"]) | st.sampled_from(_REQUEST_NAMES),
            st.just(b"proxy.example") | st.sampled_from(_REQUEST_VALUES),
        ),
        max_size=6,
    ),
    http_version=st.sampled_from(["1.0", "1.1", "2"]),
)
def test_request_inspection_shortcut_agrees_with_the_full_rules(raw: Headers, http_version: str) -> None:
    """The common-request shortcut of ``inspect_request`` is an optimisation, never a different rule."""
    names = b"\n".join(name for name, _ in raw)

    def outcome(run: Any) -> object:
        try:
            with mock.patch.object(headers, "new_request_id", return_value=b"new"):
                return run()
        except (BadRequest, LoopDetected) as exc:
            return (type(exc), exc.detail)

    shortcut = outcome(lambda: inspect(raw, http_version=http_version))
    full = outcome(
        lambda: _inspect_fully(raw, names, True, http_version=http_version, via_marker=MARKER)  # every name looked at
    )

    assert shortcut == full


# --- forwarded_fields and via_value -----------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "scheme", "host", "prefix", "expected"),
    [
        # the client address, when the server knows it
        pytest.param(
            ("10.0.0.7", 51234),
            "http",
            b"proxy.example",
            "",
            [
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"x-forwarded-proto", b"http"),
                (b"x-forwarded-host", b"proxy.example"),
            ],
            id="client-http",
        ),
        pytest.param(
            None,
            "https",
            b"proxy.example",
            "",
            [(b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"proxy.example")],
            id="no-client",
        ),
        # WebSocket schemes map to their HTTP counterparts
        pytest.param(None, "ws", None, "", [(b"x-forwarded-proto", b"http")], id="ws-is-http"),
        pytest.param(None, "wss", None, "", [(b"x-forwarded-proto", b"https")], id="wss-is-https"),
        # the stripped prefix, when the route strips one
        pytest.param(
            ("::1", 1),
            "https",
            b"proxy.example:8443",
            "/api/peak",
            [
                (b"x-forwarded-for", b"::1"),
                (b"x-forwarded-proto", b"https"),
                (b"x-forwarded-host", b"proxy.example:8443"),
                (b"x-forwarded-prefix", b"/api/peak"),
            ],
            id="prefix",
        ),
    ],
)
def test_forwarded_headers_come_from_the_scope(
    client: tuple[str, int] | None, scheme: str, host: bytes | None, prefix: str, expected: Headers
) -> None:
    info = RequestInfo(headers=[], request_id=b"r", host=host, content_length=None, chunked=False)

    fields = forwarded_fields(info, client=client, scheme=scheme, forwarded_prefix=prefix)

    assert fields == expected


def test_forwarded_headers_ignore_the_clients_own_copies() -> None:
    info = inspect([HOST, (b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-proto", b"https")])

    headers = forwarded_fields(info, client=("10.0.0.7", 1), scheme="http", forwarded_prefix="")

    assert (b"x-forwarded-for", b"10.0.0.7") in headers
    assert (b"x-forwarded-proto", b"http") in headers
    assert b"6.6.6.6" not in [value for _, value in headers]


@pytest.mark.parametrize(
    ("http_version", "expected"), [("1.1", b"1.1 mint-proxy-test"), ("1.0", b"1.0 mint-proxy-test")]
)
def test_via_value_is_protocol_version_and_pseudonym(http_version: str, expected: bytes) -> None:
    assert via_value(http_version, MARKER) == expected


def test_our_via_value_is_detected_as_a_loop() -> None:
    with pytest.raises(LoopDetected):
        inspect([HOST, (b"via", via_value("1.1", MARKER))])


# --- filter_response ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        # hop-by-hop (RFC 9110 §7.6.1)
        pytest.param((b"connection", b"keep-alive"), id="connection"),
        pytest.param((b"keep-alive", b"timeout=5"), id="keep-alive"),
        pytest.param((b"proxy-connection", b"keep-alive"), id="proxy-connection"),
        pytest.param((b"te", b"trailers"), id="te"),
        pytest.param((b"trailer", b"x-checksum"), id="trailer"),
        pytest.param((b"transfer-encoding", b"chunked"), id="transfer-encoding"),
        pytest.param((b"upgrade", b"h2c"), id="upgrade"),
        pytest.param((b"proxy-authorization", b"Basic x"), id="proxy-authorization"),
        # set by the ASGI server in front of the proxy (uvicorn, hypercorn and granian all add Date and
        # Server, and frame the body themselves), so passing the plugin's copies would send two of each;
        # the proxy re-adds Content-Length itself when the length is known
        pytest.param((b"content-length", b"5"), id="content-length"),
        pytest.param((b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"), id="date"),
        pytest.param((b"server", b"uvicorn"), id="server"),
        # the internal token never leaves the proxy, whatever its spelling
        pytest.param((b"x-mint-internal-token", b"eyJ.x.y"), id="internal-token"),
        pytest.param((b"x_mint_internal_token", b"eyJ.x.y"), id="internal-token-underscores"),
        pytest.param((b"x.mint.internal.token", b"eyJ.x.y"), id="internal-token-dots"),
    ],
)
def test_response_header_is_removed(header: tuple[bytes, bytes]) -> None:
    assert filter_([KEPT, header]) == [KEPT, (b"x-request-id", OUR_ID)]


@pytest.mark.parametrize(
    "connection",
    [b"x-foo, x-bar", b"X-Foo, X-BAR", b"close,x-foo,x-bar"],
    ids=["list", "any-case", "with-close"],
)
def test_response_header_named_by_connection_is_removed(connection: bytes) -> None:
    raw = [(b"x-foo", b"1"), KEPT, (b"connection", connection), (b"x-bar", b"2")]

    assert filter_(raw) == [KEPT, (b"x-request-id", OUR_ID)]


@pytest.mark.parametrize(
    "upstream_ids",
    [
        pytest.param([], id="none"),
        pytest.param([(b"x-request-id", b"plugin-id")], id="one"),
        pytest.param([(b"x-request-id", b"a"), (b"x-request-id", b"b")], id="two"),
        pytest.param([(b"x_request_id", b"a"), (b"x.request.id", b"b")], id="aliases"),
    ],
)
def test_upstream_request_id_is_replaced_by_ours(upstream_ids: Headers) -> None:
    headers = filter_([*upstream_ids, KEPT])

    assert [value for name, value in headers if name == b"x-request-id"] == [OUR_ID]
    assert headers == [KEPT, (b"x-request-id", OUR_ID)]


def test_end_to_end_response_headers_are_kept_in_order_with_repeats() -> None:
    raw = [
        (b"set-cookie", b"a=1; Path=/"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"b=2; HttpOnly"),
        (b"cache-control", b"no-store"),
        (b"set-cookie", b"c=3"),
        (b"x_custom", b"not-an-alias-of-ours"),
    ]

    assert filter_(raw) == [*raw, (b"x-request-id", OUR_ID)]


def test_response_location_is_rewritten() -> None:
    route = Route("/api/peak", "http://127.0.0.1:8005", strip_prefix=True)

    headers = filter_([(b"location", b"http://127.0.0.1:8005/done")], route=route, client_prefix="/api/peak")

    assert headers == [(b"location", b"/api/peak/done"), (b"x-request-id", OUR_ID)]


_RESPONSE_NAMES = [
    b"content-type", b"set-cookie", b"date", b"server", b"content-length", b"connection", b"keep-alive",
    b"location", b"x-request-id", b"x_request_id", b"x.mint.internal.token", b"x-foo", b"x_custom", b"etag",
]  # fmt: skip


_response_fields = st.lists(
    st.tuples(
        st.sampled_from(_RESPONSE_NAMES),
        st.sampled_from([b"1", b"x-foo", b"close, etag", b"/moved", b"http://127.0.0.1:8005/x"]),
    ),
    max_size=8,
)


@given(raw=_response_fields, earlier=st.lists(_response_fields, max_size=3))
def test_response_filter_one_pass_agrees_with_the_full_rules(raw: Headers, earlier: list[Headers]) -> None:
    """The single pass of ``filter_response``, and the names it remembers from earlier responses, are an
    optimisation, never a different rule."""
    options: dict[str, Any] = {"request_id": OUR_ID, "route": ROUTE, "client_prefix": ""}
    headers._plain_response_names.clear()
    for other in earlier:
        filter_response(other, **options)

    assert filter_response(raw, **options) == _filter_response_fully(raw, **options)


def test_remembered_response_names_stay_few() -> None:
    """A plugin sending ever new header names cannot grow the filter's memory of them without bound."""
    for number in range(3000):
        filter_([(b"x-a%d" % number, b"1")])

    assert 0 < len(headers._plain_response_names) <= 256


# --- rewrite_location --------------------------------------------------------------------------

STRIPPED = Route("/api/peak", "http://127.0.0.1:8005", strip_prefix=True)
BASED = Route("/api/peak", "http://127.0.0.1:8005/base", strip_prefix=True)
BASED_NOT_STRIPPED = Route("/peak", "http://127.0.0.1:8005/base")
PORT_80 = Route("/peak", "http://plugin.local")
PORT_80_EXPLICIT = Route("/peak", "http://plugin.local:80")
IPV6 = Route("/peak", "http://[::1]:8000")
UNIX = Route("/lcms", "unix:/run/mint/lcms.sock", strip_prefix=True)


@pytest.mark.parametrize(
    ("route", "client_prefix", "location", "expected"),
    [
        # an absolute URL on the upstream's own origin becomes a path
        pytest.param(ROUTE, "", b"http://127.0.0.1:8005/x", b"/x", id="own-origin"),
        pytest.param(ROUTE, "", b"http://127.0.0.1:8005/x?q=1", b"/x?q=1", id="own-origin-query-kept"),
        pytest.param(ROUTE, "", b"http://127.0.0.1:8005", b"/", id="own-origin-no-path"),
        pytest.param(ROUTE, "", b"HTTP://127.0.0.1:8005/x", b"/x", id="scheme-any-case"),
        pytest.param(PORT_80, "", b"http://plugin.local/x", b"/x", id="port-80-implied"),
        pytest.param(PORT_80_EXPLICIT, "", b"http://plugin.local/x", b"/x", id="port-80-configured"),
        pytest.param(PORT_80, "", b"http://PLUGIN.Local/x", b"/x", id="host-any-case"),
        pytest.param(IPV6, "", b"http://[::1]:8000/x", b"/x", id="ipv6"),
        # strip_prefix: the client-visible prefix goes in front
        pytest.param(STRIPPED, "/api/peak", b"http://127.0.0.1:8005/x", b"/api/peak/x", id="prefix-absolute"),
        pytest.param(STRIPPED, "/api/peak", b"/x", b"/api/peak/x", id="prefix-path"),
        pytest.param(STRIPPED, "/api/peak", b"/x?q=1", b"/api/peak/x?q=1", id="prefix-path-query"),
        pytest.param(STRIPPED, "/mnt/api/peak", b"/x", b"/mnt/api/peak/x", id="prefix-under-mount-path"),
        pytest.param(UNIX, "/lcms", b"/x", b"/lcms/x", id="unix-prefix-path"),
        # the upstream's base path is removed
        pytest.param(BASED, "/api/peak", b"http://127.0.0.1:8005/base/x", b"/api/peak/x", id="base-absolute"),
        pytest.param(BASED, "/api/peak", b"/base/x?q=1", b"/api/peak/x?q=1", id="base-path-query"),
        pytest.param(BASED, "/api/peak", b"/base", b"/api/peak/", id="base-itself"),
        pytest.param(BASED, "/api/peak", b"/base?q=1", b"/api/peak/?q=1", id="base-itself-query"),
        pytest.param(BASED_NOT_STRIPPED, "", b"/base/peak/x", b"/peak/x", id="base-without-strip"),
        # anything else is left alone
        pytest.param(ROUTE, "", b"http://127.0.0.1:8006/x", b"http://127.0.0.1:8006/x", id="other-port"),
        pytest.param(ROUTE, "", b"http://other.example/x", b"http://other.example/x", id="other-host"),
        pytest.param(ROUTE, "", b"https://127.0.0.1:8005/x", b"https://127.0.0.1:8005/x", id="other-scheme"),
        pytest.param(ROUTE, "", b"http://127.0.0.1:80050/x", b"http://127.0.0.1:80050/x", id="lookalike-port"),
        pytest.param(
            ROUTE, "", b"http://127.0.0.1:8005.evil.example/", b"http://127.0.0.1:8005.evil.example/", id="lookalike"
        ),
        pytest.param(STRIPPED, "/api/peak", b"//evil.example/x", b"//evil.example/x", id="scheme-relative"),
        pytest.param(STRIPPED, "/api/peak", b"x/y", b"x/y", id="relative-path"),
        pytest.param(STRIPPED, "/api/peak", b"?q=1", b"?q=1", id="relative-query"),
        pytest.param(ROUTE, "", b"/x", b"/x", id="path-without-prefix-or-base"),
        pytest.param(UNIX, "/lcms", b"http://localhost/x", b"http://localhost/x", id="unix-absolute"),
    ],
)
def test_rewrite_location_maps_only_the_upstreams_own_urls(
    route: Route, client_prefix: str, location: bytes, expected: bytes
) -> None:
    assert rewrite_location(location, route=route, client_prefix=client_prefix) == expected


@pytest.mark.parametrize("route", [PORT_80, PORT_80_EXPLICIT], ids=["port-80-implied", "port-80-configured"])
def test_rewrite_location_recognises_an_explicit_default_port(route: Route) -> None:
    assert rewrite_location(b"http://plugin.local:80/x", route=route, client_prefix="") == b"/x"


def test_rewrite_location_of_origin_with_query_and_no_path_points_at_the_root() -> None:
    assert rewrite_location(b"http://127.0.0.1:8005?q=1", route=ROUTE, client_prefix="") == b"/?q=1"


# A rewrite never changes the host: each of these would be read by a browser as another host (or
# needs a browser's clean-up first), so the plugin's own value stays.
LOCATION_HOST_ESCAPES = [
    b"//evil.example/x",
    b"/\\evil.example/x",
    b"/\t/evil.example",
    b"/\n/evil.example",
    b"/\r\n/evil.example",
    b"/ //evil.example",
    b"/\x00/evil.example",
    b"/\x7f/evil.example",
]
UNSTRIPPED = Route("/peak", "http://127.0.0.1:8005")


@pytest.mark.parametrize("path", LOCATION_HOST_ESCAPES, ids=repr)
def test_rewrite_of_an_absolute_location_never_points_at_another_host(path: bytes) -> None:
    """Regression test: ``http://<plugin origin>//evil.example/x`` became ``//evil.example/x``."""
    location = b"http://127.0.0.1:8005" + path
    assert rewrite_location(location, route=UNSTRIPPED, client_prefix="") == location


@pytest.mark.parametrize("path", LOCATION_HOST_ESCAPES, ids=repr)
def test_stripping_a_base_path_never_makes_a_location_point_at_another_host(path: bytes) -> None:
    """Removing the base path ``/base`` from ``/base//evil`` would leave ``//evil``."""
    for location in (b"/base" + path, b"http://127.0.0.1:8005/base" + path):
        assert rewrite_location(location, route=BASED_NOT_STRIPPED, client_prefix="") == location


def browser_host(location: bytes) -> str | None:
    """The host a browser on http://client.example/ goes to for ``location``, as the WHATWG URL
    parser reads it: leading and trailing C0 controls and spaces stripped, tab and newlines
    removed anywhere, '\\' read as '/' in http URLs; ``None`` for a scheme other than http(s)."""
    text = location.decode("latin-1").strip("".join(map(chr, range(0x21))))
    text = re.sub("[\t\n\r]", "", text).replace("\\", "/")
    if re.match(r"(?i)https?:", text):
        text = re.sub(r"(?i)^https?:/*", "//", text)
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", text):
        return None
    if text.startswith("//"):
        return re.split(r"[/?#]", text[2:], maxsplit=1)[0].rpartition("@")[2].lower()
    return "client.example"


LOCATION_PIECES = st.lists(
    st.sampled_from(
        [b"/", b"//", b"\\", b"\t", b"\n", b" ", b"\x00", b"evil.example", b"x", b".", b"base", b"?", b"@"]
    ),
    max_size=6,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    route=st.sampled_from([UNSTRIPPED, STRIPPED, BASED, BASED_NOT_STRIPPED, UNIX]),
    absolute=st.booleans(),
    rest=LOCATION_PIECES,
)
def test_a_rewritten_location_always_stays_on_the_clients_host(route: Route, absolute: bool, rest: bytes) -> None:
    """Property: whatever the plugin sends, a value the proxy changed names the client's own host."""
    location = (route.upstream.origin.encode() if absolute else b"") + rest
    prefix = "/api/peak" if route.strip_prefix else ""
    rewritten = rewrite_location(location, route=route, client_prefix=prefix)
    if rewritten != location:
        assert browser_host(rewritten) == "client.example", rewritten
