"""Tokens for development and tests: sign a JWT with a key you hold.

    key = SigningKey.from_pem_file("data/keys/user-signing.pem", kid="user-1")
    token = mint_token(key, "alice", ["orders:read"], issuer="...", audience="shop")

`python -m framework token --sub alice --scopes orders:read` does the same from the
command line (see `framework.cli`). There is no built-in secret: the key comes from
a PEM file (EC P-256 -> ES256, RSA -> RS256, Ed25519 -> EdDSA) or an HMAC secret
of at least 32 bytes (HS256) from the environment. Scopes go in the `scope` claim,
space-separated, which `JwtVerifier` reads (it also accepts `scp`/`scopes` lists).
Production tokens come from your identity provider; this is for your machine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from framework.auth.bearer import IssuedToken

__all__ = ["MIN_HMAC_BYTES", "SigningKey", "mint_token"]

MIN_HMAC_BYTES = 32  # what the verifier accepts for HS256 keys


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key (or HMAC secret) with the algorithm it signs with and its `kid`."""

    algorithm: str
    key: Any
    kid: str

    @classmethod
    def hmac(cls, secret: bytes | str, kid: str) -> SigningKey:
        """HS256 with a shared secret (at least 32 bytes, as the verifier requires)."""
        raw = secret.encode() if isinstance(secret, str) else secret
        if not isinstance(raw, bytes):
            raise TypeError(f"secret must be bytes or str, got {type(secret).__name__}")
        if len(raw) < MIN_HMAC_BYTES:
            raise ValueError(
                f"the HMAC secret has {len(raw)} bytes; use at least {MIN_HMAC_BYTES} "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if raw.lstrip().startswith(b"-----BEGIN"):
            raise ValueError("that secret is a PEM key: use SigningKey.from_pem(...) instead")
        return cls("HS256", raw, kid)

    @classmethod
    def from_pem(cls, pem: bytes, kid: str) -> SigningKey:
        """An unencrypted PEM private key; the algorithm follows from its type."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as error:
            raise ValueError(f"not an unencrypted PEM private key: {error}") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algorithms = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
            algorithm = algorithms.get(key.curve.name)
            if algorithm is None:
                raise ValueError(f"EC curve {key.curve.name} has no JWT algorithm")
        elif isinstance(key, rsa.RSAPrivateKey):
            algorithm = "RS256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = "EdDSA"
        else:
            raise ValueError(f"a {type(key).__name__} cannot sign JWTs here")
        return cls(algorithm, key, kid)

    @classmethod
    def from_pem_file(cls, path: str | Path, kid: str) -> SigningKey:
        try:
            pem = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read the signing key {path}: {error.strerror}") from None
        return cls.from_pem(pem, kid)


def mint_token(
    key: SigningKey,
    subject: str,
    scopes: Iterable[str],
    *,
    issuer: str | None = None,
    audience: str | None = None,
    ttl_s: float = 3600.0,
    claims: Mapping[str, object] | None = None,
    now: float | None = None,
) -> IssuedToken:
    """A signed JWT for `subject` holding `scopes` (the `scope` claim), valid `ttl_s`."""
    if not isinstance(key, SigningKey):
        raise TypeError(
            "key must be a framework.auth.devtoken.SigningKey "
            f"(SigningKey.from_pem_file(...) or SigningKey.hmac(...)), got {type(key).__name__}"
        )
    if isinstance(scopes, str):
        raise TypeError("scopes must be a list of scope names, e.g. ['orders:read'], not a str")
    if not subject:
        raise ValueError("subject must name the caller (the `sub` claim)")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    issued = int(time.time() if now is None else now)
    expires = issued + int(ttl_s)
    body: dict[str, object] = dict(claims or {})
    body |= {
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": expires,
        "jti": uuid.uuid4().hex,
        "scope": " ".join(sorted(set(scopes))),
    }
    if issuer:
        body["iss"] = issuer
    if audience:
        body["aud"] = audience
    token = jwt.encode(body, key.key, algorithm=key.algorithm, headers={"kid": key.kid})
    return IssuedToken(token, datetime.fromtimestamp(expires, UTC))
