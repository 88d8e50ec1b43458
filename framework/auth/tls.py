"""Transport security: TLS and mutual TLS credentials built from files, reloaded when replaced.

Server side::

    creds = server_credentials(ServerTls(cert_file="server.pem", key_file="server.key",
                                         client_ca_file="ca.pem"))   # CA given: mTLS required
    server = Server(config, policies=[...], credentials=creds)

The credentials are `grpc.dynamic_ssl_server_credentials`: at the start of each
TLS handshake gRPC asks a `CertificateFiles` fetcher whether the configuration
changed; it compares the files' modification times (at most every
`check_interval_s`) and, when a file was replaced, hands gRPC the new
certificate, key and client CA.  Existing connections keep their session; new
connections see the new certificate, without a restart.  Replace files
atomically (write a temp file, then rename), as cert-manager and SPIRE do; a
half-written pair fails to load, is logged, and the previous pair stays in use.

Client side::

    creds = channel_credentials(ClientTls(ca_file="ca.pem", cert_file="c.pem", key_file="c.key"))
    channel = connect("localhost:50051", credentials=creds)

Channel credentials are read once per channel (gRPC fixes them at creation):
build a new channel to pick up a rotated client certificate.

Workload identity: with mTLS the server has the peer certificate.
`peer_identity(context)` parses it and returns its URI SAN: the SPIFFE ID (the
one `spiffe://` URI SAN), else the certificate's only URI SAN, else None.  Other
name kinds never count: a DNS SAN or a subject CN spelled `spiffe://...` is not
a SPIFFE ID (a CA that issues DNS names for one team would otherwise mint
identities of another).  None, too, on plaintext, without a client certificate,
and for certificates with several SPIFFE IDs (ambiguous).
`framework.auth.policy.AuthPolicy` puts it in the principal and can allow methods
per identity (`allowed_identities=`); `PeerIdentity` caches the parse per
certificate.

Plaintext stays available for local development; `is_loopback(host)` tells the
server whether binding plaintext to `host` deserves a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = [
    "CertificateFiles",
    "ClientTls",
    "PeerIdentity",
    "ServerTls",
    "channel_credentials",
    "is_loopback",
    "peer_identity",
    "server_credentials",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerTls:
    """Server certificate files; a `client_ca_file` turns on client verification (mTLS).

    `require_client_cert` defaults to True when a client CA is given: a client
    without a certificate signed by that CA fails the handshake.
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    require_client_cert: bool | None = None
    check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.cert_file:
            raise ValueError("cert_file must name the server certificate (PEM) file")
        if not self.key_file:
            raise ValueError("key_file must name the server private key (PEM) file")
        if self.check_interval_s < 0:
            raise ValueError("check_interval_s must be >= 0")
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError(
                "require_client_cert needs client_ca_file: the CA that signs client certificates"
            )

    @property
    def mutual(self) -> bool:
        if self.require_client_cert is None:
            return self.client_ca_file is not None
        return self.require_client_cert


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What a client trusts (`ca_file`; None = system roots) and, for mTLS, its own pair."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate, or none")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from error


def _mtime(path: str | None) -> int:
    if path is None:
        return 0
    try:
        stat = Path(path).stat()
    except OSError:  # missing or unreadable: load() will say which
        return -1
    return stat.st_mtime_ns ^ (stat.st_ino << 1) ^ (stat.st_size << 32)


class CertificateFiles:
    """The certificate configuration fetcher behind `server_credentials`.

    gRPC calls it (from its own threads) at the start of handshakes; it returns
    None when nothing changed, else a fresh `grpc.ssl_server_certificate_configuration`.
    """

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self.loads = 0  # how many times the files were (re)loaded; for tests and metrics

    def _stamp_now(self) -> tuple[int, int, int]:
        return (
            _mtime(self.tls.cert_file),
            _mtime(self.tls.key_file),
            _mtime(self.tls.client_ca_file),
        )

    def load(self) -> Any:
        """Read the files now and return the configuration (raises ValueError when unreadable)."""
        stamp = self._stamp_now()
        key, cert = _read(self.tls.key_file), _read(self.tls.cert_file)
        roots = _read(self.tls.client_ca_file) if self.tls.client_ca_file else None
        _check_pair(cert, key, roots, self.tls)
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)
        with self._lock:
            self._stamp = stamp
            self.loads += 1
        return config

    def __call__(self) -> Any:
        now = time.monotonic()
        with self._lock:
            if now < self._next_check:
                return None
            self._next_check = now + self.tls.check_interval_s
            previous = self._stamp
        if self._stamp_now() == previous:
            return None
        try:
            config = self.load()
        except ValueError as error:
            logger.error("TLS files changed but cannot be loaded; keeping the previous: %s", error)
            return None
        logger.info("TLS certificate reloaded from %s", self.tls.cert_file)
        return config


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _check_pair(cert: bytes, key: bytes, roots: bytes | None, tls: ServerTls) -> None:
    """Refuse what gRPC would accept and then fail every handshake with.

    Certificate and key are two files replaced one after the other: between the
    two writes they do not match, and that pair must not be installed.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert)
        private = serialization.load_pem_private_key(key, password=None)
        if roots is not None:
            x509.load_pem_x509_certificates(roots)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{tls.cert_file} / {tls.key_file} / {tls.client_ca_file}: not usable PEM ({error})"
        ) from None
    if _spki(chain[0].public_key()) != _spki(private.public_key()):
        raise ValueError(
            f"the key in {tls.key_file} does not match the certificate {tls.cert_file}"
        )


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Server credentials that follow the files (TLS, or mTLS when a client CA is given)."""
    fetcher = CertificateFiles(tls)
    initial = fetcher.load()
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=tls.mutual
    )


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Channel credentials read from the files now (one channel keeps them for its life)."""
    roots = _read(tls.ca_file) if tls.ca_file else None
    key = _read(tls.key_file) if tls.key_file else None
    cert = _read(tls.cert_file) if tls.cert_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=cert
    )


def certificate_identity(pem: bytes) -> str | None:
    """The workload identity a PEM certificate carries in its URI SANs (see module doc)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.lower().startswith("spiffe://")]
    if spiffe:
        return spiffe[0] if len(spiffe) == 1 else None
    return uris[0] if len(uris) == 1 else None


def _peer_pem(context: Any) -> bytes | None:
    if not context.peer_identities():  # plaintext, or no client certificate: cheap answer
        return None
    pems = context.auth_context().get("x509_pem_cert")
    return bytes(pems[0]) if pems else None


def peer_identity(context: Any) -> str | None:
    """The verified peer certificate's URI SAN identity (SPIFFE ID), or None.

    `context` is a grpc (aio) ServicerContext.  Parses the certificate on every
    call; servers use a `PeerIdentity` (AuthPolicy does), which caches it.
    """
    pem = _peer_pem(context)
    return None if pem is None else certificate_identity(pem)


class PeerIdentity:
    """`peer_identity` with the parse cached per certificate (bounded; ~2 us a hit)."""

    __slots__ = ("_known", "max_entries")

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._known: dict[bytes, str | None] = {}

    def __call__(self, context: Any) -> str | None:
        pem = _peer_pem(context)
        if pem is None:
            return None
        try:
            return self._known[pem]
        except KeyError:
            pass
        identity = certificate_identity(pem)
        if len(self._known) >= self.max_entries:
            self._known.clear()
        self._known[pem] = identity
        return identity


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to bind) only accepts connections from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "0.0.0.0" parses; names such as "example.org" are exposed
