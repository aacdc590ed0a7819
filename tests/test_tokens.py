"""Issuing, caching, verifying and rotating internal tokens, and InternalTokenAuth in real apps.

Attack-shaped tests live in test_advisory.py.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mint_proxy import INTERNAL_TOKEN_HEADER
from mint_proxy.errors import InvalidInternalToken, MintProxyError
from mint_proxy.tokens import (
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    TOKEN_TYPE,
    InternalTokenAuth,
    InternalTokenClaims,
    TokenIssuer,
    verify_internal_token,
)

# Every test secret is at least 32 bytes: InsecureKeyLengthWarning stays an error.
SECRET = "tokens-test-secret-0123456789-abcdefghijklmnop"
OLD_SECRET = "tokens-test-old-secret-0123456789-abcdefghijkl"
NEW_SECRET = "tokens-test-new-secret-0123456789-abcdefghijkl"
SHORT_SECRET = "short-secret-xyz"  # 16 bytes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_token(*, secret: str = SECRET, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    """Encode an internal token by hand, so tests control every claim and the time."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "billing",
        "aud": TOKEN_AUDIENCE,
        "iss": TOKEN_ISSUER,
        "iat": now,
        "exp": now + 900,
        "jti": "0123456789abcdef",
    }
    claims.update(overrides)
    return jwt.encode(claims, secret, algorithm="HS256", headers={"typ": TOKEN_TYPE, **(headers or {})})


def reason_for(token: str, secret_or_keys: Any = SECRET, **kwargs: Any) -> str:
    with pytest.raises(InvalidInternalToken) as info:
        verify_internal_token(token, secret_or_keys, **kwargs)
    assert isinstance(info.value.__cause__, jwt.PyJWTError) or info.value.__cause__ is None
    return info.value.reason


# --- issuing ---------------------------------------------------------------------------------


def test_issued_token_carries_the_documented_claims() -> None:
    clock = FakeClock(1_700_000_000.75)
    token = TokenIssuer(SECRET, clock=clock).token_for("billing")

    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload.keys() == {"sub", "aud", "iss", "iat", "exp", "jti"}
    assert payload["sub"] == "billing"
    assert payload["aud"] == TOKEN_AUDIENCE == "mint-internal"
    assert payload["iss"] == TOKEN_ISSUER == "mint-platform"
    assert payload["iat"] == 1_700_000_000
    assert payload["exp"] == 1_700_000_000 + 900
    assert len(payload["jti"]) == 32
    int(payload["jti"], 16)


def test_issued_token_header_has_internal_typ_and_no_kid_by_default() -> None:
    token = TokenIssuer(SECRET).token_for("billing")

    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": TOKEN_TYPE}
    assert TOKEN_TYPE == "mint-internal+jwt"


def test_issued_token_header_carries_kid_when_given() -> None:
    token = TokenIssuer(SECRET, kid="k2").token_for("billing")

    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": TOKEN_TYPE, "kid": "k2"}


def test_issued_token_exp_follows_ttl() -> None:
    token = TokenIssuer(SECRET, ttl=60.0, clock=FakeClock(1_700_000_000.0)).token_for("billing")

    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 60


def test_cached_token_is_returned_again() -> None:
    issuer = TokenIssuer(SECRET)

    assert issuer.token_for("billing") == issuer.token_for("billing")


def test_cached_path_does_not_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_encode = jwt.encode

    def counting_encode(*args: Any, **kwargs: Any) -> str:
        calls.append("encode")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(jwt, "encode", counting_encode)
    issuer = TokenIssuer(SECRET)
    for _ in range(100):
        issuer.token_for("billing")

    assert calls == ["encode"]


def test_token_is_reminted_once_half_the_ttl_has_passed() -> None:
    clock = FakeClock(1_700_000_000.0)
    issuer = TokenIssuer(SECRET, ttl=900.0, clock=clock)
    first = issuer.token_for("billing")

    clock.now += 449.9
    assert issuer.token_for("billing") == first

    clock.now = 1_700_000_000.0 + 450
    second = issuer.token_for("billing")
    assert second != first
    assert jwt.decode(second, options={"verify_signature": False})["iat"] == 1_700_000_450
    assert issuer.token_for("billing") == second


