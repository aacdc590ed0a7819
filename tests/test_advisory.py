"""Attack-shaped tests for internal tokens, one per attack (after pyjwt:tests/test_advisory.py).

Each test asserts the refusal reason, and that the reason echoes neither the token nor the secret.
"""

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from mint_proxy.errors import InvalidInternalToken
from mint_proxy.tokens import (
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    TOKEN_TYPE,
    InternalTokenAuth,
    TokenIssuer,
    verify_internal_token,
)

# 64 bytes, so HS512 signing with it raises no InsecureKeyLengthWarning.
SECRET = "advisory-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDE"
OTHER_SECRET = "advisory-other-secret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCD"

# A throwaway RSA public key (private half discarded). Public keys are public: the confusion
# attack signs HS256 with this text as the HMAC secret.
RSA_PUBLIC_KEY_PEM = """\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA15zj5mYpSLQW3bnB89Hm
F6JQbF/RUzLCmhLrH+5C5djfmMU45aFMLfGYnAIYcZc41OqOiOvCekNtDoNMbxCR
dZQJNja5KkNtnWG2VX7ecsUKJIInB1c8x+fEs85lNPdAuNfx2icfJiLPkP2YzjJN
/BfUnB+XzhsIHf7gnon96inuKILX5EaYrIb8UnjFuOCxK88k+TI2bMEE/iT0x64W
gmu5nk3akmbfOiYwckcq1VxTuIzZvngOW8Fbhq9yq8rEt4WLvVA+EcpdvaF7CjLK
SjU7v+Fixz0yPjIlTg+GT0KBd/ti+sJJT9HaFJD6tWjG7l+ALJcVKU+Se8/6hoRE
3QIDAQAB
-----END PUBLIC KEY-----
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def valid_claims(**overrides: Any) -> dict[str, Any]:
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
    return claims


def craft(header: dict[str, Any], payload: dict[str, Any], *, hmac_key: bytes | None = None) -> str:
    """Build a compact JWS by hand; without ``hmac_key`` the signature is empty (unsigned)."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def sign(payload: dict[str, Any], *, secret: str = SECRET, algorithm: str = "HS256", **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm=algorithm, headers={"typ": TOKEN_TYPE, **headers})


def refused(token: str, secret_or_keys: Any = SECRET, **kwargs: Any) -> str:
    """Assert that verification refuses ``token`` and return the reason."""
    with pytest.raises(InvalidInternalToken) as info:
        verify_internal_token(token, secret_or_keys, **kwargs)
    reason = info.value.reason
    assert not token or token not in reason
    assert SECRET not in reason and OTHER_SECRET not in reason
    return reason


def test_control_a_correct_token_is_accepted() -> None:
    # Guards the helpers: every refusal below differs from this token in one respect.
    assert verify_internal_token(sign(valid_claims()), SECRET, plugin="billing").plugin == "billing"


# --- algorithm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_unsigned_token_is_refused(alg: str) -> None:
    token = craft({"alg": alg, "typ": TOKEN_TYPE}, valid_claims())

    assert token.endswith(".")
    assert refused(token) == "algorithm not allowed"


def test_alg_none_with_a_known_kid_is_refused() -> None:
    token = craft({"alg": "none", "typ": TOKEN_TYPE, "kid": "k1"}, valid_claims())

    assert refused(token, {"k1": SECRET}) == "algorithm not allowed"


def test_missing_alg_header_is_refused() -> None:
    token = craft({"typ": TOKEN_TYPE}, valid_claims(), hmac_key=SECRET.encode())

    assert refused(token) == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithm_signed_with_the_real_secret_is_refused(alg: str) -> None:
    token = sign(valid_claims(), algorithm=alg)

    assert jwt.decode(token, SECRET, algorithms=[alg], audience=TOKEN_AUDIENCE)["sub"] == "billing"
    assert refused(token) == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_asymmetric_algorithm_header_is_refused(alg: str) -> None:
    token = craft({"alg": alg, "typ": TOKEN_TYPE}, valid_claims(), hmac_key=SECRET.encode())

    assert refused(token) == "algorithm not allowed"


def test_rs256_token_signed_with_a_real_rsa_key_is_refused() -> None:
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(valid_claims(), private_key, algorithm="RS256", headers={"typ": TOKEN_TYPE})

    assert refused(token) == "algorithm not allowed"


