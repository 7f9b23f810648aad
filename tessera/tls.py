"""Mutual TLS for the internal surfaces that are not gRPC (the admission stream): contexts
from a component's identity files, the peer's SPIFFE ID, and certificate files followed as they
are renewed (new connections use the new ones; open ones keep theirs)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import structlog

from tessera.settings import IdentitySettings

log = structlog.get_logger("tessera.tls")

WATCH_SECONDS = 30.0


def _context(settings: IdentitySettings, purpose: ssl.Purpose) -> ssl.SSLContext:
    if settings.cert_file is None or settings.key_file is None or settings.ca_file is None:
        msg = "an identity needs its certificate, key and CA files"
        raise ValueError(msg)
    side = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(settings.cert_file, settings.key_file)
    ctx.load_verify_locations(cafile=settings.ca_file)
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
    """Load the certificate and key again whenever their files change (renewed in place)."""
    seen = _stamp(settings)
    while True:
        await asyncio.sleep(every)
        stamp = _stamp(settings)
        if stamp == seen:
            continue
        try:
            ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as exc:  # mid-write: the next look takes it
            log.warning("identity_reload_failed", error=str(exc))
            continue
        seen = stamp
        log.info("identity_reloaded", cert=str(settings.cert_file))


def _stamp(settings: IdentitySettings) -> tuple[float, ...]:
    stamps = []
    for path in (settings.cert_file, settings.key_file):
        if path is not None:
            with contextlib.suppress(OSError):
                stamps.append(path.stat().st_mtime)
    return tuple(stamps)