def test_token_window_is_where_token_for_keeps_answering_the_same_token() -> None:
    """A caller that keeps the token until ``clock()`` leaves the window sends what ``token_for`` would."""
    clock = FakeClock(1_700_000_000.5)
    issuer = TokenIssuer(SECRET, ttl=900.0, clock=clock)

    token, start, until = issuer.token_window("billing")

    assert issuer.clock is clock
    assert (start, until) == (1_700_000_000.0, 1_700_000_450.0)
    for now in (start, until - 0.001):
        clock.now = now
        assert issuer.token_for("billing") == token
    clock.now = until
    assert issuer.token_for("billing") != token
    clock.now = start - 0.001  # stepped back before its iat
    assert issuer.token_window("billing")[0] != token


def test_a_clock_that_steps_back_gets_a_fresh_token_not_one_from_its_future() -> None:
    """A VM resumed or an NTP step: a verifier on the same clock would refuse the cached token (iat ahead)."""
    clock = FakeClock(1_700_000_120.0)
    issuer = TokenIssuer(SECRET, clock=clock)
    early = issuer.token_for("billing")
    clock.now = 1_700_000_000.0  # two minutes back

    token = issuer.token_for("billing")

    assert token != early
    assert jwt.decode(token, options={"verify_signature": False})["iat"] == 1_700_000_000


def test_a_fractional_ttl_still_leaves_half_the_lifetime_on_every_token() -> None:
    """JWT times are whole seconds: a ttl of 3.9 is a 3 s token, re-minted after 1.5 s."""
    clock = FakeClock(1_700_000_000.0)
    issuer = TokenIssuer(SECRET, ttl=3.9, clock=clock)
    issuer.token_for("billing")
    clock.now += 1.9

    claims = jwt.decode(issuer.token_for("billing"), options={"verify_signature": False})

    assert claims["exp"] - clock.now >= int(3.9) / 2


def test_different_plugins_get_different_tokens() -> None:
    issuer = TokenIssuer(SECRET)

    billing, search = issuer.token_for("billing"), issuer.token_for("search")

    assert billing != search
    assert verify_internal_token(billing, SECRET).plugin == "billing"
    assert verify_internal_token(search, SECRET).plugin == "search"


def test_each_mint_gets_a_fresh_token_id() -> None:
    a = TokenIssuer(SECRET).token_for("billing")
    b = TokenIssuer(SECRET).token_for("billing")

    assert verify_internal_token(a, SECRET).token_id != verify_internal_token(b, SECRET).token_id