def test_rs256_hs256_key_confusion_token_signed_with_the_public_key_pem_is_refused() -> None:
    # The classic confusion: the attacker knows the public key and uses its PEM text as an HMAC
    # secret. pyjwt refuses to sign with it, so the token is built by hand.
    token = craft({"alg": "HS256", "typ": TOKEN_TYPE}, valid_claims(), hmac_key=RSA_PUBLIC_KEY_PEM.encode())

    assert refused(token) == "signature mismatch"


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda key: verify_internal_token("x.y.z", key), id="verify_internal_token"),
        pytest.param(lambda key: InternalTokenAuth({"k1": key}), id="InternalTokenAuth-keys"),
        pytest.param(lambda key: TokenIssuer(key), id="TokenIssuer"),
    ],
)
def test_rs256_hs256_key_confusion_public_key_pem_is_refused_as_a_secret(build: Any) -> None:
    # Verifying with the PEM as HMAC secret is what makes the confusion attack work: refuse the config.
    with pytest.raises(ValueError, match="asymmetric key") as info:
        build(RSA_PUBLIC_KEY_PEM)

    assert "MIIB" not in str(info.value)


def test_jwk_json_is_refused_as_a_secret() -> None:
    jwk = json.dumps({"kty": "oct", "k": b64url(SECRET.encode())})

    with pytest.raises(ValueError, match="JWK"):
        TokenIssuer(jwk)


# --- integrity ---------------------------------------------------------------------------------


def test_tampered_payload_with_the_original_signature_is_refused() -> None:
    header, _, signature = TokenIssuer(SECRET).token_for("billing").split(".")
    forged = f"{header}.{segment(valid_claims(sub='admin'))}.{signature}"

    assert refused(forged) == "signature mismatch"


def test_tampered_header_kid_swap_is_refused() -> None:
    header, payload, signature = TokenIssuer(SECRET, kid="k1").token_for("billing").split(".")
    forged = f"{segment({'alg': 'HS256', 'typ': TOKEN_TYPE, 'kid': 'k2'})}.{payload}.{signature}"

    assert refused(forged, {"k1": SECRET, "k2": OTHER_SECRET}) == "signature mismatch"


def test_token_signed_with_another_secret_is_refused() -> None:
    assert refused(sign(valid_claims(), secret=OTHER_SECRET)) == "signature mismatch"


def test_stripped_signature_is_refused() -> None:
    header, payload, _ = TokenIssuer(SECRET).token_for("billing").split(".")

    assert refused(f"{header}.{payload}.") == "signature mismatch"


# --- required claims ---------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "aud", "sub", "iss", "iat", "jti"], ids=lambda c: f"missing-{c}")
def test_token_missing_a_required_claim_is_refused(claim: str) -> None:
    claims = valid_claims()
    del claims[claim]

    assert refused(sign(claims)) == f"missing {claim!r} claim"


@pytest.mark.parametrize("claim", ["exp", "aud", "sub", "iss", "iat", "jti"], ids=lambda c: f"null-{c}")
def test_token_with_a_null_required_claim_is_refused(claim: str) -> None:
    # pyjwt refuses to encode some null claims, so the token is built by hand.
    token = craft({"alg": "HS256", "typ": TOKEN_TYPE}, valid_claims(**{claim: None}), hmac_key=SECRET.encode())

    assert refused(token) == f"missing {claim!r} claim"


# --- time --------------------------------------------------------------------------------------


def test_expired_token_is_refused() -> None:
    now = int(time.time())

    assert refused(sign(valid_claims(iat=now - 1000, exp=now - 100))) == "token expired"


def test_not_yet_valid_nbf_in_the_future_is_refused() -> None:
    assert refused(sign(valid_claims(nbf=int(time.time()) + 600))) == "token not yet valid"


def test_iat_far_in_the_future_is_refused() -> None:
    now = int(time.time())

    assert refused(sign(valid_claims(iat=now + 3600, exp=now + 7200))) == "token not yet valid"


@pytest.mark.parametrize("claim", ["exp", "nbf"])
def test_non_numeric_time_claim_is_refused(claim: str) -> None:
    assert refused(sign(valid_claims(**{claim: "tomorrow"}))) == "malformed token"


