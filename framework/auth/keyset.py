"""Verification keys for JWTs, selected by `kid`, each pinned to one algorithm.

A `KeySource` says where keys come from (a JWKS JSON file, PEM files, keys
given in code); a `KeySet` holds the current keys with a version number and
reloads them when the source changes, so keys rotate without a restart.

Pinning defeats algorithm confusion: a key loaded as an RSA public key only
ever verifies RS256 (or the `alg` its JWK names), so an HS256 token "signed"
with the public key as an HMAC secret never verifies; HMAC secrets that look
like PEM keys are refused at load time.

    keys = KeySet(JwksFile("/etc/keys/jwks.json"))
    keys = KeySet(PemFiles({"2026-01": "/etc/keys/2026-01.pem"}))
    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", secret)]))
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from framework.clock import Clock, SystemClock
from framework.config import expect

__all__ = [
    "ALGORITHMS",
    "JwksFile",
    "KeySet",
    "KeySource",
    "PemFiles",
    "StaticKeys",
    "VerificationKey",
]

logger = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ALGORITHMS = HMAC_ALGORITHMS | {
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
}
_MIN_HMAC_BYTES = 32
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key: its id, the single algorithm it verifies, and the key material."""

    kid: str
    algorithm: str
    key: Any  # bytes for HMAC, a cryptography public key otherwise
    _prepared: Any = field(default=None, init=False, repr=False, compare=False)
    _verifier: Any = field(default=None, init=False, repr=False, compare=False)

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """Whether `signature` over `signing_input` verifies with this key and its algorithm."""
        return bool(self._verifier.verify(signing_input, self._prepared, signature))

    def __post_init__(self) -> None:
        self._check()
        # prepared once here: pyjwt's per-call key preparation costs more than the HMAC itself
        algorithm = get_default_algorithms()[self.algorithm]
        try:
            prepared = algorithm.prepare_key(self.key)
        except (jwt.InvalidKeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"key {self.kid!r} cannot be used for {self.algorithm}: {error}"
            ) from error
        object.__setattr__(self, "_verifier", algorithm)
        object.__setattr__(self, "_prepared", prepared)

    def _check(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm {self.algorithm!r} of key {self.kid!r} is not supported; "
                f"use one of {sorted(ALGORITHMS)}"
            )
        if self.algorithm in HMAC_ALGORITHMS:
            if not isinstance(self.key, bytes):
                raise ValueError(f"HMAC key {self.kid!r} must be bytes")
            if self.key.lstrip().startswith(b"-----BEGIN") or b"ssh-rsa" in self.key:
                raise ValueError(
                    f"HMAC key {self.kid!r} looks like a PEM/SSH key; an asymmetric key must "
                    "never be used as an HMAC secret (algorithm confusion)"
                )
            if len(self.key) < _MIN_HMAC_BYTES:
                raise ValueError(
                    f"HMAC key {self.kid!r} is {len(self.key)} bytes; use at least "
                    f"{_MIN_HMAC_BYTES} random bytes"
                )
        elif isinstance(self.key, bytes | str):
            raise ValueError(
                f"key {self.kid!r} pinned to {self.algorithm} must be a public key object, "
                "not a secret"
            )

    @classmethod
    def hmac(cls, kid: str, secret: bytes | str, algorithm: str = "HS256") -> VerificationKey:
        if algorithm not in HMAC_ALGORITHMS:
            raise ValueError(f"{algorithm} is not an HMAC algorithm")
        raw = secret.encode() if isinstance(secret, str) else secret
        return cls(kid, algorithm, raw)

    @classmethod
    def public(cls, kid: str, pem: bytes, algorithm: str | None = None) -> VerificationKey:
        """A public key (or a certificate holding one) in PEM; algorithm inferred if None."""
        if b"CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
        return cls(kid, algorithm or _infer_algorithm(kid, key), key)


