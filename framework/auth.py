"""Authentication and authorization: JWT bearer tokens and mTLS workload identity.

Server::

    keys = KeySet(JwksFile("/etc/keys/jwks.json"))           # rotates without restart
    verifier = JwtVerifier(keys, JwtConfig(issuer="https://id.example", audience="orders"))
    server = Server(config, policies=[AuthPolicy(verifier), ...])

    # in a servicer
    principal = current_principal()      # subject, scopes, claims, identity (mTLS)

`AuthPolicy` reads `authorization: Bearer <jwt>`.  What a method needs comes from
its contract (`framework.v1.method_policy`): `auth_required` (unset -> the
policy's default, required; `false` -> public) and `scopes` (all required).
Health (`grpc.health.v1.Health`), reflection (`grpc.reflection.*`) and
`framework.v1.HealthReportService` are open.  The rules per method are computed
once, in `bind`.

Outcomes: no/malformed/invalid token -> `UnauthenticatedError` (UNAUTHENTICATED)
with a reason (`TOKEN_MISSING`, `TOKEN_MALFORMED`, `TOKEN_EXPIRED`,
`TOKEN_NOT_YET_VALID`, `TOKEN_BAD_SIGNATURE`, `TOKEN_WRONG_ISSUER`,
`TOKEN_WRONG_AUDIENCE`, `TOKEN_UNKNOWN_KEY`, `TOKEN_ALGORITHM_REJECTED`); a valid
token without a scope -> `PermissionDeniedError` (`SCOPE_MISSING`).  Messages say
what is wrong and never contain the token or a key.  A token that is sent must
be valid, even on a public method.

Workload identity (mTLS, see `framework.tls`): the peer certificate's SPIFFE ID
(or first SAN) is `principal.identity`.  `allowed_identities` maps method
patterns to identity patterns (shell-style), or is a callable
`(method, identity) -> bool`; an allowed identity is authorized for that method
without a token.  A caller with a certificate whose identity is not allowed and
no token gets PERMISSION_DENIED (`IDENTITY_NOT_ALLOWED`).

Cost: verifying a token (pyjwt) costs ~20 us, so verified tokens are cached
(bounded LRU keyed by the token string) until their `exp` or until the key set
changes; `exp` is checked against the clock on every hit.  A repeated token
costs ~1-2 us.

Client::

    channel = connect(target, policies=[BearerToken("eyJ...")])
    channel = connect(target, policies=[BearerToken(provider=fetch_token)])

`fetch_token` is `async () -> IssuedToken`; the token is refreshed in the
background `refresh_before_s` before it expires; a call waits for a refresh
only when no valid token exists.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from framework.bearer import BearerToken, IssuedToken
from framework.clock import Clock, SystemClock
from framework.errors import PermissionDeniedError, UnauthenticatedError
from framework.keyset import KeySet
from framework.policy import BasePolicy, Call, Exit, Method, Side
from framework.tls import peer_identity

__all__ = [
    "OPEN_SERVICES",
    "AuthPolicy",
    "BearerToken",
    "IssuedToken",
    "JwtConfig",
    "JwtVerifier",
    "Principal",
    "current_principal",
]

logger = logging.getLogger(__name__)

OPEN_SERVICES: tuple[str, ...] = (
    "grpc.health.v1.Health",
    "grpc.reflection.*",
    "framework.v1.HealthReportService",
)

_EMPTY_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's subject, scopes and claims, and the mTLS identity."""

    subject: str
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_CLAIMS)
    identity: str | None = None  # verified peer certificate identity (SPIFFE ID / SAN)

    @property
    def has_token(self) -> bool:
        return bool(self.claims)


_principal: ContextVar[Principal | None] = ContextVar("framework_principal", default=None)


def current_principal() -> Principal | None:
    """The verified caller of the call this task is handling; None when anonymous."""
    return _principal.get()


# ------------------------------------------------------------------ verifier


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """What a token must say. `issuer`/`audience` None means that claim is not checked."""

    issuer: str | tuple[str, ...] | None
    audience: str | None
    leeway_s: float = 10.0
    require_exp: bool = True
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        if not 0 <= self.leeway_s <= 300:
            raise ValueError("leeway_s must be between 0 and 300 seconds")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0 (0 disables the cache)")
        if isinstance(self.issuer, tuple) and not self.issuer:
            raise ValueError("issuer must name at least one trusted issuer, or be None")

    @property
    def issuers(self) -> tuple[str, ...]:
        if self.issuer is None:
            return ()
        return (self.issuer,) if isinstance(self.issuer, str) else self.issuer