@pytest.mark.parametrize("ttl", [0.0, 1.0, -900.0, float("inf"), float("nan")])
def test_issuer_refuses_a_bad_ttl(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        TokenIssuer(SECRET, ttl=ttl)


def test_issuer_refuses_an_empty_kid() -> None:
    with pytest.raises(ValueError, match="kid"):
        TokenIssuer(SECRET, kid="")


def test_issuer_refuses_an_empty_plugin_slug() -> None:
    with pytest.raises(ValueError, match="plugin"):
        TokenIssuer(SECRET).token_for("")


# --- verification ------------------------------------------------------------------------------


def test_verify_returns_the_claims_of_an_issued_token() -> None:
    token = TokenIssuer(SECRET).token_for("billing")
    payload = jwt.decode(token, options={"verify_signature": False})

    claims = verify_internal_token(token, SECRET, plugin="billing")

    assert claims == InternalTokenClaims(
        plugin="billing", issued_at=payload["iat"], expires_at=payload["exp"], token_id=payload["jti"]
    )


def test_claims_are_frozen() -> None:
    claims = verify_internal_token(make_token(), SECRET)

    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.plugin = "other"  # type: ignore[misc]


def test_verify_without_plugin_accepts_any_plugin() -> None:
    assert verify_internal_token(make_token(sub="search"), SECRET).plugin == "search"


def test_str_and_bytes_secrets_are_interchangeable() -> None:
    token = TokenIssuer(SECRET.encode()).token_for("billing")

    assert verify_internal_token(token, SECRET).plugin == "billing"
    assert verify_internal_token(TokenIssuer(SECRET).token_for("billing"), SECRET.encode()).plugin == "billing"


def test_single_secret_ignores_the_kid_in_the_token() -> None:
    token = TokenIssuer(SECRET, kid="anything").token_for("billing")

    assert verify_internal_token(token, SECRET).plugin == "billing"


def test_invalid_internal_token_is_a_mint_proxy_error_chained_from_pyjwt() -> None:
    with pytest.raises(InvalidInternalToken) as info:
        verify_internal_token(make_token(secret=OLD_SECRET), SECRET)

    assert isinstance(info.value, MintProxyError)
    assert isinstance(info.value.__cause__, jwt.InvalidSignatureError)
    assert str(info.value) == info.value.reason == "signature mismatch"


# --- rotation ----------------------------------------------------------------------------------


def test_rotation_accepts_tokens_from_old_and_new_keys() -> None:
    keys = {"k1": OLD_SECRET, "k2": NEW_SECRET}
    old_token = TokenIssuer(OLD_SECRET, kid="k1").token_for("billing")
    new_token = TokenIssuer(NEW_SECRET, kid="k2").token_for("billing")

    assert verify_internal_token(old_token, keys).plugin == "billing"
    assert verify_internal_token(new_token, keys).plugin == "billing"


def test_rotation_refuses_tokens_from_a_removed_key() -> None:
    old_token = TokenIssuer(OLD_SECRET, kid="k1").token_for("billing")

    assert reason_for(old_token, {"k2": NEW_SECRET}) == "unknown key id"


def test_keys_mapping_refuses_a_token_without_kid() -> None:
    token = TokenIssuer(NEW_SECRET).token_for("billing")

    assert reason_for(token, {"k2": NEW_SECRET}) == "missing key id"


def test_kid_selects_the_key_so_a_token_signed_with_another_key_is_refused() -> None:
    token = TokenIssuer(OLD_SECRET, kid="k2").token_for("billing")

    assert reason_for(token, {"k1": OLD_SECRET, "k2": NEW_SECRET}) == "signature mismatch"


def test_empty_keys_mapping_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty mapping"):
        verify_internal_token(make_token(), {})


def test_empty_kid_in_keys_mapping_is_refused() -> None:
    with pytest.raises(ValueError, match="key id"):
        InternalTokenAuth({"": SECRET})


# --- leeway ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "offset", "reason"),
    [
        pytest.param("exp", -10, "token expired", id="expired-10s-ago"),
        pytest.param("iat", 10, "token not yet valid", id="iat-10s-ahead"),
        pytest.param("nbf", 10, "token not yet valid", id="nbf-10s-ahead"),
    ],
)
def test_leeway_absorbs_small_clock_skew(claim: str, offset: int, reason: str) -> None:
    # Times are taken when the test runs, not when it is collected.
    claims: dict[str, Any] = {claim: int(time.time()) + offset}
    token = make_token(**claims)

    assert verify_internal_token(token, SECRET).plugin == "billing"  # default leeway: 30 s
    assert verify_internal_token(token, SECRET, leeway=20).plugin == "billing"
    assert reason_for(token, leeway=0) == reason


def test_leeway_does_not_stretch_beyond_its_value() -> None:
    token = make_token(exp=int(time.time()) - 60)

    assert reason_for(token, leeway=30) == "token expired"


@pytest.mark.parametrize("leeway", [-1.0, float("inf"), float("nan")])
def test_bad_leeway_is_refused(leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        verify_internal_token(make_token(), SECRET, leeway=leeway)
    with pytest.raises(ValueError, match="leeway"):
        InternalTokenAuth(SECRET, leeway=leeway)


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [SHORT_SECRET, SHORT_SECRET.encode()], ids=["str", "bytes"])
@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda s: TokenIssuer(s), id="TokenIssuer"),
        pytest.param(lambda s: InternalTokenAuth(s), id="InternalTokenAuth"),
        pytest.param(lambda s: InternalTokenAuth({"k1": SECRET, "k2": s}), id="InternalTokenAuth-keys"),
        pytest.param(lambda s: verify_internal_token(make_token(), s), id="verify_internal_token"),
    ],
)
def test_short_secret_is_refused_without_echoing_it(secret: str | bytes, build: Callable[[Any], object]) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes") as info:
        build(secret)

    message = str(info.value)
    assert "secret" in message
    assert SHORT_SECRET not in message
    assert repr(SHORT_SECRET.encode()) not in message


