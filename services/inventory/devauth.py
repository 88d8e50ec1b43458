"""Development tokens: one shared HS256 secret that both verifies and mints bearer JWTs.

For local runs and tests only; production verifies tokens from an identity
provider's key set (`framework.auth.keyset.JwksFile`) and never holds a signing key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import jwt

from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.verifier import JwtConfig, JwtVerifier

__all__ = ["DEV_AUDIENCE", "DEV_ISSUER", "DEV_KID", "DevTokens"]

DEV_ISSUER = "inventory-dev"
DEV_AUDIENCE = "inventory"
DEV_KID = "dev"
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key is at least as long as the hash


class DevTokens:
    """Mints and verifies HS256 tokens with `secret` (issuer/audience fixed for dev)."""

    def __init__(self, secret: str) -> None:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes long")
        self._secret = secret

    def verifier(self) -> JwtVerifier:
        keys = KeySet(StaticKeys([VerificationKey.hmac(DEV_KID, self._secret)]))
        return JwtVerifier(keys, JwtConfig(issuer=DEV_ISSUER, audience=DEV_AUDIENCE))

    def mint(self, subject: str, scopes: Iterable[str], *, ttl_s: float = 3600.0) -> str:
        """A signed token for `subject` holding `scopes`, valid for `ttl_s` seconds."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        now = int(time.time())
        claims = {
            "sub": subject,
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "iat": now,
            "exp": now + int(ttl_s),
            "scope": " ".join(scopes),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256", headers={"kid": DEV_KID})
