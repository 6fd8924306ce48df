"""Who is calling, what may they do, and how often: bearer tokens, scopes, rate limits.

Tokens are JWTs (PyJWT) with the claims `sub` (the principal, which becomes the command's
`actor`) and `scope` (space-separated). One verification key, chosen by the environment:

| variable | meaning |
|---|---|
| `WALLET_JWT_JWKS_URL` | an identity provider's JWKS URL (RS256/ES256; keys picked by `kid`, cached) |
| `WALLET_JWT_PUBLIC_KEY_FILE` | a PEM public key file (RS256 or ES256) |
| `WALLET_JWT_SECRET` / the run folder | the local HS256 secret (`infra.secrets.jwt_secret`), the default |
| `WALLET_JWT_ISSUER`, `WALLET_JWT_AUDIENCE` | when set, `iss` / `aud` must match |
| `WALLET_JWT_LEEWAY_S` | clock skew allowed on `exp` / `nbf` (default 30) |

The algorithm list is fixed per key kind (never taken from the token's header), so an HS256
token can never be verified with a public key as its secret. Signature checks are PyJWT's
(`hmac.compare_digest` for HS256); scope checks compare whole words of a set.

Rate limits are a token bucket per principal (`WALLET_RATE_LIMIT_RPS`, default 100 per second,
burst `WALLET_RATE_LIMIT_BURST`, default 200) and a bound on a principal's requests waiting
for outcomes at once (`WALLET_CONCURRENT_WAITS_MAX`, default 64). Both are held in the memory
of one API process: N API processes allow N times the rate.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import jwt
from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from infra.http import ApiError
from infra.secrets import jwt_secret
from infra.settings import Settings
from schemas.commands import LOCAL_ACCOUNT_ACTOR_PREFIX

SCOPE_USER = "wallet:user"
SCOPE_BANK = "wallet:bank"
SCOPE_OPERATOR = "wallet:operator"
SCOPE_AUDIT = "wallet:audit"
SCOPES = (SCOPE_USER, SCOPE_BANK, SCOPE_OPERATOR, SCOPE_AUDIT)
# The command's `role` for the scope that authorised it.
ROLE_OF_SCOPE = {SCOPE_USER: "user", SCOPE_BANK: "bank", SCOPE_OPERATOR: "operator"}
# Scopes that may read every account, not only the caller's own.
READ_ALL_SCOPES = frozenset({SCOPE_OPERATOR, SCOPE_AUDIT})

SUB_LENGTH_MAX = 128
TOKEN_TTL_S_DEFAULT = 3600
LEEWAY_S_DEFAULT = 30
RATE_LIMIT_RPS_DEFAULT = 100.0
RATE_LIMIT_BURST_DEFAULT = 200
CONCURRENT_WAITS_MAX_DEFAULT = 64
# Principals whose buckets are remembered; the least recently seen is forgotten beyond it.
PRINCIPALS_TRACKED_MAX = 100_000
LOCAL_ISSUER = "streamwallet-local"
# A verified token is remembered (the whole token string, signature included, is the key) so
# that a client's next requests skip the signature check, a tenth of the API's time per
# request. Its expiry is still checked on every use; the entry is dropped after
# TOKEN_CACHE_TTL_S so that a key the identity provider withdraws stops verifying within it.
TOKENS_CACHED_MAX = 10_000
TOKEN_CACHE_TTL_S = 60.0
ASYMMETRIC_ALGORITHMS = ["RS256", "ES256"]


class AuthError(Exception):
    """A token that proves nothing: 401."""


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    scopes: frozenset[str]

    def role_for(self, allowed: tuple[str, ...]) -> str | None:
        """The first of `allowed` scopes the principal holds, as a command role (None if none)."""
        for scope in allowed:
            if scope in self.scopes:
                return ROLE_OF_SCOPE.get(scope, scope)
        return None

    @property
    def reads_everything(self) -> bool:
        return not self.scopes.isdisjoint(READ_ALL_SCOPES)


@dataclass(frozen=True)
class AuthConfig:
    """How tokens are verified. `None` keys mean authentication is off (local experiments only)."""

    enabled: bool
    secret: str | None = None
    public_key: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_s: int = LEEWAY_S_DEFAULT

    @classmethod
    def from_environment(cls, settings: Settings, enabled: bool = True) -> AuthConfig:
        if not enabled:
            return cls(enabled=False)
        base = cls(
            enabled=True,
            issuer=os.environ.get("WALLET_JWT_ISSUER") or None,
            audience=os.environ.get("WALLET_JWT_AUDIENCE") or None,
            leeway_s=int(os.environ.get("WALLET_JWT_LEEWAY_S", LEEWAY_S_DEFAULT)),
        )
        jwks_url = os.environ.get("WALLET_JWT_JWKS_URL", "").strip()
        if jwks_url:
            return replace(base, jwks_url=jwks_url)
        key_file = os.environ.get("WALLET_JWT_PUBLIC_KEY_FILE", "").strip()
        if key_file:
            return replace(base, public_key=Path(key_file).read_text())
        return replace(base, secret=jwt_secret(settings))


class TokenVerifier:
    """Turns an `Authorization` header into a Principal, or raises AuthError saying why."""

    def __init__(self, config: AuthConfig, clock=time.time) -> None:
        self.config = config
        self._jwks = jwt.PyJWKClient(config.jwks_url, cache_keys=True) if config.jwks_url else None
        self._clock = clock
        # token -> (principal, expires_s with the leeway, remembered until_s); least recently used first
        self._verified: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()
        self._verified_lock = threading.Lock()  # principal() also runs on worker threads (JWKS)

    def principal(self, authorization: str | None) -> Principal:
        token = _bearer_token(authorization)
        now_s = self._clock()
        with self._verified_lock:
            remembered = self._verified.get(token)
            if remembered is not None:
                principal, expires_s, until_s = remembered
                if now_s >= expires_s:
                    del self._verified[token]
                    raise AuthError("the token has expired")
                if now_s < until_s:
                    self._verified.move_to_end(token)
                    return principal
                del self._verified[token]
        claims = self._verify(token)
        principal = _principal_of(claims)
        with self._verified_lock:
            self._verified[token] = (principal, claims["exp"] + self.config.leeway_s, now_s + TOKEN_CACHE_TTL_S)
            while len(self._verified) > TOKENS_CACHED_MAX:
                self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> dict:
        key, algorithms = self._key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.config.issuer,
                audience=self.config.audience,
                leeway=self.config.leeway_s,
                options={"require": ["sub", "exp"], "verify_aud": self.config.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature does not verify") from None
        except jwt.InvalidTokenError as error:
            raise AuthError(f"the token is not acceptable: {error}") from None
        return claims

    def _key(self, token: str):
        if self._jwks is not None:
            try:
                return self._jwks.get_signing_key_from_jwt(token).key, ASYMMETRIC_ALGORITHMS
            except (jwt.PyJWKClientError, jwt.DecodeError) as error:
                raise AuthError(f"no key of the identity provider verifies this token: {error}") from None
        if self.config.public_key is not None:
            return self.config.public_key, ASYMMETRIC_ALGORITHMS
        return self.config.secret, ["HS256"]


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no bearer token: send `Authorization: Bearer <token>` (get one with `wallet auth token`)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be `Bearer <token>`")
    return token.strip()


def _principal_of(claims: dict) -> Principal:
    sub, scope, expires = claims.get("sub"), claims.get("scope", ""), claims.get("exp")
    # PyJWT takes a numeric string as exp, nbf and iat (RFC 7519: a NumericDate is a JSON
    # number); the remembered expiry is arithmetic on exp.
    if type(expires) not in (int, float):
        raise AuthError("the token's exp must be a number (NumericDate)")
    for name in ("nbf", "iat"):
        if name in claims and type(claims[name]) not in (int, float):
            raise AuthError(f"the token's {name} must be a number (NumericDate)")
    if not isinstance(sub, str) or not 1 <= len(sub) <= SUB_LENGTH_MAX:
        raise AuthError(f"the token's sub must be a string of 1 to {SUB_LENGTH_MAX} characters")
    if sub.startswith(LOCAL_ACCOUNT_ACTOR_PREFIX):
        raise AuthError(f"the token's sub may not start with {LOCAL_ACCOUNT_ACTOR_PREFIX!r}: the local edges' actors")
    if not _encodes_as_utf8(sub):
        # A lone surrogate cannot be written into a command, a digest or a query: a 500 each.
        raise AuthError("the token's sub must be UTF-8 text (no lone surrogates)")
    if not isinstance(scope, str):
        raise AuthError("the token's scope must be a space-separated string")
    return Principal(sub=sub, scopes=frozenset(scope.split()))


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def issue_token(
    secret: str,
    sub: str,
    scopes: str,
    ttl_s: int = TOKEN_TTL_S_DEFAULT,
    *,
    now_s: float | None = None,
    not_before_s: float | None = None,
) -> str:
    """An HS256 token signed with the local secret (`wallet auth token`, tests)."""
    unknown = set(scopes.split()) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {sorted(unknown)}; the scopes are {' '.join(SCOPES)}")
    if not 1 <= len(sub) <= SUB_LENGTH_MAX:
        raise ValueError(f"sub must be 1 to {SUB_LENGTH_MAX} characters")
    if sub.startswith(LOCAL_ACCOUNT_ACTOR_PREFIX):
        raise ValueError(f"sub may not start with {LOCAL_ACCOUNT_ACTOR_PREFIX!r}: the local edges' actors")
    issued_s = int(time.time() if now_s is None else now_s)
    claims = {
        "sub": sub,
        "scope": " ".join(scopes.split()),
        "iat": issued_s,
        "exp": issued_s + ttl_s,
        "iss": LOCAL_ISSUER,
    }
    if not_before_s is not None:
        claims["nbf"] = int(not_before_s)
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass(frozen=True)
class RateLimits:
    rate_per_s: float = RATE_LIMIT_RPS_DEFAULT
    burst: int = RATE_LIMIT_BURST_DEFAULT
    concurrent_waits_max: int = CONCURRENT_WAITS_MAX_DEFAULT

    @classmethod
    def from_environment(cls) -> RateLimits:
        return cls(
            rate_per_s=float(os.environ.get("WALLET_RATE_LIMIT_RPS", RATE_LIMIT_RPS_DEFAULT)),
            burst=int(os.environ.get("WALLET_RATE_LIMIT_BURST", RATE_LIMIT_BURST_DEFAULT)),
            concurrent_waits_max=int(os.environ.get("WALLET_CONCURRENT_WAITS_MAX", CONCURRENT_WAITS_MAX_DEFAULT)),
        )

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1 or self.concurrent_waits_max < 1:
            raise ValueError(f"rate limits must be positive: {self}")


# Refills are sums of float products: 0.1 s at 10/s must make a whole token.
_TOKEN_EPSILON = 1e-9


class _Bucket:
    __slots__ = ("tokens", "updated_s", "waiting")

    def __init__(self, tokens: float, updated_s: float) -> None:
        self.tokens = tokens
        self.updated_s = updated_s
        self.waiting = 0


class RateLimiter:
    """A token bucket and a count of waiting requests per principal, in this process's memory."""

    def __init__(self, limits: RateLimits, clock=time.monotonic, principals_max: int = PRINCIPALS_TRACKED_MAX) -> None:
        self.limits = limits
        self._clock = clock
        self._principals_max = principals_max
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, sub: str) -> float | None:
        """None if the request may go ahead (one token taken), else the seconds until a token is due."""
        now_s = self._clock()
        with self._lock:
            bucket = self._bucket(sub, now_s)
            bucket.tokens = min(self.limits.burst, bucket.tokens + (now_s - bucket.updated_s) * self.limits.rate_per_s)
            bucket.updated_s = now_s
            if bucket.tokens >= 1 - _TOKEN_EPSILON:
                bucket.tokens = max(0.0, bucket.tokens - 1)
                return None
            return (1 - bucket.tokens) / self.limits.rate_per_s

    def enter_wait(self, sub: str) -> bool:
        """Count one more request of `sub` waiting for an outcome; False when at the bound."""
        with self._lock:
            bucket = self._bucket(sub, self._clock())
            if bucket.waiting >= self.limits.concurrent_waits_max:
                return False
            bucket.waiting += 1
            return True

    def leave_wait(self, sub: str) -> None:
        with self._lock:
            bucket = self._buckets.get(sub)
            assert bucket is not None and bucket.waiting > 0, f"leave_wait without enter_wait for {sub!r}"
            bucket.waiting -= 1

    def _bucket(self, sub: str, now_s: float) -> _Bucket:
        bucket = self._buckets.get(sub)
        if bucket is None:
            bucket = self._buckets[sub] = _Bucket(float(self.limits.burst), now_s)
            self._evict()
        self._buckets.move_to_end(sub)
        return bucket

    def _evict(self) -> None:
        # A forgotten principal starts again with a full bucket: never one that is waiting.
        for _ in range(len(self._buckets) - self._principals_max):
            sub, oldest = next(iter(self._buckets.items()))
            if oldest.waiting:
                break
            del self._buckets[sub]