def test_non_numeric_iat_is_refused() -> None:
    assert refused(sign(valid_claims(iat="yesterday"))) == "invalid iat claim"


# --- audience, issuer, subject -----------------------------------------------------------------


@pytest.mark.parametrize(
    "aud",
    [
        pytest.param("mint-public", id="other-audience"),
        pytest.param("MINT-INTERNAL", id="case-variant"),
        pytest.param([TOKEN_AUDIENCE, "mint-public"], id="list-containing-ours"),
    ],
)
def test_wrong_audience_is_refused(aud: Any) -> None:
    assert refused(sign(valid_claims(aud=aud))) == "wrong audience"


def test_wrong_issuer_is_refused() -> None:
    assert refused(sign(valid_claims(iss="mint-plugin"))) == "wrong issuer"


def test_token_for_another_plugin_is_refused() -> None:
    token = TokenIssuer(SECRET).token_for("billing")

    assert refused(token, plugin="search") == "token is for plugin 'billing'"


@pytest.mark.parametrize("sub", [42, ["billing"], ""], ids=["int", "list", "empty"])
def test_malformed_subject_is_refused(sub: Any) -> None:
    assert refused(sign(valid_claims(sub=sub))) == "invalid subject"


# --- key ids -----------------------------------------------------------------------------------


def test_unknown_kid_is_refused() -> None:
    assert refused(sign(valid_claims(), kid="k9"), {"k1": SECRET}) == "unknown key id"


def test_missing_kid_with_a_keys_mapping_is_refused() -> None:
    assert refused(sign(valid_claims()), {"k1": SECRET}) == "missing key id"


def test_non_string_kid_is_refused() -> None:
    token = craft({"alg": "HS256", "typ": TOKEN_TYPE, "kid": ["k1"]}, valid_claims(), hmac_key=SECRET.encode())

    assert refused(token, {"k1": SECRET}) == "invalid token"


# --- token type --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typ",
    [
        pytest.param("JWT", id="default-JWT"),
        pytest.param(None, id="no-typ"),
        pytest.param("at+jwt", id="access-token"),
        pytest.param("MINT-INTERNAL+JWT", id="case-variant"),
    ],
)
def test_session_jwt_signed_with_the_same_secret_is_refused(typ: str | None) -> None:
    # A user's session JWT with every internal claim set, signed with the same secret: only typ differs.
    session = jwt.encode(valid_claims(), SECRET, algorithm="HS256", headers={"typ": typ})

    assert jwt.get_unverified_header(session).get("typ") == typ
    assert refused(session) == "not an internal token (wrong typ header)"


# --- malformed input ---------------------------------------------------------------------------


def test_empty_string_is_refused() -> None:
    assert refused("") == "empty token"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="one-word"),
        pytest.param("a.b", id="two-segments"),
        pytest.param("a.b.c", id="three-junk-segments"),
        pytest.param("....", id="dots"),
        pytest.param("!!!.!!!.!!!", id="non-base64url"),
        pytest.param(f"{b64url(b'not json')}.{segment({})}.", id="header-not-json"),
        pytest.param(f"{segment(['alg', 'HS256'])}.{segment({})}.", id="header-a-list"),
        pytest.param(f"Bearer {'x' * 20}", id="bearer-prefix"),
    ],
)
def test_garbage_is_refused(token: str) -> None:
    assert refused(token) == "malformed token"


def test_payload_that_is_not_json_is_refused() -> None:
    signing_input = f"{segment({'alg': 'HS256', 'typ': TOKEN_TYPE})}.{b64url(b'not json')}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()

    assert refused(f"{signing_input}.{b64url(signature)}") == "malformed token"


def test_unencoded_payload_b64_false_is_refused() -> None:
    # RFC 7797 detached/unencoded payloads are never issued by us; pyjwt needs detached_payload for them.
    header = {"alg": "HS256", "typ": TOKEN_TYPE, "b64": False, "crit": ["b64"]}
    token = f"{segment(header)}..{b64url(b'sig')}"

    assert refused(token) == "malformed token"


def test_unsupported_critical_header_is_refused() -> None:
    header = {"alg": "HS256", "typ": TOKEN_TYPE, "crit": ["exp"], "exp": 1}
    token = craft(header, valid_claims(), hmac_key=SECRET.encode())

    assert refused(token) == "invalid token"
