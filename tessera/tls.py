"""Mutual TLS for the internal surfaces, from a component's identity files: ``ssl`` contexts for
the admission stream, gRPC credentials for the gRPC services, the peer's SPIFFE ID; renewed
certificate files are picked up by new connections (open ones keep theirs)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Gauge

from tessera.identity import server_name, spiffe_id
from tessera.settings import IdentitySettings

log = structlog.get_logger("tessera.tls")

WATCH_SECONDS = 30.0
CERT_EXPIRY = Gauge(
    "tessera_identity_certificate_expiry_timestamp_seconds",
    "When this process's workload certificate expires (the certificate it last loaded)",
    ["identity"],
)


def note_expiry(cert_pem: bytes) -> None:
    """Export the certificate's expiry, labelled by its SPIFFE ID (what alerts watch)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = uris.get_values_for_type(x509.UniformResourceIdentifier)
    except Exception:
        return
    CERT_EXPIRY.labels(names[0] if names else "").set(cert.not_valid_after_utc.timestamp())


def _context(settings: IdentitySettings, purpose: ssl.Purpose) -> ssl.SSLContext:
    cert, key, ca = settings.files
    side = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    note_expiry(cert.read_bytes())
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: a peer without a certificate from our CA is cut
    ctx.check_hostname = False  # peers are named by their SPIFFE ID, checked by the caller
    return ctx


def server_context(settings: IdentitySettings) -> ssl.SSLContext:
    return _context(settings, ssl.Purpose.CLIENT_AUTH)


def client_context(settings: IdentitySettings) -> ssl.SSLContext:
    return _context(settings, ssl.Purpose.SERVER_AUTH)


def peer_spiffe_id(transport: asyncio.BaseTransport) -> str | None:
    """The SPIFFE ID in the verified peer certificate's URI SAN (exactly one), else None."""
    cert: Any = transport.get_extra_info("peercert")
    if not cert:
        return None
    ids = [v for k, v in cert.get("subjectAltName", ()) if k == "URI" and v.startswith("spiffe://")]
    return ids[0] if len(ids) == 1 else None


async def follow_renewals(
    ctx: ssl.SSLContext, settings: IdentitySettings, every: float = WATCH_SECONDS
) -> None:
    """Load the certificate and key again whenever they are renewed (new connections use them)."""
    renewals = Renewals(settings)
    while True:
        await asyncio.sleep(every)
        if renewals.renewed() is None:
            continue
        try:
            ctx.load_cert_chain(*settings.files[:2])
        except (OSError, ssl.SSLError) as exc:  # replaced again meanwhile: the next look takes it
            log.warning("identity_reload_failed", error=str(exc))


class Renewals:
    """Notices this process's certificate being renewed: its files changed and now hold a key
    and a certificate that belong together (not a renewal caught between its two writes)."""

    def __init__(self, settings: IdentitySettings) -> None:
        self._settings = settings
        self._seen = _stamp(settings)

    def renewed(self) -> tuple[bytes, bytes, bytes] | None:
        """The new (key, certificate, CA) once, after a renewal; else None."""
        stamp = _stamp(self._settings)
        if stamp == self._seen:
            return None
        try:
            pem = _pem(self._settings)
        except OSError:
            return None
        if not key_matches(pem[0], pem[1]):
            return None  # mid-renewal: the next look takes it
        self._seen = stamp
        log.info("identity_reloaded", cert=str(self._settings.cert_file))
        return pem


def _stamp(settings: IdentitySettings) -> tuple[float, ...]:
    stamps = []
    for path in (settings.cert_file, settings.key_file):
        if path is not None:
            with contextlib.suppress(OSError):
                stamps.append(path.stat().st_mtime)
    return tuple(stamps)


def _pem(settings: IdentitySettings) -> tuple[bytes, bytes, bytes]:
    """(key, certificate, CA) as bytes."""
    cert, key, ca = settings.files
    pem = key.read_bytes(), cert.read_bytes(), ca.read_bytes()
    note_expiry(pem[1])
    return pem


def key_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    """Whether the key belongs to the certificate (both parse)."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError):
        return False
    return bool(cert.public_key() == key.public_key())


def grpc_server_credentials(settings: IdentitySettings) -> grpc.ServerCredentials:
    """Mutual TLS for a gRPC server: a client certificate from the CA is required. The files are
    read again for new connections once they change (renewal without a restart)."""
    renewals = Renewals(settings)

    def configuration(pem: tuple[bytes, bytes, bytes]) -> Any:
        key, cert, ca = pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> Any:
        pem = renewals.renewed()
        return configuration(pem) if pem is not None else None  # None: keep the current one

    return grpc.dynamic_ssl_server_credentials(
        configuration(_pem(settings)), fetch, require_client_authentication=True
    )


def grpc_channel(target: str, settings: IdentitySettings | None, peer: str) -> grpc.aio.Channel:
    """A channel to ``target``: mutual TLS to the component ``peer`` (checked by the name its
    certificate carries) when ``settings`` name an identity, else plaintext."""
    if settings is None or not settings.enabled:
        return grpc.aio.insecure_channel(target)
    key, cert, ca = _pem(settings)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    name = server_name(spiffe_id(peer, settings.namespace))
    return grpc.aio.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])


class PeerChannel:
    """A gRPC channel to one peer, opened again once this process's certificate is renewed
    (a channel holds the certificate it was opened with)."""

    def __init__(self, target: str, settings: IdentitySettings | None, peer: str) -> None:
        self._args = (target, settings, peer)
        self._renewals = Renewals(settings) if settings is not None and settings.enabled else None
        self._channel = grpc_channel(*self._args)
        self._closing: set[asyncio.Task[None]] = set()

    def get(self) -> grpc.aio.Channel:
        if self._renewals is not None and self._renewals.renewed() is not None:
            old, self._channel = self._channel, grpc_channel(*self._args)
            task = asyncio.get_running_loop().create_task(old.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return self._channel

    async def close(self) -> None:
        await self._channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