def _infer_algorithm(kid: str, key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHMS.get(key.curve.name)
        if algorithm:
            return algorithm
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(f"key {kid!r}: cannot tell its algorithm; name it explicitly")


class KeySource(Protocol):
    """Where keys come from. `stamp` is cheap and changes when `load` would differ."""

    def stamp(self) -> object: ...

    def load(self) -> Mapping[str, VerificationKey]: ...


class StaticKeys:
    """Keys given in code; they never change (rotate by deploying)."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        if isinstance(keys, str | bytes | VerificationKey):
            raise TypeError(
                "StaticKeys(keys) must be a list of keys, e.g. "
                '[VerificationKey.hmac("k1", secret)], '
                f"got {type(keys).__name__}"
            )
        keys = list(keys)
        for key in keys:
            expect(
                key, VerificationKey, "StaticKeys(keys) items", 'VerificationKey.hmac("k1", secret)'
            )
        self._keys = {k.kid: k for k in keys}
        if not self._keys:
            raise ValueError("StaticKeys needs at least one key")

    def stamp(self) -> object:
        return 0

    def load(self) -> Mapping[str, VerificationKey]:
        return self._keys


def _file_stamp(path: str) -> tuple[int, int, int]:
    try:
        stat = Path(path).stat()
    except OSError:  # missing or unreadable: a change load() will report
        return (-1, -1, -1)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class JwksFile:
    """A JWKS document (`{"keys": [...]}`) on disk; replace it atomically to rotate.

    Each JWK needs a `kid` (unless the set holds one key); its algorithm is its
    `alg`, else inferred from the key type (RSA -> RS256, EC P-256 -> ES256,
    oct -> HS256).  Private members of a JWK are ignored: only public parts are used.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def stamp(self) -> object:
        return _file_stamp(self.path)

    def load(self) -> Mapping[str, VerificationKey]:
        try:
            document = json.loads(Path(self.path).read_bytes())
        except OSError as error:
            raise ValueError(f"cannot read JWKS file {self.path}: {error.strerror}") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"JWKS file {self.path} is not JSON: {error.msg}") from error
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"JWKS file {self.path} has no 'keys' list")
        keys: dict[str, VerificationKey] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"JWKS file {self.path}: keys[{index}] is not an object")
            kid = str(entry.get("kid", ""))
            if not kid and len(entries) > 1:
                raise ValueError(f"JWKS file {self.path}: keys[{index}] has no 'kid'")
            try:
                jwk = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError) as error:
                raise ValueError(f"JWKS file {self.path}: key {kid!r}: {error}") from error
            material = jwk.key
            if hasattr(material, "public_key") and not isinstance(material, bytes):
                material = material.public_key()  # a private JWK: keep the public half only
            keys[kid] = VerificationKey(kid, jwk.algorithm_name, material)
        return keys


class PemFiles:
    """Public keys (or certificates) in PEM files, by kid: `{kid: path}` or `{kid: (path, alg)}`."""

    def __init__(self, files: Mapping[str, str | tuple[str, str]]) -> None:
        if not files:
            raise ValueError("PemFiles needs at least one {kid: path}")
        self._files: dict[str, tuple[str, str | None]] = {
            kid: (spec, None) if isinstance(spec, str) else (spec[0], spec[1])
            for kid, spec in files.items()
        }

    def stamp(self) -> object:
        return tuple(_file_stamp(path) for path, _ in self._files.values())

    def load(self) -> Mapping[str, VerificationKey]:
        keys: dict[str, VerificationKey] = {}
        for kid, (path, algorithm) in self._files.items():
            try:
                pem = Path(path).read_bytes()
            except OSError as error:
                raise ValueError(
                    f"cannot read key {kid!r} from {path}: {error.strerror}"
                ) from error
            try:
                keys[kid] = VerificationKey.public(kid, pem, algorithm)
            except (ValueError, TypeError, UnsupportedAlgorithm) as error:
                raise ValueError(f"key {kid!r} in {path}: {error}") from error
        return keys


class KeySet:
    """The current keys and their version; reloads from the source when it changes.

    Readers call `get(kid)` (a dict lookup).  `check()` compares the source's
    stamp and reloads on change; a source that fails to load is logged and the
    previous keys stay in use.  `version` increases on every successful change,
    so caches can drop what the old keys vouched for.
    """

    def __init__(
        self, source: KeySource, *, check_interval_s: float = 30.0, clock: Clock | None = None
    ) -> None:
        if not (
            callable(getattr(source, "load", None)) and callable(getattr(source, "stamp", None))
        ):
            raise TypeError(
                "KeySet(source) must be a key source: StaticKeys([...]), JwksFile(path) or "
                f"PemFiles({{kid: path}}), got {type(source).__name__}"
            )
        if check_interval_s <= 0:
            raise ValueError("check_interval_s must be > 0")
        self.source = source
        self.check_interval_s = check_interval_s
        self._clock = clock or SystemClock()
        self._stamp = source.stamp()
        self._keys: Mapping[str, VerificationKey] = dict(source.load())
        self.version = 1
        self._next_check = self._clock.monotonic() + check_interval_s

    def get(self, kid: str | None) -> VerificationKey | None:
        keys = self._keys
        if kid is None:
            # no kid in the token: acceptable only when there is no choice to make
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def reload(self) -> bool:
        """Load now, whatever the stamp says; raises ValueError when the source is broken.

        Returns whether the keys changed.
        """
        stamp = self.source.stamp()
        keys = dict(self.source.load())
        self._stamp = stamp
        self._next_check = self._clock.monotonic() + self.check_interval_s
        if keys == self._keys:
            return False
        self._keys = keys
        self.version += 1
        logger.info("key set reloaded: version %s, kids %s", self.version, sorted(keys))
        return True

    def check(self) -> bool:
        """Reload if the source's stamp changed; errors are logged, old keys kept."""
        self._next_check = self._clock.monotonic() + self.check_interval_s
        if self.source.stamp() == self._stamp:
            return False
        try:
            return self.reload()
        except ValueError as error:
            logger.error("key set changed but cannot be loaded; keeping the previous: %s", error)
            return False

    def check_if_due(self) -> bool:
        """`check()` at most once per `check_interval_s` (for rare paths like unknown kids)."""
        if self._clock.monotonic() < self._next_check:
            return False
        return self.check()
