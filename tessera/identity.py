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
import ipaddress
import os
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.settings import IdentitySettings

TRUST_DOMAIN: Final = "tessera.local"
CA_LIFETIME: Final = dt.timedelta(days=365)
CA_RENEW_BEFORE: Final = dt.timedelta(days=30)  # a CA this close to expiry is replaced at start
LEAF_LIFETIME: Final = dt.timedelta(hours=24)
CLOCK_SKEW: Final = dt.timedelta(minutes=5)  # certificates are valid from a little before now


def spiffe_id(component: str, namespace: str = "default", node: str = "") -> str:
    """The SPIFFE ID of a component (``envoy`` names its node too)."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/{component}" + (f"/{node}" if node else "")


def envoy_nodes(namespace: str = "default") -> str:
    """The prefix of every Envoy node's SPIFFE ID (an allow-list entry: ``grpc_server.permitted``)."""
    return spiffe_id("envoy", namespace) + "/"


def server_name(spiffe: str) -> str:
    """The DNS name a certificate for ``spiffe`` also carries, so that a gRPC client (which
    checks names, not URIs) verifies whom it reached: ``spiffe://tessera.local/ns/default/
    ratelimit`` is ``ratelimit.default.tessera.local``."""
    namespace, *names = _path(spiffe)
    return ".".join([*reversed(names), namespace, TRUST_DOMAIN])


def _path(spiffe: str) -> list[str]:
    """``[namespace, component, (node)]`` of one of our SPIFFE IDs."""
    return spiffe.removeprefix(f"spiffe://{TRUST_DOMAIN}/ns/").split("/")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Written whole and durably (a reader sees the old file or the new one, a crash leaves
    one of them), mode 0600 from the start: a fresh temp file, never a leftover or a link."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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
    """The platform CA: created in ``directory`` on first use, then loaded; created afresh when
    its files are incomplete, unreadable or within ``CA_RENEW_BEFORE`` of expiry (every leaf is
    then issued again by ``ensure``: it checks the signature, not the issuer's name). Its
    trust is read by the services at start: a new CA takes effect with the next start."""

    def __init__(self, directory: Path, *, now: dt.datetime | None = None) -> None:
        self.directory = directory
        self.cert_path = directory / "ca.pem"
        key_path = directory / "ca.key"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        now = now or _now()
        loaded = _load_ca(key_path, self.cert_path)
        if loaded is not None and loaded[1].not_valid_after_utc - CA_RENEW_BEFORE > now:
            self._key, self.cert = loaded
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"Tessera workload CA {os.urandom(4).hex()}")  # each CA its own name
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
        write_private(key_path, _key_pem(self._key))
        write_private(self.cert_path, self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        spiffe: str,
        *,
        hosts: tuple[str, ...] = ("localhost",),
        lifetime: dt.timedelta = LEAF_LIFETIME,
        now: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a new leaf for ``spiffe`` and ``hosts`` (DNS names or
        IP addresses): client and server use."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or _now()
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe),
            x509.DNSName(server_name(spiffe)),
        ]
        sans += [_host_name(h) for h in hosts]
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

    def ensure(
        self,
        name: str,
        spiffe: str,
        *,
        hosts: tuple[str, ...] = ("localhost",),
        force: bool = False,
        now: dt.datetime | None = None,
    ) -> IdentitySettings:
        """``name``'s identity (its files, as a component is configured with them), issued again
        when missing, for another ID or CA, past half their life, or when ``force``d (a watcher
        of the files picks the new ones up without a restart)."""
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        now = now or _now()
        if force or not _fresh(cert_path, key_path, spiffe, self.cert, now):
            cert_pem, key_pem = self.issue(spiffe, hosts=hosts, now=now)
            write_private(key_path, key_pem)  # the key first: a cert never names a missing key
            write_private(cert_path, cert_pem)
        return IdentitySettings(
            cert_file=cert_path, key_file=key_path, ca_file=self.cert_path, namespace=_path(spiffe)[0]
        )


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _load_ca(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The CA's key and certificate when both are readable and belong together, else None."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        return None
    return key, cert


def _fresh(cert_path: Path, key_path: Path, spiffe: str, ca: x509.Certificate, now: dt.datetime) -> bool:
    """The files hold a certificate for ``spiffe`` signed by ``ca``, its own key beside it, and
    less than half of its life is over."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if spiffe_ids(cert) != [spiffe] or cert.public_key() != key.public_key():
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