def retry_after_header(wait_s: float) -> str:
    """Retry-After is whole seconds: round up, at least 1."""
    return str(max(1, math.ceil(wait_s)))


# -- the FastAPI edge ----------------------------------------------------------------------------


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="streamwallet", error="invalid_token"'}
    )


class Gate:
    """FastAPI dependencies that authenticate, rate-limit and authorise a request.

    `gate.requires(SCOPE_A, SCOPE_B)` answers the Principal when the token holds any of the
    scopes: 401 without a valid token, 429 over the principal's rate, 403 without the scope.
    The bearer scheme is declared on every route that uses it (OpenAPI `security`).
    """

    def __init__(self, config: AuthConfig, limits: RateLimits) -> None:
        self.config = config
        self.verifier = TokenVerifier(config) if config.enabled else None
        self.limiter = RateLimiter(limits)
        self._bearer = HTTPBearer(
            auto_error=False,
            description="a JWT with `sub` and `scope` claims; `wallet auth token` makes one for the local stack",
        )
        self._credentials = Security(self._bearer)

    def requires(self, *scopes: str):
        assert scopes and set(scopes) <= set(SCOPES), f"unknown scopes {scopes}"
        wanted = " or ".join(scopes)

        async def principal(credentials: HTTPAuthorizationCredentials | None = self._credentials) -> Principal:
            caller = await self.authenticate(credentials)
            if self.verifier is None:
                return caller  # authentication off: no principals, so no per-principal limits either
            wait_s = self.limiter.take(caller.sub)
            if wait_s is not None:
                retry_after = retry_after_header(wait_s)
                raise ApiError(
                    429,
                    "rate_limited",
                    f"{caller.sub} sent more than {self.limiter.limits.rate_per_s:g} requests/s (burst "
                    f"{self.limiter.limits.burst}); retry after {retry_after} s",
                    headers={"Retry-After": retry_after},
                )
            if caller.scopes.isdisjoint(scopes):
                raise ApiError(
                    403,
                    "forbidden",
                    f"this needs the scope {wanted}; the token has {' '.join(sorted(caller.scopes)) or 'none'}",
                    headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{wanted}"'},
                )
            return caller

        return principal

    async def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if self.verifier is None:
            return ANONYMOUS
        header = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else None
        try:
            if self.verifier.config.jwks_url:
                # The first use of a key fetches the JWKS document: not on the event loop.
                return await asyncio.to_thread(self.verifier.principal, header)
            return self.verifier.principal(header)
        except AuthError as error:
            raise _unauthorized(str(error)) from None


# With authentication off (`wallet up --auth off`), every request is this principal.
ANONYMOUS = Principal(sub="anonymous", scopes=frozenset(SCOPES))
