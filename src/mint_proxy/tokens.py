"""Per-plugin internal tokens: the proxy mints them, the platform's ``/api/internal`` verifies them.

The proxy injects a short-lived HS256 JWT into every request it forwards to a plugin, in the
``X-Mint-Internal-Token`` header. The plugin sends it back when it calls the platform's internal
API, which learns from ``sub`` which plugin is calling. The token has its own ``typ`` header
(RFC 8725 §3.11, explicit typing) so a user's session JWT signed with the same secret is refused.

Proxy side::

    issuer = TokenIssuer(secret, kid="2025-06")
    headers.append((b"x-mint-internal-token", issuer.token_for("billing").encode()))

Platform side (rotate a secret by adding the new kid here, then switching the issuer to it)::

    auth = InternalTokenAuth({"2025-01": old_secret, "2025-06": new_secret})

    @app.get("/api/internal/whoami")
    async def whoami(plugin: Annotated[str, Depends(auth)]) -> dict[str, str]:
        return {"plugin": plugin}

    claims = verify_internal_token(token, new_secret, plugin="billing")  # or call it directly
"""

import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidSubjectError  # not re-exported by jwt/__init__.py
from starlette.exceptions import HTTPException
from starlette.requests import Request

from mint_proxy._names import INTERNAL_TOKEN_HEADER
from mint_proxy.errors import InvalidInternalToken

DEFAULT_TTL = 900.0  # seconds a token lives (TokenIssuer, `mint-proxy token --ttl`)
TOKEN_AUDIENCE = "mint-internal"
TOKEN_ISSUER = "mint-platform"
TOKEN_TYPE = "mint-internal+jwt"
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.

_ALGORITHM = "HS256"
# pyjwt checks exp/iat/aud/iss/sub only when present (jwt.types.Options); require them all.
# jti is required too: it becomes InternalTokenClaims.token_id.
_REQUIRED_CLAIMS = ["exp", "iat", "aud", "iss", "sub", "jti"]

_SecretOrKeys = str | bytes | Mapping[str, str | bytes]
# RFC 9110 §15.5.2: a 401 response carries at least one challenge.
_CHALLENGE = {"WWW-Authenticate": f'{INTERNAL_TOKEN_HEADER} realm="{TOKEN_AUDIENCE}"'}