def test_secret_length_counts_utf8_bytes() -> None:
    TokenIssuer("é" * 16)  # 32 bytes, 16 characters
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenIssuer("é" * 15)


def test_non_string_secret_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="secret must be str or bytes"):
        TokenIssuer(12345678901234567890123456789012345)  # type: ignore[arg-type]


def test_issuer_repr_hides_the_secret() -> None:
    issuer = TokenIssuer(SECRET, kid="k2")
    issuer.token_for("billing")

    assert repr(issuer) == "TokenIssuer(kid='k2', ttl=900.0)"
    assert SECRET not in str(issuer)
    assert SECRET not in repr(vars(issuer))


def test_auth_repr_hides_the_secrets() -> None:
    auth = InternalTokenAuth({"k1": OLD_SECRET, "k2": NEW_SECRET})

    assert repr(auth) == "InternalTokenAuth(kids=['k1', 'k2'], leeway=30.0)"
    assert OLD_SECRET not in repr(vars(auth)) and NEW_SECRET not in repr(vars(auth))
    assert SECRET not in repr(InternalTokenAuth(SECRET))


# --- InternalTokenAuth in real apps ------------------------------------------------------------


def fastapi_app(auth: InternalTokenAuth) -> FastAPI:
    app = FastAPI()

    @app.get("/api/internal/whoami")
    async def whoami(plugin: Annotated[str, Depends(auth)]) -> dict[str, str]:
        return {"plugin": plugin}

    return app


def starlette_app(auth: InternalTokenAuth) -> Starlette:
    async def whoami(request: Request) -> Response:
        return JSONResponse({"plugin": auth(request)})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return Starlette(
        routes=[Route("/api/internal/whoami", whoami)],
        exception_handlers={HTTPException: http_error},
    )


@pytest.fixture(params=[fastapi_app, starlette_app], ids=["fastapi", "starlette"])
def client(request: pytest.FixtureRequest) -> httpx.AsyncClient:
    app = request.param(InternalTokenAuth({"k1": OLD_SECRET, "k2": NEW_SECRET}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://platform.test")


@pytest.mark.anyio
async def test_auth_returns_the_calling_plugin(client: httpx.AsyncClient) -> None:
    token = TokenIssuer(NEW_SECRET, kid="k2").token_for("billing")

    async with client:
        response = await client.get("/api/internal/whoami", headers={INTERNAL_TOKEN_HEADER: token})

    assert response.status_code == 200
    assert response.json() == {"plugin": "billing"}


@pytest.mark.anyio
async def test_auth_header_name_is_case_insensitive(client: httpx.AsyncClient) -> None:
    token = TokenIssuer(OLD_SECRET, kid="k1").token_for("search")

    async with client:
        response = await client.get("/api/internal/whoami", headers={"x-mint-internal-token": token})

    assert response.json() == {"plugin": "search"}


@pytest.mark.anyio
async def test_auth_missing_header_is_401(client: httpx.AsyncClient) -> None:
    async with client:
        response = await client.get("/api/internal/whoami")

    assert response.status_code == 401
    assert response.json() == {"detail": "missing X-Mint-Internal-Token header"}
    assert response.headers["www-authenticate"] == 'X-Mint-Internal-Token realm="mint-internal"'


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("token", "detail"),
    [
        pytest.param(make_token(secret=NEW_SECRET, headers={"kid": "k2"}, exp=1), "token expired", id="expired"),
        pytest.param(make_token(secret=OLD_SECRET, headers={"kid": "k2"}), "signature mismatch", id="wrong-key"),
        pytest.param(make_token(secret=NEW_SECRET, headers={"kid": "k9"}), "unknown key id", id="unknown-kid"),
        pytest.param("garbage", "malformed token", id="garbage"),
    ],
)
async def test_auth_invalid_token_is_401_with_reason(client: httpx.AsyncClient, token: str, detail: str) -> None:
    async with client:
        response = await client.get("/api/internal/whoami", headers={INTERNAL_TOKEN_HEADER: token})

    assert response.status_code == 401
    assert response.json() == {"detail": detail}
    assert "www-authenticate" in response.headers