def _rejected(reason: str, message: str) -> UnauthenticatedError:
    return UnauthenticatedError(message, reason=reason)


def _shown(value: object, limit: int = 64) -> str:
    """An attacker-supplied value, safe to put in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64decode(part: str) -> bytes:
    """base64url without padding (the caller checked the alphabet); ValueError when invalid."""
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except binascii.Error as error:
        raise ValueError(str(error)) from None


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for name in ("scope", "scp", "scopes"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


class JwtVerifier:
    """Verifies bearer JWTs against a `KeySet`; caches what it verified.

    `start()` runs a background task that checks the key source every
    `keys.check_interval_s` (the server starts it); `reload()` forces a reload.
    """

    def __init__(self, keys: KeySet, config: JwtConfig, *, clock: Clock | None = None) -> None:
        self.keys = keys
        self.config = config
        self._clock = clock or SystemClock()
        self._now_s: Callable[[], float] = (
            time.time if isinstance(self._clock, SystemClock) else self._clock_now_s
        )
        # token -> (principal, expires_at (exp + leeway) or None, key set version)
        self._cache: OrderedDict[str, tuple[Principal, float | None, int]] = OrderedDict()
        self._watcher: Any = None
        self.misses = 0  # full verifications performed; for tests and metrics

    def _clock_now_s(self) -> float:
        return self._clock.now().timestamp()

    def verify(self, token: str) -> Principal:
        """The principal a token stands for; raises UnauthenticatedError saying why not."""
        entry = self._cache.get(token)
        if entry is not None:
            principal, expires_at, version = entry
            if version == self.keys.version and (expires_at is None or self._now_s() < expires_at):
                self._cache.move_to_end(token)
                return principal
            del self._cache[token]  # re-verify: says precisely why it no longer holds
        return self._verify_fully(token)

    def reload(self) -> bool:
        """Reload the keys now (ValueError if the source is broken); True when they changed."""
        changed = self.keys.reload()
        if changed:
            self._cache.clear()
        return changed

    async def start(self) -> None:
        import asyncio

        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="jwt-key-watcher"
            )

    async def close(self) -> None:
        import asyncio

        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                if not watcher.cancelled():
                    raise

    async def _watch(self) -> None:
        while True:
            await self._clock.sleep(self.keys.check_interval_s)
            if self.keys.check():
                self._cache.clear()

    def _verify_fully(self, token: str) -> Principal:
        self.misses += 1
        parts = token.split(".")
        if len(parts) != 3 or not all(_B64URL.fullmatch(part) for part in parts[:2]):
            raise _rejected(
                "TOKEN_MALFORMED", "the bearer token is not a JWT (three base64url parts)"
            )
        try:
            header = json.loads(_b64decode(parts[0]))
        except ValueError:
            raise _rejected("TOKEN_MALFORMED", "the token header is not base64url JSON") from None
        if not isinstance(header, dict):
            raise _rejected("TOKEN_MALFORMED", "the token header is not a JSON object")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise _rejected(
                "TOKEN_ALGORITHM_REJECTED", "unsigned tokens (alg 'none') are not accepted"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _rejected("TOKEN_MALFORMED", "the token's 'kid' header must be a string")
        key = self.keys.get(kid)
        if key is None and self.keys.check_if_due():
            self._cache.clear()
            key = self.keys.get(kid)
        if key is None:
            if kid is None:
                raise _rejected(
                    "TOKEN_UNKNOWN_KEY",
                    f"the token has no 'kid' header and {len(self.keys)} keys are trusted",
                )
            raise _rejected(
                "TOKEN_UNKNOWN_KEY",
                f"the token's key id {_shown(kid)} is not in the trusted key set "
                "(retired or not yet published)",
            )
        if algorithm != key.algorithm:
            raise _rejected(
                "TOKEN_ALGORITHM_REJECTED",
                f"algorithm {_shown(algorithm, 16)} is not accepted for key {_shown(kid)}, "
                f"which is pinned to {key.algorithm}",
            )
        try:
            signature = _b64decode(parts[2]) if _B64URL.fullmatch(parts[2]) else b""
        except ValueError:
            signature = b""
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not signature or not key.verify(signing_input, signature):
            raise _rejected(
                "TOKEN_BAD_SIGNATURE", f"the token's signature does not verify with key {key.kid!r}"
            )
        try:
            claims = json.loads(_b64decode(parts[1]))
        except ValueError:
            raise _rejected("TOKEN_MALFORMED", "the token's claims are not JSON") from None
        if not isinstance(claims, dict):
            raise _rejected("TOKEN_MALFORMED", "the token's claims are not a JSON object")
        expires_at = self._check_claims(claims)
        subject = claims.get("sub")
        principal = Principal(
            subject=subject if isinstance(subject, str) else "",
            scopes=_scopes(claims),
            claims=MappingProxyType(claims),
        )
        if self.config.cache_size:
            self._cache[token] = (principal, expires_at, self.keys.version)
            if len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return principal

    def _check_claims(self, claims: Mapping[str, Any]) -> float | None:
        """Validate exp/nbf/iss/aud; return the time (with leeway) the token stops being valid."""
        config = self.config
        now = self._now_s()
        exp = claims.get("exp")
        expires_at: float | None = None
        if exp is None:
            if config.require_exp:
                raise _rejected(
                    "TOKEN_MALFORMED", "the token has no 'exp' claim; tokens must expire"
                )
        elif not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _rejected("TOKEN_MALFORMED", "the token's 'exp' claim is not a number")
        else:
            expires_at = exp + config.leeway_s
            if now >= expires_at:
                raise _rejected(
                    "TOKEN_EXPIRED",
                    f"the token expired at {_iso(exp)} ({now - exp:.0f} s ago); get a new one",
                )
        nbf = claims.get("nbf")
        if nbf is not None:
            if not isinstance(nbf, int | float) or isinstance(nbf, bool):
                raise _rejected("TOKEN_MALFORMED", "the token's 'nbf' claim is not a number")
            if nbf - config.leeway_s > now:
                raise _rejected(
                    "TOKEN_NOT_YET_VALID",
                    f"the token is not valid before {_iso(nbf)} ({nbf - now:.0f} s from now)",
                )
        issuers = config.issuers
        if issuers and claims.get("iss") not in issuers:
            raise _rejected(
                "TOKEN_WRONG_ISSUER",
                f"the token's issuer {_shown(claims.get('iss'))} is not trusted "
                f"(expected {' or '.join(issuers)})",
            )
        if config.audience is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if config.audience not in audiences:
                raise _rejected(
                    "TOKEN_WRONG_AUDIENCE",
                    f"the token's audience {_shown(aud)} does not include {config.audience!r}",
                )
        return expires_at


# ------------------------------------------------------------------ policy

IdentityRule = Mapping[str, Iterable[str]] | Callable[[Method, str], bool]


@dataclass(frozen=True, slots=True)
class _Rule:
    """What one method needs, computed once in bind()."""

    method: str
    required: bool
    scopes: frozenset[str]
    identity_allowed: Callable[[str], bool] | None


class _IdentityMatcher:
    """Identity patterns of one method; answers cached per identity (identities are few)."""

    __slots__ = ("_known", "patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._known: dict[str, bool] = {}

    def __call__(self, identity: str) -> bool:
        allowed = self._known.get(identity)
        if allowed is None:
            allowed = any(fnmatch.fnmatchcase(identity, p) for p in self.patterns)
            if len(self._known) >= 1024:
                self._known.clear()
            self._known[identity] = allowed
        return allowed


def _bearer(header: str | bytes) -> str:
    if isinstance(header, str) and header.startswith("Bearer ") and " " not in header[7:]:
        return header[7:]  # the common spelling; anything odd takes the careful path
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _rejected(
            "TOKEN_MALFORMED", "the authorization header must have the form 'Bearer <jwt>'"
        )
    return token


class AuthPolicy(BasePolicy):
    """Server policy: verify the caller (JWT and/or mTLS identity), check scopes.

    `verifier` None accepts no tokens (mTLS identities only).  `required_by_default`
    applies to methods whose contract leaves `auth_required` unset.
    `open_services` are service patterns that skip the policy entirely.
    From code (for contracts you do not own): `public_methods` patterns are public,
    `method_scopes` maps method patterns to scopes required on top of the contract's.
    """

    sides = frozenset({Side.SERVER})

    def __init__(
        self,
        verifier: JwtVerifier | None,
        *,
        required_by_default: bool = True,
        open_services: Sequence[str] = OPEN_SERVICES,
        public_methods: Sequence[str] = (),
        method_scopes: Mapping[str, Iterable[str]] | None = None,
        allowed_identities: IdentityRule | None = None,
        read_peer_identity: bool = True,
    ) -> None:
        self.verifier = verifier
        self.required_by_default = required_by_default
        self.open_services = tuple(open_services)
        self.public_methods = tuple(public_methods)
        self.method_scopes = {k: tuple(v) for k, v in (method_scopes or {}).items()}
        self.allowed_identities = allowed_identities
        self.read_peer_identity = read_peer_identity

    async def start(self) -> None:
        if self.verifier is not None:
            await self.verifier.start()

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.close()

    def rule(self, method: Method) -> _Rule | None:
        """What `method` needs; None for open services."""
        if any(fnmatch.fnmatchcase(method.service, p) for p in self.open_services):
            return None
        options = method.policy
        if any(method.matches(p) for p in self.public_methods):
            required = False
        elif options.HasField("auth_required"):
            required = options.auth_required
        else:
            required = self.required_by_default
        scopes = set(options.scopes)
        for pattern, extra in self.method_scopes.items():
            if method.matches(pattern):
                scopes.update(extra)
        return _Rule(
            method=method.full_name,
            required=required,
            scopes=frozenset(scopes),
            identity_allowed=self._identity_rule(method),
        )

    def _identity_rule(self, method: Method) -> Callable[[str], bool] | None:
        rule = self.allowed_identities
        if rule is None:
            return None
        if callable(rule):
            check = rule
            return lambda identity: bool(check(method, identity))
        patterns = [p for pattern, ids in rule.items() if method.matches(pattern) for p in ids]
        return _IdentityMatcher(patterns) if patterns else None

    def bind(self, method: Method) -> Callable[[Call], Exit | None] | None:
        rule = self.rule(method)
        if rule is None:
            return None

        return functools.partial(self._enter, rule)

    def _enter(self, rule: _Rule, call: Call) -> Exit | None:
        header = call.header("authorization")
        principal: Principal | None = None
        if header is not None:
            if self.verifier is None:
                raise _rejected(
                    "TOKEN_NOT_ACCEPTED",
                    "this server does not accept bearer tokens; authenticate with a client "
                    "certificate",
                )
            principal = self.verifier.verify(_bearer(header))
        identity: str | None = None
        if self.read_peer_identity and call.context is not None:
            identity = peer_identity(call.context)
        if identity is not None and rule.identity_allowed is not None:
            if rule.identity_allowed(identity):
                return _publish(_with_identity(principal, identity))
            if principal is None and rule.required:
                raise PermissionDeniedError(
                    f"workload identity {identity!r} is not allowed to call {rule.method}",
                    reason="IDENTITY_NOT_ALLOWED",
                )
        if principal is None:
            if rule.required:
                raise _rejected(
                    "TOKEN_MISSING",
                    f"{rule.method} requires a bearer token: send 'authorization: Bearer <jwt>'",
                )
            return _publish(_with_identity(None, identity)) if identity is not None else None
        if rule.required and not rule.scopes <= principal.scopes:
            missing = ", ".join(sorted(rule.scopes - principal.scopes))
            raise PermissionDeniedError(
                f"the token lacks scope {missing} required by {rule.method}",
                reason="SCOPE_MISSING",
                metadata={"missing_scopes": missing},
            )
        return _publish(_with_identity(principal, identity) if identity else principal)


def _with_identity(principal: Principal | None, identity: str) -> Principal:
    if principal is None:
        return Principal(subject=identity, identity=identity)
    return Principal(principal.subject, principal.scopes, principal.claims, identity)


def _publish(principal: Principal) -> Exit:
    token = _principal.set(principal)

    def reset(error: BaseException | None) -> None:
        try:
            _principal.reset(token)
        except ValueError:  # the adapter ran this exit in another context: clear ours
            _principal.set(None)

    return reset
