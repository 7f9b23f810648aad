"""Workload identities (ARCHITECTURE §8): each component holds its own short-lived X.509
certificate, issued by the platform's CA, naming it by a SPIFFE ID in its URI SAN
(``spiffe://tessera.local/ns/<namespace>/<component>[/<node>]``). Internal surfaces
authorise by that ID, never by network position.

Under ``tessera up`` the CA and every certificate live in ``<data-dir>/identity/`` (files 0600,
the directory 0700), created on first start and renewed when half of a certificate's life has
passed; in Kubernetes they come from Secrets (or cert-manager). Only the ``cryptography``
package does cryptography here.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN: Final = "tessera.local"
CA_LIFETIME: Final = dt.timedelta(days=365)
LEAF_LIFETIME: Final = dt.timedelta(hours=24)
CLOCK_SKEW: Final = dt.timedelta(minutes=5)  # certificates are valid from a little before now


def spiffe_id(component: str, namespace: str = "default", node: str = "") -> str:
    """The SPIFFE ID of a component (``envoy`` names its node too)."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/{component}" + (f"/{node}" if node else "")


def server_name(spiffe: str) -> str:
    """The DNS name a certificate for ``spiffe`` also carries, so that a gRPC client (which
    checks names, not URIs) verifies whom it reached: ``spiffe://tessera.local/ns/default/
    ratelimit`` is ``ratelimit.default.tessera.local``."""
    path = spiffe.removeprefix(f"spiffe://{TRUST_DOMAIN}/ns/").split("/")
    namespace, names = path[0], path[1:]
    return ".".join([*reversed(names), namespace, TRUST_DOMAIN])


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """Where one component's identity lives: its certificate and key, and the CA to trust."""

    cert: Path
    key: Path
    ca: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Written whole (a reader sees the old file or the new one), mode 0600 from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip


_CA_USAGE: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


class Authority:
    """The platform CA: created once in ``directory``, then loaded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert_path = directory / "ca.pem"
        key_path = directory / "ca.key"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        if self.cert_path.exists() and key_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                msg = f"{key_path}: not an EC private key"
                raise ValueError(msg)
            self._key = loaded
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = _name("Tessera workload CA")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(self._key))
        _write_private(self.cert_path, self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        spiffe: str,
        *,
        dns_names: tuple[str, ...] = ("localhost",),
        lifetime: dt.timedelta = LEAF_LIFETIME,
        now: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a new leaf for ``spiffe``: client and server use."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or _now()
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe),
            x509.DNSName(server_name(spiffe)),
        ]
        sans += [x509.DNSName(d) for d in dns_names]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(spiffe.rsplit("/", 1)[-1]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + lifetime, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def ensure(self, name: str, spiffe: str, *, now: dt.datetime | None = None) -> IdentityFiles:
        """``name``'s identity files, issued again when missing, for another ID or CA, or past
        half their life (a watcher of the files picks the new ones up without a restart)."""
        files = IdentityFiles(self.directory / f"{name}.pem", self.directory / f"{name}.key", self.cert_path)
        now = now or _now()
        if not _fresh(files.cert, spiffe, self.cert, now):
            cert_pem, key_pem = self.issue(spiffe, now=now)
            _write_private(files.key, key_pem)  # the key first: a cert never names a missing key
            _write_private(files.cert, cert_pem)
        return files


def _fresh(path: Path, spiffe: str, ca: x509.Certificate, now: dt.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.issuer != ca.subject or spiffe_ids(cert) != [spiffe]:
        return False
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now < start + (end - start) / 2


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The SPIFFE IDs a certificate's URI SANs name."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
