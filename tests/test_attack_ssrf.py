"""Requests that try to make the proxy connect elsewhere, and Location rewrites that would send the
client to another host."""

import pytest

from mint_proxy import Route

from .attack_rig import Rig, StartSite, request_once
from .backends import Plugin, header_values
from .utils import (
    assert_proxy_error,
    exchange,
    make_request,
    one_response,
    pending_connections,
    serve,
)

pytestmark = pytest.mark.anyio


SSRF = [
    ("host-header", "GET /peak/x HTTP/1.1\r\nHost: 127.0.0.1:{trap}\r\n"),
    ("host-header-unrouted", "GET /x HTTP/1.1\r\nHost: 127.0.0.1:{trap}\r\n"),
    ("double-slash-path", "GET //127.0.0.1:{trap}/x HTTP/1.1\r\nHost: x\r\n"),
    ("double-slash-in-route", "GET /peak//127.0.0.1:{trap}/x HTTP/1.1\r\nHost: x\r\n"),
    ("at-in-path", "GET /peak/x@127.0.0.1:{trap} HTTP/1.1\r\nHost: x\r\n"),
    ("at-prefix", "GET /peak@127.0.0.1:{trap}/x HTTP/1.1\r\nHost: x\r\n"),
    ("absolute-form", "GET http://127.0.0.1:{trap}/peak/x HTTP/1.1\r\nHost: x\r\n"),
    ("absolute-form-userinfo", "GET http://x@127.0.0.1:{trap}/peak/x HTTP/1.1\r\nHost: x\r\n"),
    ("absolute-form-unrouted", "GET http://127.0.0.1:{trap}/x HTTP/1.1\r\nHost: 127.0.0.1:{trap}\r\n"),
    ("connect", "CONNECT 127.0.0.1:{trap} HTTP/1.1\r\nHost: 127.0.0.1:{trap}\r\n"),
    (
        "rewrite-headers",
        "GET /peak/x HTTP/1.1\r\nHost: x\r\nX-Original-URL: http://127.0.0.1:{trap}/x\r\n"
        "X-Rewrite-URL: http://127.0.0.1:{trap}/x\r\nX-Forwarded-Host: 127.0.0.1:{trap}\r\n"
        "X-Forwarded-Server: 127.0.0.1\r\nX-Forwarded-Port: {trap}\r\nForwarded: host=127.0.0.1:{trap}\r\n"
        "X-Host: 127.0.0.1:{trap}\r\nX-HTTP-Destination: 127.0.0.1:{trap}\r\n",
    ),
    ("redirect-is-not-followed", "GET /peak/redirect?to=http://127.0.0.1:{trap}/x HTTP/1.1\r\nHost: x\r\n"),
]


@pytest.mark.parametrize("template", [pytest.param(t, id=i) for i, t in SSRF])
def test_nothing_in_a_request_makes_the_proxy_connect_elsewhere(rig: Rig, template: str) -> None:
    """A listener no route points at sees zero connections, whatever the request says."""
    data = template.format(trap=rig.outsider_port).encode() + b"Connection: close\r\n\r\n"
    raw, _ = exchange(rig.port, data)
    response = one_response(raw)
    assert response.body != b"trap"
    assert pending_connections(rig.outsider) == 0  # a connect is in the backlog before it returns


def test_rewrite_headers_reach_the_plugin_as_plain_headers_and_forwarding_is_rebuilt(rig: Rig) -> None:
    """X-Original-URL and friends change nothing in the proxy; X-Forwarded-* come from the scope."""
    data = dict(SSRF)["rewrite-headers"].format(trap=rig.outsider_port).encode() + b"Connection: close\r\n\r\n"
    raw, _ = exchange(rig.port, data)
    assert one_response(raw).status == 200
    (seen,) = rig.peak.seen
    assert seen["raw_path"] == "/peak/x"
    assert header_values(seen, "x-forwarded-host") == ["x"]
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    for name in ("x-forwarded-server", "x-forwarded-port", "forwarded"):
        assert header_values(seen, name) == []


@pytest.mark.parametrize("host", [b"a b", b"evil.example/peak", b"user@evil.example", b"evil.example:80:80"])
def test_host_with_an_invalid_value_is_refused(rig: Rig, host: bytes) -> None:
    """RFC 9112 §3.2: a Host that is not ``host[:port]`` is a 400. Neither server checks it.

    Regression test: such a Host used to reach the plugin (and its X-Forwarded-Host).
    """
    raw, _ = exchange(rig.port, make_request("/peak/x", "Connection: close", host=host))
    assert_proxy_error(one_response(raw), 400, "bad_request")
    rig.untouched()


@pytest.mark.parametrize(
    "to",
    ["{origin}//evil.example/x", "{origin}/%5Cevil.example/x", "{origin}/%09/evil.example", "{origin}/%20//evil"],
    ids=["double-slash", "backslash", "tab", "space"],
)
def test_location_rewrite_never_points_the_client_at_another_host(start_site: StartSite, to: str) -> None:
    """Regression test: a plugin answering ``Location: http://<its origin>//evil.example/x`` on an
    unstripped route reached the client as ``//evil.example/x``, which browsers follow off-site.
    A rewrite that would not be a plain path on this host leaves the plugin's value as it was."""
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url)])
        response = request_once(site, f"/peak/redirect?to={to}")
    location = response.header(b"location")
    assert response.status == 302 and location is not None
    assert location.startswith(plugin.url.encode() + b"/"), location


def test_location_on_the_plugins_origin_still_becomes_a_path(start_site: StartSite) -> None:
    """A Location on the plugin's own origin that stays a plain path still becomes the client's path."""
    app = Plugin()
    with serve(app) as plugin:
        site = start_site([Route("/peak", plugin.url)])
        response = request_once(site, "/peak/redirect?to={origin}" + site.base + "/peak/next%3Fa%3D1")
    assert response.header(b"location") == site.base.encode() + b"/peak/next?a=1"
