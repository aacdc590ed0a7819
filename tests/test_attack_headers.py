"""Hostile request heads: oversized and malformed header fields, aliases of the proxy's own headers,
``Connection`` and ``Upgrade`` tricks, request trailers, and methods that must not be forwarded."""

import contextlib
import socket
import time

import pytest

from mint_proxy import Route, verify_internal_token

from .attack_rig import (
    FORWARDED,
    PROXY,
    SERVER,
    Rig,
    StartSite,
    assert_refused,
    by_parser,
    first_response,
    request_once,
)
from .backends import header_values
from .utils import (
    SECRET,
    RawBackend,
    assert_proxy_error,
    assert_server_refused,
    exchange,
    make_request,
    one_response,
    parse_responses,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(["X-Big: " + "a" * 70_000], id="one-70KB-header"),
        pytest.param([f"X-H{i}: " + "a" * 1024 for i in range(100)], id="100-headers-of-1KB"),
    ],
)
def test_oversized_headers_are_answered_431_by_the_proxy(rig: Rig, headers: list[str]) -> None:
    """The proxy answers 431 itself, whatever the server let through; zero bytes upstream.

    Regression test: neither server refuses a head that arrives in one read, and the proxy had no
    limit (HeadersTooLarge was defined but never raised); both headers reached the plugin.
    """
    raw, _ = exchange(rig.port, make_request("/peak/x", *headers, "Connection: close"))
    assert_proxy_error(one_response(raw), 431, "request_header_fields_too_large")
    rig.untouched()


# What becomes of a request under each parser (FORWARDED: it reached the plugin), where they differ.
GROWING_HEAD = {"h11": SERVER, "httptools": FORWARDED}
OBS_FOLD = {"h11": FORWARDED, "httptools": SERVER}
PIPELINED_AFTER_H2C = {"h11": ["/peak/x", "/peak/y"], "httptools": ["/peak/x"]}
TRAILERS_BECOME_HEADERS = {"h11": False, "httptools": True}
HOST_TRAILER = {"h11": FORWARDED, "httptools": PROXY}


