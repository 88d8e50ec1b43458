"""Signing keys and tokens of a system: who may mint what.

Two ES256 key pairs, each private key held by one party only:

* `user-signing.pem`: the identity service (`services/user`) signs customers'
  access tokens with it (issuer `USER_ISSUER`);
* `platform-signing.pem`: the supervisor (`python -m framework up`) signs each
  process's workload token and the operator's token (issuer `PLATFORM_ISSUER`), and
  rewrites them before they expire, the way Kubernetes projects service-account
  tokens into a file.

Every verifier reads `jwks.json` (both public keys, by `kid`; rotate by replacing the
file, `framework.auth.keyset.JwksFile` reloads it).  `ensure_dev_keys` creates what
is missing in a directory (private keys mode 0600, created exclusively), loudly:
those keys are for development; production points the environment at keys from a
secret store.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from framework.auth.bearer import IssuedToken

__all__ = [
    "PLATFORM_ISSUER",
    "PLATFORM_KID",
    "USER_ISSUER",
    "USER_KID",
    "KeyFiles",
    "TokenFile",
    "TokenSigner",
    "ensure_dev_keys",
    "token_expiry",
]

logger = logging.getLogger(__name__)

USER_ISSUER = "microframework-user"
PLATFORM_ISSUER = "microframework-platform"
USER_KID = "user-1"
PLATFORM_KID = "platform-1"


@dataclass(frozen=True, slots=True)
class KeyFiles:
    """Where a system's keys live."""

    directory: Path

    @property
    def jwks(self) -> Path:
        return self.directory / "jwks.json"

    @property
    def user_signing(self) -> Path:
        return self.directory / "user-signing.pem"

    @property
    def platform_signing(self) -> Path:
        return self.directory / "platform-signing.pem"


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600, refusing to follow or replace anything there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _b64(number: int) -> str:
    raw = number.to_bytes(32, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwk(kid: str, private: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = private.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ES256",
        "use": "sig",
        "kid": kid,
        "x": _b64(numbers.x),
        "y": _b64(numbers.y),
    }


def _load_or_create(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem)
    return key, True


def ensure_dev_keys(directory: Path) -> KeyFiles:
    """Create missing development keys (and the JWKS of their public halves) in `directory`."""
    files = KeyFiles(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    user, made_user = _load_or_create(files.user_signing)
    platform, made_platform = _load_or_create(files.platform_signing)
    if made_user or made_platform or not files.jwks.exists():
        document = {"keys": [_jwk(USER_KID, user), _jwk(PLATFORM_KID, platform)]}
        temporary = directory / f".jwks-{uuid.uuid4().hex}.json"
        temporary.write_text(json.dumps(document, indent=2))
        temporary.replace(files.jwks)
        logger.warning(
            "DEVELOPMENT signing keys created in %s: fine on this machine, never for production",
            directory,
        )
    return files


class TokenSigner:
    """Mints ES256 JWTs with one private key (issuer and audience fixed)."""

    def __init__(self, private_key_pem: bytes, *, kid: str, issuer: str, audience: str) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the signing key must be an EC (P-256) private key")
        self._key = key
        self.kid = kid
        self.issuer = issuer
        self.audience = audience

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: str) -> TokenSigner:
        return cls(Path(path).read_bytes(), **kwargs)

    def mint(
        self,
        subject: str,
        scopes: Iterable[str],
        *,
        ttl_s: float,
        now: float | None = None,
        claims: Mapping[str, object] | None = None,
    ) -> IssuedToken:
        """A signed token for `subject` holding `scopes`, valid `ttl_s` seconds from `now`.

        `claims` adds claims (e.g. `services`: the names a workload may register);
        it cannot replace the standard ones.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        issued = int(time.time() if now is None else now)
        expires = issued + int(ttl_s)
        body: dict[str, object] = {**(claims or {})}
        body |= {
            "sub": subject,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "jti": uuid.uuid4().hex,
            "scope": " ".join(sorted(set(scopes))),
        }
        token = jwt.encode(body, self._key, algorithm="ES256", headers={"kid": self.kid})
        return IssuedToken(token, datetime.fromtimestamp(expires, UTC))


def token_expiry(token: str) -> datetime | None:
    """The `exp` of a token this process holds (its own token: read, not verified)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return datetime.fromtimestamp(exp, UTC)
    return None


class TokenFile:
    """A token kept in a file (mode 0600), written atomically, read by its process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def write(self, token: IssuedToken) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        _write_private(temporary, token.token.encode())
        temporary.replace(self.path)

    def read(self) -> IssuedToken:
        """The current token; `ValueError` when the file is missing or empty."""
        try:
            token = self.path.read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read the token file {self.path}: {error.strerror}") from error
        if not token:
            raise ValueError(f"the token file {self.path} is empty")
        return IssuedToken(token, token_expiry(token))

    async def provide(self) -> IssuedToken:
        """`BearerToken(provider=token_file.provide)`: re-read on every refresh."""
        return self.read()
