"""What is sent upstream for a route: the field lines the proxy adds, in list and wire form."""

from typing import Any

from hypothesis import given, settings, strategies as st

from mint_proxy._forward import Forward, Via
from mint_proxy.headers import RequestInfo, field_lines
from mint_proxy.routing import Route
from mint_proxy.tokens import TokenIssuer

SECRET = "s" * 48
VIA = Via("mint-proxy-test")
PLAIN = Route("/peak", "http://127.0.0.1:8005")
STRIPPED = Route("/api/peak", "http://127.0.0.1:8005/base", strip_prefix=True)
UNIX = Route("/lcms", "unix:/run/mint/lcms.sock")


def scope(**overrides: Any) -> dict[str, Any]:
    return {"type": "http", "http_version": "1.1", "scheme": "http", "client": ("10.0.0.7", 51234), **overrides}


def info(headers: list[tuple[bytes, bytes]], host: bytes | None, request_id: bytes = b"rid") -> RequestInfo:
    return RequestInfo(headers=headers, request_id=request_id, host=host, content_length=None, chunked=False)


def test_field_lines_are_the_clients_fields_then_the_proxys() -> None:
    forward = Forward(STRIPPED, mount_path="/mnt", via=VIA, tokens=None)
    request = info([(b"host", b"proxy.example"), (b"accept", b"*/*")], b"proxy.example")

    lines = forward.field_lines(scope(), request)

    assert lines == (
        b"host: proxy.example\r\naccept: */*\r\n"
        b"x-forwarded-for: 10.0.0.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: proxy.example\r\n"
        b"x-forwarded-prefix: /mnt/api/peak\r\nvia: 1.1 mint-proxy-test\r\nx-request-id: rid\r\n"
    )


def test_field_lines_carry_the_current_token_and_set_the_secret() -> None:
    now = [1_000_000.0]
    tokens = TokenIssuer(SECRET, ttl=10, clock=lambda: now[0])
    forward = Forward(PLAIN, mount_path="", via=VIA, tokens=tokens)
    request = info([(b"host", b"proxy.example")], b"proxy.example")

    first = forward.field_lines(scope(), request)
    first_secret = forward.secret
    now[0] += 10  # past the token's half-life: the issuer mints a new one
    second = forward.field_lines(scope(), request)

    assert first.endswith(b"x-mint-internal-token: " + first_secret + b"\r\n")
    assert second.endswith(b"x-mint-internal-token: " + forward.secret + b"\r\n")
    assert forward.secret == tokens.token_for("peak").encode() != first_secret


def test_a_request_without_host_gets_the_upstreams_authority_last() -> None:
    forward = Forward(UNIX, mount_path="", via=VIA, tokens=None)

    lines = forward.field_lines(scope(http_version="1.0", client=None), info([], None))

    assert lines == b"x-forwarded-proto: http\r\nvia: 1.0 mint-proxy-test\r\nx-request-id: rid\r\nhost: localhost\r\n"


HEADER_LISTS = st.lists(
    st.tuples(
        st.sampled_from([b"host", b"accept", b"cookie", b"x-a"]),
        st.sampled_from([b"proxy.example", b"*/*", b"", b"a: b"]),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(
    route=st.sampled_from([PLAIN, STRIPPED, UNIX]),
    mount_path=st.sampled_from(["", "/mnt"]),
    tokens=st.booleans(),
    headers=HEADER_LISTS,
    host=st.sampled_from([None, b"proxy.example", b"[::1]:8443"]),
    client=st.sampled_from([None, ("10.0.0.7", 1), ("::1", 2)]),
    scheme=st.sampled_from(["http", "https", "ws", "wss", "ftp"]),
    http_version=st.sampled_from(["1.0", "1.1", "2", "3"]),
    request_id=st.sampled_from([b"rid", b"0" * 32]),
)
def test_field_lines_agree_with_the_field_list_serialised(
    route: Route,
    mount_path: str,
    tokens: bool,
    headers: list[tuple[bytes, bytes]],
    host: bytes | None,
    client: tuple[str, int] | None,
    scheme: str,
    http_version: str,
    request_id: bytes,
) -> None:
    """The wire form, with its per-route lines built once, is an optimisation, never a different rule."""
    issuer = TokenIssuer(SECRET) if tokens else None
    by_bytes = Forward(route, mount_path=mount_path, via=VIA, tokens=issuer)
    by_list = Forward(route, mount_path=mount_path, via=VIA, tokens=issuer)
    request = info(headers, host, request_id)
    asgi = scope(client=client, scheme=scheme, http_version=http_version)

    added = by_list.fields(asgi, request) + ([by_list.host_field] if host is None else [])

    assert by_bytes.field_lines(asgi, request) == field_lines(request.headers + added)
    assert by_bytes.secret == by_list.secret