def test_header_block_growing_slowly_is_bounded_only_under_h11(rig: Rig) -> None:
    """h11 refuses a head still incomplete past ``h11_max_incomplete_event_size`` (16 KiB by
    default); httptools has no limit and forwards it. (A head that arrives in one read passes both:
    the proxy's 431 above.)"""
    with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as sock:
        sock.sendall(b"GET /peak/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        with contextlib.suppress(OSError):  # h11 refuses and closes before the last piece
            for i in range(6):  # 24 KiB of headers, 4 KiB at a time, each read separately
                sock.sendall(b"X-Slow-%d: " % i + b"a" * 4096 + b"\r\n")
                time.sleep(0.02)
            sock.sendall(b"\r\n")
        raw = b""
        with contextlib.suppress(OSError):
            sock.settimeout(3)
            while chunk := sock.recv(65536):
                raw += chunk
    response = one_response(raw)
    if GROWING_HEAD[rig.http] == SERVER:
        assert_server_refused(response)
        rig.untouched()
    else:
        assert response.status == 200 and response.header(b"x-request-id") is not None
        assert [r["raw_path"] for r in rig.peak.seen] == ["/peak/x"]


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\x00b"], ids=["CR", "LF", "NUL"])
def test_cr_lf_nul_in_a_header_value_never_reach_the_plugin(rig: Rig, value: bytes) -> None:
    """Both servers refuse these before the app; the proxy's own check (headers.inspect_request)
    covers servers that do not (tests/test_headers.py)."""
    raw, _ = exchange(rig.port, make_request("/peak/x", b"X-A: " + value, "Connection: close"))
    assert_server_refused(one_response(raw))
    rig.untouched()


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x1bb", b"a\x7fb"], ids=["SOH", "ESC", "DEL"])
def test_control_characters_in_a_header_value_are_refused_before_the_plugin(rig: Rig, value: bytes) -> None:
    """RFC 9110 §5.5: control characters are invalid in a field value. httptools refuses them;
    h11 accepts them. Regression test: the proxy used to forward them, and the plugin's own server
    answered 400 to the proxy."""
    raw, _ = exchange(rig.port, make_request("/peak/x", b"X-A: " + value, "Connection: close"))
    assert_refused(one_response(raw), by_parser(rig.http, PROXY, SERVER))
    rig.untouched()


@pytest.mark.parametrize("fold", [b"\r\n ", b"\r\n\t"], ids=["SP", "HTAB"])
def test_obs_fold_never_reaches_the_plugin_as_a_fold(rig: Rig, fold: bytes) -> None:
    """Obs-fold: httptools refuses it; h11 replaces it with one space before the app sees the header
    (RFC 9112 §5.2 allows either), so the proxy cannot tell, and the folded text stays inside one
    value: it never becomes a header line of its own upstream."""
    data = make_request("/peak/x", b"X-A: a" + fold + b"Transfer-Encoding: chunked", "Connection: close")
    raw, _ = exchange(rig.port, data)
    response = one_response(raw)
    if OBS_FOLD[rig.http] == SERVER:
        assert_server_refused(response)
        rig.untouched()
    else:
        assert response.status == 200
        (seen,) = rig.peak.seen
        assert header_values(seen, "x-a") == ["a Transfer-Encoding: chunked"]
        assert header_values(seen, "transfer-encoding") == []


def test_aliases_of_the_internal_token_and_request_id_never_reach_the_plugin(rig: Rig) -> None:
    """Names that CGI/WSGI-style servers fold together (``_``, ``.``, any case) are dropped."""
    data = make_request(
        "/peak/x",
        "X_Mint_Internal_Token: forged",
        "x.mint.internal.token: forged",
        "X-MINT-INTERNAL-TOKEN: forged",
        "x_Mint.Internal-TOKEN: forged",
        "X-Request-ID: client-id",
        "x.request.id: forged",
        "X_Request_Id: forged",
        "x_request.ID: forged",
        "Connection: close",
    )
    raw, _ = exchange(rig.port, data)
    response = one_response(raw)
    assert response.status == 200 and response.values(b"x-request-id") == [b"client-id"]
    (seen,) = rig.peak.seen
    folded = [n.replace("_", "-").replace(".", "-") for n, _ in seen["headers"]]
    assert folded.count("x-mint-internal-token") == 1 and folded.count("x-request-id") == 1
    assert header_values(seen, "x-request-id") == ["client-id"]
    (token,) = header_values(seen, "x-mint-internal-token")
    assert verify_internal_token(token, SECRET, plugin="peak").plugin == "peak"


def test_connection_cannot_remove_what_the_proxy_sets(rig: Rig) -> None:
    """``Connection`` naming Host or the proxy's forwarding headers removes only the client's copies."""
    data = make_request(
        "/peak/x",
        "Connection: close, host, x-forwarded-for, x-forwarded-proto, x-forwarded-host, forwarded, x-real-ip, "
        "via, x-request-id, x-mint-internal-token",
        "X-Forwarded-For: 6.6.6.6",
        "X-Real-IP: 6.6.6.6",
    )
    raw, _ = exchange(rig.port, data)
    assert one_response(raw).status == 200
    (seen,) = rig.peak.seen
    assert header_values(seen, "host") == ["x"]
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["x"]
    assert header_values(seen, "x-real-ip") == [] and header_values(seen, "connection") == []
    for name in ("via", "x-request-id", "x-mint-internal-token"):
        assert len(header_values(seen, name)) == 1


def test_h2c_upgrade_is_not_forwarded(rig: Rig) -> None:
    """``Upgrade: h2c`` on plain HTTP: no 101, and the plugin sees no Upgrade, no ``Connection``
    and no HTTP2-Settings. What follows on the connection differs: h11 reads the next
    request as HTTP/1.1; uvicorn's httptools protocol treats the connection as upgraded and ignores
    every later byte, so a pipelined request there gets no answer (and reaches nobody)."""
    first = make_request(
        "/peak/x", "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
    )
    raw, _ = exchange(rig.port, first + make_request("/peak/y", "Connection: close"), timeout=1.0)
    responses = parse_responses(raw)
    assert responses[0].status == 200 and responses[0].header(b"upgrade") is None
    expected = PIPELINED_AFTER_H2C[rig.http]
    assert [r.status for r in responses] == [200] * len(expected)
    assert [r["raw_path"] for r in rig.peak.seen] == expected
    for seen in rig.peak.seen:
        names = {n for n, _ in seen["headers"]}
        assert not names & {"upgrade", "http2-settings", "connection"}


def test_request_trailers_never_become_framing_or_proxy_headers(rig: Rig) -> None:
    """h11 drops the trailer fields of a chunked request; uvicorn's httptools protocol
    appends them to the request's headers when they arrive with the head, so they meet the proxy's
    header rules like any header: the token and X-Forwarded-For are still the proxy's own, and the
    framing upstream is still one ``Transfer-Encoding: chunked``."""
    trailers = b"X-Mint-Internal-Token: forged\r\nX-Forwarded-For: 6.6.6.6\r\nX-Request-Id: trailer-id\r\n"
    body = b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n"
    data = make_request("/peak/upload", "Transfer-Encoding: chunked", "Connection: close", method="POST")
    raw, _ = exchange(rig.port, data[:-2] + b"\r\n" + body)
    assert one_response(raw).status == 200
    (seen,) = rig.peak.seen
    assert header_values(seen, "transfer-encoding") == ["chunked"] and header_values(seen, "content-length") == []
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    (token,) = header_values(seen, "x-mint-internal-token")
    assert verify_internal_token(token, SECRET, plugin="peak").plugin == "peak"
    (request_id,) = header_values(seen, "x-request-id")
    assert (request_id == "trailer-id") == TRAILERS_BECOME_HEADERS[rig.http]


def test_host_in_a_trailer_is_a_second_host(rig: Rig) -> None:
    """A ``Host`` trailer never replaces the request's Host: h11 drops it, and under httptools it
    arrives as a second Host header, which the proxy refuses."""
    data = make_request("/peak/upload", "Transfer-Encoding: chunked", "Connection: close", method="POST")
    raw, _ = exchange(rig.port, data + b"3\r\nabc\r\n0\r\nHost: evil\r\n\r\n")
    response = one_response(raw)
    if HOST_TRAILER[rig.http] == FORWARDED:
        assert response.status == 200 and header_values(rig.peak.seen[0], "host") == ["x"]
    else:
        assert_proxy_error(response, 400, "bad_request")
        rig.untouched()


# (method, who refuses it under h11, under httptools): llhttp refuses TRACK and PRI itself.
REFUSED_METHODS = [("TRACE", PROXY, PROXY), ("CONNECT", PROXY, PROXY), ("TRACK", PROXY, SERVER), ("PRI", PROXY, SERVER)]


@pytest.mark.parametrize("method, h11, httptools", [pytest.param(*m, id=m[0]) for m in REFUSED_METHODS])
def test_trace_and_connect_on_a_route_are_a_405_and_never_reach_the_plugin(
    start_site: StartSite, ok_backend: RawBackend, http: str, method: str, h11: str, httptools: str
) -> None:
    """Regression test: TRACE reached the plugin with the internal token (a plugin echoing it as
    RFC 9110 §9.3.8 says showed the client the token), and CONNECT put h11 in front of the plugin
    into a tunnel, the client getting a 200 head without its body."""
    site = start_site([Route("/peak", ok_backend.url)])
    response = request_once(site, "/peak/x", "X-Request-Id: probe-1", method=method)
    assert ok_backend.connections == 0
    if by_parser(http, h11, httptools) == SERVER:
        assert_server_refused(response)
    else:
        assert_proxy_error(response, 405, "method_not_allowed", request_id="probe-1")
        assert response.header(b"allow") == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        assert response.header(b"connection") == b"close"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_methods_other_than_the_refused_ones_reach_the_plugin(
    start_site: StartSite, ok_backend: RawBackend, method: str
) -> None:
    """Any other method, including one the proxy does not know, is forwarded as it came."""
    site = start_site([Route("/peak", ok_backend.url)])
    assert first_response(site.port, make_request(site.base + "/peak/x", method=method), method=method).status == 200
    assert ok_backend.requests[0].startswith(method.encode() + b" ")


def test_trace_outside_the_routes_is_not_the_proxys_to_refuse(start_site: StartSite, ok_backend: RawBackend) -> None:
    """Unrouted requests are the platform's (its 405 or 404); alone, the proxy's 404."""
    site = start_site([Route("/peak", ok_backend.url)])
    response = request_once(site, "/experiments", method="TRACE")
    if site.base:
        assert response.status == 405 and response.json() == {"detail": "Method Not Allowed"}  # FastAPI's
    else:
        assert_proxy_error(response, 404, "not_found")
    assert ok_backend.connections == 0
