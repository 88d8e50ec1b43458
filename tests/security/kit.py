"""What the attack suite shares: real HS256 tokens from one issuer, and a guarded registry."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.verifier import JwtConfig, JwtVerifier

ISSUER = "https://id.test"
AUDIENCE = "shop"
KID = "k1"


class Issuer:
    """An identity provider for tests: mints tokens, and builds a verifier that trusts it."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(32)

    def verifier(self, **config: Any) -> JwtVerifier:
        keys = KeySet(StaticKeys([VerificationKey.hmac(KID, self.secret)]))
        return JwtVerifier(keys, JwtConfig(issuer=ISSUER, audience=AUDIENCE, **config))

    def token(
        self,
        subject: str,
        scopes: Iterable[str] = (),
        *,
        ttl_s: int = 300,
        headers: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "sub": subject,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + ttl_s,
            "scope": " ".join(scopes),
        }
        body.update(claims)
        return jwt.encode(
            body, self.secret, algorithm="HS256", headers={"kid": KID, **(headers or {})}
        )

    def raw(self, header: Mapping[str, Any], payload_json: str) -> str:
        """A correctly signed token whose claims are exactly `payload_json` (any JSON text)."""
        import base64
        import hashlib
        import hmac
        import json

        def part(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = part(json.dumps({"alg": "HS256", "kid": KID, **header}).encode())
        body = part(payload_json.encode())
        signature = hmac.new(self.secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{part(signature)}"
