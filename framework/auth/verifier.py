"""JWT verification: signature by `kid` with a pinned algorithm, claims, and a cache.

`JwtVerifier.verify(token)` returns the `Principal` a bearer token stands for, or
raises `UnauthenticatedError` with a reason (`TOKEN_MALFORMED`, `TOKEN_EXPIRED`,
`TOKEN_NOT_YET_VALID`, `TOKEN_BAD_SIGNATURE`, `TOKEN_WRONG_ISSUER`,
`TOKEN_WRONG_AUDIENCE`, `TOKEN_WRONG_TYPE`, `TOKEN_UNKNOWN_KEY`,
`TOKEN_ALGORITHM_REJECTED`) and a message that says what is wrong without the
token or a key.

Time claims (`exp`, `nbf`, `iat`) must be finite JSON numbers within years 1970
to 9999: `NaN`, `Infinity` (which Python's JSON reader accepts) and `1e400`
would otherwise compare as never expiring or overflow the date conversion.
When `JwtConfig.token_type` is set (the issuer marks its access tokens, e.g.
`at+jwt`, RFC 9068), the `typ` header must say so, so an ID token or another
kind of JWT from the same issuer is not accepted as an access token.

The JWS is parsed here and verified with keys prepared once when the key set
loads (`framework.auth.keyset`); pyjwt's per-call key preparation and base64
re-validation cost several times the HMAC itself.  Verified tokens are cached
(bounded LRU keyed by the token string) until `exp` (+ leeway, re-checked on the
clock on every hit) or until the key set changes; a repeated token costs ~1-2 us.
The policy that uses it is `framework.auth.policy.AuthPolicy`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from framework.auth.keyset import KeySet
from framework.clock import Clock, SystemClock
from framework.config import expect
from framework.errors import UnauthenticatedError

__all__ = ["JwtConfig", "JwtVerifier", "Principal"]

logger = logging.getLogger(__name__)

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

    @property
    def key(self) -> str:
        """A stable name for records this caller owns (e.g. registry leases).

        A token's issuer and subject (`jwt|<iss>|<sub>`), else the certificate
        identity (`x509|<identity>`); "" for a principal with neither.
        """
        if self.has_token:
            issuer = self.claims.get("iss")
            return f"jwt|{issuer if isinstance(issuer, str) else ''}|{self.subject}"
        return f"x509|{self.identity}" if self.identity else ""

    def __hash__(self) -> int:  # claims (a read-only dict view) are not hashable
        return hash((self.subject, self.scopes, self.identity))


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """What a token must say. `issuer`/`audience` None means that claim is not checked."""

    issuer: str | tuple[str, ...] | None
    audience: str | None
    leeway_s: float = 10.0
    require_exp: bool = True
    cache_size: int = 10_000
    # The `typ` header the issuer puts on its access tokens (e.g. "at+jwt"); None: not checked.
    token_type: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.leeway_s <= 300:
            raise ValueError("leeway_s must be between 0 and 300 seconds")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0 (0 disables the cache)")
        if isinstance(self.issuer, tuple) and not self.issuer:
            raise ValueError("issuer must name at least one trusted issuer, or be None")
        if self.token_type is not None and not self.token_type:
            raise ValueError("token_type must be a media type such as 'at+jwt', or None")

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


MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can show


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (seconds since the epoch): None when absent; rejects anything
    that is not a finite number within 0..MAX_TIMESTAMP."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _rejected("TOKEN_MALFORMED", f"the token's {name!r} claim is not a number")
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= MAX_TIMESTAMP:
        raise _rejected(
            "TOKEN_MALFORMED",
            f"the token's {name!r} claim is not a time between 1970 and 9999",
        )
    return float(value)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads accepts NaN/Infinity otherwise


def _json(data: bytes) -> Any:
    return json.loads(data, parse_constant=_no_constants)


def _media_type(value: str) -> str:
    """RFC 7515 4.1.9: 'application/' may be left out of `typ`; compare case-insensitively."""
    value = value.lower()
    return value[len("application/") :] if value.startswith("application/") else value


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
        expect(
            keys,
            KeySet,
            "JwtVerifier(keys)",
            "a KeySet: wrap the key source, e.g. KeySet(StaticKeys([...])) or "
            "KeySet(JwksFile(path))",
        )
        expect(config, JwtConfig, "JwtVerifier(config)", 'JwtConfig(issuer="...", audience="...")')
        self.keys = keys
        self.config = config
        self._clock = clock or SystemClock()
        self._now_s: Callable[[], float] = (
            time.time if isinstance(self._clock, SystemClock) else self._clock_now_s
        )
        # token -> (principal, expires_at (exp + leeway) or None, key set version)
        self._cache: OrderedDict[str, tuple[Principal, float | None, int]] = OrderedDict()
        self._watcher: asyncio.Task[None] | None = None
        self._users = 0
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
        """Start watching the key source (idempotent; servers sharing a verifier count)."""
        self._users += 1
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="jwt-key-watcher"
            )

    async def close(self) -> None:
        """Stop watching once every `start()` has been matched by a `close()`."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
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
            header = _json(_b64decode(parts[0]))
        except ValueError:
            raise _rejected("TOKEN_MALFORMED", "the token header is not base64url JSON") from None
        if not isinstance(header, dict):
            raise _rejected("TOKEN_MALFORMED", "the token header is not a JSON object")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise _rejected(
                "TOKEN_ALGORITHM_REJECTED", "unsigned tokens (alg 'none') are not accepted"
            )
        if "crit" in header:  # RFC 7515 4.1.11: unknown critical extensions must be refused
            raise _rejected("TOKEN_MALFORMED", "critical header extensions are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _rejected("TOKEN_MALFORMED", "the token's 'kid' header must be a string")
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise _rejected("TOKEN_MALFORMED", "the token's 'typ' header must be a string")
        wanted = self.config.token_type
        if wanted is not None and (typ is None or _media_type(typ) != _media_type(wanted)):
            raise _rejected(
                "TOKEN_WRONG_TYPE",
                f"the token's type {_shown(typ, 32)} is not {wanted!r}: this service accepts "
                "only access tokens of that type",
            )
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
            claims = _json(_b64decode(parts[1]))
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
        exp = _time_claim(claims, "exp")
        expires_at: float | None = None
        if exp is None:
            if config.require_exp:
                raise _rejected(
                    "TOKEN_MALFORMED", "the token has no 'exp' claim; tokens must expire"
                )
        else:
            expires_at = exp + config.leeway_s
            if now >= expires_at:
                raise _rejected(
                    "TOKEN_EXPIRED",
                    f"the token expired at {_iso(exp)} ({now - exp:.0f} s ago); get a new one",
                )
        _time_claim(claims, "iat")  # not used, but must be a sane number when present
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and nbf - config.leeway_s > now:
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
