"""A development certificate authority: mint a CA, server and client certificates.

For tests and the demo only: keys are ECDSA P-256, kept in memory, and written
to files unencrypted (mode 0600 from creation, see `_write`).  Production
certificates come from your PKI (SPIFFE/SPIRE, cert-manager, Vault);
`framework.auth.tls` reads whatever files they produce.

    ca = DevCA.create("dev CA")
    server = ca.issue(dns=["localhost"], ips=["127.0.0.1"])           # server cert
    client = ca.issue(uris=["spiffe://example.org/ns/dev/sa/orders"])   # workload cert
    ca.write_ca(tmp / "ca.pem")
    server.write(tmp / "server.pem", tmp / "server.key")

Each issued certificate carries the SANs it was given (DNS names, IP addresses,
URIs such as SPIFFE IDs); `framework.auth.tls.peer_identity` reads them back on the
other side of a connection.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCA", "IssuedCert", "write_dev_pki"]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def _write(path: str | os.PathLike[str], data: bytes, *, private: bool = False) -> None:
    """Write atomically (temp file + rename), so a watcher never reads half a file.

    The temporary file has an unpredictable name and is created with
    O_EXCL|O_NOFOLLOW at its final mode (0600 for keys): a symlink or file an
    attacker planted there makes the write fail instead of being followed, and a
    key is never readable by others, not even for a moment.  The rename replaces
    a symlink at `path` itself, never its target.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _CREATE, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        """Write both files atomically (the key with mode 0600)."""
        _write(key_path, self.key_pem, private=True)
        _write(cert_path, self.cert_pem)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


class DevCA:
    """A self-signed CA that issues leaf certificates with chosen SANs."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key

    @classmethod
    def create(cls, common_name: str = "framework dev CA", *, valid_days: int = 30) -> DevCA:
        """A fresh CA (new key) valid for `valid_days`."""
        if valid_days <= 0:
            raise ValueError("valid_days must be > 0")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: str | os.PathLike[str]) -> None:
        """Write the CA certificate (the trust anchor) atomically; the key never leaves."""
        _write(path, self.cert_pem)

    def issue(
        self,
        *,
        common_name: str | None = None,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        valid_days: int = 7,
    ) -> IssuedCert:
        """A leaf certificate usable for both TLS server and client auth.

        Give at least one SAN; `common_name` defaults to the first of them.  A
        `common_name` alone makes a certificate without SANs (legacy; for testing
        that peers do not take the CN as an identity).
        """
        if not (dns or ips or uris or common_name):
            raise ValueError("give at least one SAN: dns=, ips= or uris=")
        if valid_days <= 0:
            raise ValueError("valid_days must be > 0")
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        cn = common_name or (list(dns) + list(ips) + list(uris))[0]
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = (
            builder.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_dev_pki(
    directory: str | os.PathLike[str],
    *,
    server_dns: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1",),
    clients: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write a CA, a server pair and one pair per client into `directory`.

    `clients` maps a file stem to the client's identity URI, e.g.
    `{"orders": "spiffe://dev.local/ns/dev/sa/orders"}`.  Returns the paths by
    name: "ca", "server.pem", "server.key", "<stem>.pem", "<stem>.key".
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca = DevCA.create()
    paths = {"ca": root / "ca.pem"}
    ca.write_ca(paths["ca"])
    pairs = {"server": ca.issue(dns=server_dns, ips=server_ips)}
    for stem, uri in (clients or {}).items():
        if stem in ("ca", "server") or "/" in stem:
            raise ValueError(f"client file stem {stem!r} is reserved or not a plain name")
        pairs[stem] = ca.issue(uris=[uri])
    for stem, issued in pairs.items():
        paths[f"{stem}.pem"], paths[f"{stem}.key"] = root / f"{stem}.pem", root / f"{stem}.key"
        issued.write(paths[f"{stem}.pem"], paths[f"{stem}.key"])
    return paths