# Most specific first: InvalidSignatureError is a DecodeError, everything is an InvalidTokenError.
_REASONS: tuple[tuple[type[jwt.InvalidTokenError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (InvalidSubjectError, "invalid subject"),
    (jwt.InvalidIssuedAtError, "invalid iat claim"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "signature mismatch"),
    (jwt.DecodeError, "malformed token"),
)


class _Secret:
    """Holds key material; its repr is masked so it never reaches a log or traceback."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "_Secret('**********')"


def _secret(value: object, name: str) -> _Secret:
    # Messages name the parameter and the rule, never the value.
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, bytes):
        raw = value
    else:
        raise TypeError(f"{name} must be str or bytes, not {type(value).__name__}")
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{name} must be at least {MIN_SECRET_BYTES} bytes, got {len(raw)};"
            " generate one with secrets.token_urlsafe(32)"
        )
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(raw)
    except jwt.InvalidKeyError:
        # A PEM/SSH/DER public key used as an HMAC secret is the RS256/HS256 confusion precondition.
        raise ValueError(f"{name} looks like an asymmetric key or a JWK; use a random shared secret") from None
    return _Secret(raw)


def _prepare_keys(secret_or_keys: _SecretOrKeys) -> _Secret | dict[str, _Secret]:
    if isinstance(secret_or_keys, str | bytes):
        return _secret(secret_or_keys, "secret")
    if not isinstance(secret_or_keys, Mapping) or not secret_or_keys:
        raise ValueError("secret_or_keys must be a secret (str or bytes) or a non-empty mapping of kid -> secret")
    keys: dict[str, _Secret] = {}
    for kid, value in secret_or_keys.items():
        if not isinstance(kid, str) or not kid:
            raise ValueError("secret_or_keys: every key id must be a non-empty str")
        keys[kid] = _secret(value, f"secret_or_keys[{kid!r}]")
    return keys


def _check_leeway(leeway: float) -> float:
    if not math.isfinite(leeway) or leeway < 0:
        raise ValueError(f"leeway must be a finite number of seconds >= 0, got {leeway!r}")
    return float(leeway)


@dataclass(frozen=True, slots=True)
class InternalTokenClaims:
    """The verified claims of an internal token."""

    plugin: str
    issued_at: int
    expires_at: int
    token_id: str


class TokenIssuer:
    """Mints and caches one internal token per plugin.

    ``token_for`` is on the proxy's hot path: a cached token is returned after one dict lookup and
    one clock comparison. Tokens live ``int(ttl)`` seconds (JWT times are whole seconds) and are
    re-minted once less than half of that remains, so every token a plugin receives stays valid for
    at least ``int(ttl) / 2`` seconds. A clock that steps back before a cached token's ``iat`` (a VM
    resumed, an NTP step) gets a fresh token too, so a verifier on the same clock never sees one
    from its future. Two threads may both mint on a
    miss; the last write wins and both tokens are valid. The cache holds one entry per plugin slug,
    so pass configured slugs, never request input.

        issuer = TokenIssuer(secret, kid="k2", ttl=900.0)
        token = issuer.token_for("billing")
    """

    def __init__(
        self,
        secret: str | bytes,
        *,
        kid: str | None = None,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = _secret(secret, "secret")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise ValueError("kid must be a non-empty str or None")
        if not math.isfinite(ttl) or ttl < 2:
            raise ValueError(f"ttl must be a finite number of seconds >= 2, got {ttl!r}")
        self._kid = kid
        self._ttl = float(ttl)
        self._clock = clock
        self._headers: dict[str, str] = {"typ": TOKEN_TYPE} if kid is None else {"typ": TOKEN_TYPE, "kid": kid}
        self._cache: dict[str, tuple[str, float, int]] = {}  # plugin -> (token, refresh after, iat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kid={self._kid!r}, ttl={self._ttl!r})"

    def token_for(self, plugin: str) -> str:
        """Return a valid internal token for ``plugin``, minting one only when the cached one is stale."""
        entry = self._cache.get(plugin)
        if entry is not None and entry[2] <= self._clock() < entry[1]:
            return entry[0]
        return self._mint(plugin)[0]

    def token_window(self, plugin: str) -> tuple[str, float, float]:
        """``token_for(plugin)``, and the times on ``clock`` between which it stays the answer: ``[from, until)``.

        For a caller that keeps the token itself and asks again only once ``clock()`` leaves
        the window (the proxy, per route): what ``token_for`` decides, without a call per request.
        """
        entry = self._cache.get(plugin)
        if entry is None or not entry[2] <= self._clock() < entry[1]:
            entry = self._mint(plugin)  # (this entry, not the cache's: another thread may mint meanwhile)
        token, until, issued_at = entry
        return token, float(issued_at), until

    @property
    def clock(self) -> Callable[[], float]:
        """The clock tokens are issued by (``time.time`` unless one was given)."""
        return self._clock

    def _mint(self, plugin: str) -> tuple[str, float, int]:
        """Mint and cache a token for ``plugin``; return its cache entry ``(token, refresh after, iat)``."""
        if not isinstance(plugin, str) or not plugin:
            raise ValueError("plugin must be a non-empty str")
        issued_at = int(self._clock())
        lifetime = int(self._ttl)
        claims = {
            "sub": plugin,
            "aud": TOKEN_AUDIENCE,
            "iss": TOKEN_ISSUER,
            "iat": issued_at,
            "exp": issued_at + lifetime,
            "jti": secrets.token_hex(16),
        }
        token = jwt.encode(claims, self._secret.value, algorithm=_ALGORITHM, headers=self._headers)
        entry = self._cache[plugin] = (token, issued_at + lifetime / 2, issued_at)
        return entry


def verify_internal_token(
    token: str,
    secret_or_keys: _SecretOrKeys,
    *,
    plugin: str | None = None,
    leeway: float = 30.0,
) -> InternalTokenClaims:
    """Verify an internal token and return its claims, or raise ``InvalidInternalToken``.

    ``secret_or_keys`` is one secret, or a mapping of kid -> secret: then the token's ``kid``
    header selects the key and an unknown or missing kid is refused. With one secret, a ``kid``
    in the token is ignored. ``plugin``, when given, must equal the token's ``sub``. ``leeway``
    (seconds) absorbs clock skew on ``exp``, ``iat`` and ``nbf``.

        claims = verify_internal_token(token, {"k1": old, "k2": new}, plugin="billing")
    """
    return _verify(token, _prepare_keys(secret_or_keys), plugin=plugin, leeway=_check_leeway(leeway))


def _verify(
    token: str, keys: _Secret | dict[str, _Secret], *, plugin: str | None, leeway: float
) -> InternalTokenClaims:
    if not token:
        raise InvalidInternalToken("empty token")
    try:
        # The header is read before the signature is checked only to refuse early and to pick
        # the key; it is covered by the signature, so an accepted token's typ and kid are genuine.
        header = jwt.get_unverified_header(token)
        if header.get("typ") != TOKEN_TYPE:
            raise InvalidInternalToken("not an internal token (wrong typ header)")
        if isinstance(keys, _Secret):
            key = keys
        else:
            kid = header.get("kid")
            if kid is None:
                raise InvalidInternalToken("missing key id")
            if kid not in keys:
                raise InvalidInternalToken("unknown key id")
            key = keys[kid]
        # RFC 8725 §2.1: the algorithm is pinned here, never taken from the token.
        payload = jwt.decode(
            token,
            key.value,
            algorithms=[_ALGORITHM],
            audience=TOKEN_AUDIENCE,
            issuer=TOKEN_ISSUER,
            leeway=leeway,
            options={"require": _REQUIRED_CLAIMS, "strict_aud": True},
        )
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidInternalToken(f"missing {exc.claim!r} claim") from exc
    except jwt.InvalidTokenError as exc:
        reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "invalid token")
        raise InvalidInternalToken(reason) from exc
    subject: str = payload["sub"]  # pyjwt checked it is a str
    if not subject:
        raise InvalidInternalToken("invalid subject")
    if plugin is not None and subject != plugin:
        raise InvalidInternalToken(f"token is for plugin {subject!r}")
    return InternalTokenClaims(
        plugin=subject,
        issued_at=int(payload["iat"]),
        expires_at=int(payload["exp"]),
        token_id=payload["jti"],
    )


class InternalTokenAuth:
    """Requires a valid internal token on a platform request and returns the calling plugin's slug.

    Raises ``HTTPException(401)`` with the refusal reason as ``detail``. Use it as
    ``Depends(auth)`` in FastAPI, or call ``plugin = auth(request)`` in a Starlette endpoint
    (Starlette renders ``HTTPException`` as plain text unless the app installs a JSON handler).
    """

    def __init__(self, secret_or_keys: _SecretOrKeys, *, leeway: float = 30.0) -> None:
        self._keys = _prepare_keys(secret_or_keys)
        self._leeway = _check_leeway(leeway)

    def __repr__(self) -> str:
        kids = "" if isinstance(self._keys, _Secret) else f"kids={sorted(self._keys)!r}, "
        return f"{type(self).__name__}({kids}leeway={self._leeway!r})"

    def __call__(self, request: Request) -> str:
        token = request.headers.get(INTERNAL_TOKEN_HEADER)
        if not token:
            raise HTTPException(401, detail=f"missing {INTERNAL_TOKEN_HEADER} header", headers=_CHALLENGE)
        try:
            claims = _verify(token, self._keys, plugin=None, leeway=self._leeway)
        except InvalidInternalToken as exc:
            raise HTTPException(401, detail=exc.reason, headers=_CHALLENGE) from exc
        return claims.plugin
