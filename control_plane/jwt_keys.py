"""Signing keys for the gateway's JWTs (OAuth2 client credentials) and their rotation.

A key is published in the JWKS (pushed to Envoy's jwt_authn over ECDS) before it signs,
signs for ``rotate_after``, then stays published until every token it signed has expired.
Private keys are stored encrypted with a key derived from the pepper (Fernet), never in
plain text. ``ensure_keys`` is idempotent and runs at startup and on every refresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
import structlog
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import sealing
from control_plane.admin.convert import aware
from control_plane.db.models import JwtSigningKey
from tessera import keys

ALGORITHM = "ES256"
log = structlog.get_logger("control_plane.jwt")


@dataclass(frozen=True, slots=True)
class JwtPolicy:
    issuer: str
    audience: str
    token_ttl: timedelta
    rotate_after: timedelta
    publish_lead: timedelta  # how long a new key is in the JWKS before it signs


def _fernet(pepper: bytes) -> Fernet:
    return sealing.fernet(pepper, sealing.JWT_SIGNING_KEY)


def _new_key(pepper: bytes, now: datetime) -> JwtSigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kid = keys.new_public_id()
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk |= {"kid": kid, "alg": ALGORITHM, "use": "sig"}
    return JwtSigningKey(
        kid=kid,
        algorithm=ALGORITHM,
        private_pem=_fernet(pepper).encrypt(pem).decode(),
        public_jwk=jwk,
        created_at=now,
    )


async def ensure_keys(s: AsyncSession, pepper: bytes, policy: JwtPolicy, now: datetime) -> None:
    """One active signing key and one published successor; retire and drop on schedule."""
    await s.execute(delete(JwtSigningKey).where(JwtSigningKey.unpublish_at <= now))
    rows = list((await s.scalars(select(JwtSigningKey).order_by(JwtSigningKey.created_at))).all())
    fernet = _fernet(pepper)
    for row in [r for r in rows if not _readable(fernet, r)]:
        # Encrypted under another pepper (a pepper change also voids every API key): replace it.
        log.warning("jwt_signing_key_unreadable", kid=row.kid)
        await s.delete(row)
        rows.remove(row)
    active = [k for k in rows if k.activated_at is not None and k.retired_at is None]
    waiting = [k for k in rows if k.activated_at is None]
    if not waiting:
        nxt = _new_key(pepper, now)
        s.add(nxt)
        waiting = [nxt]
    current = active[-1] if active else None
    due = current is None or (aware(current.activated_at) or now) + policy.rotate_after <= now
    successor = waiting[0]
    # The successor signs only once Envoy has had time to learn it (or when nothing signs).
    if due and (current is None or (aware(successor.created_at) or now) + policy.publish_lead <= now):
        successor.activated_at = now
        for old in active:
            old.retired_at = now
            old.unpublish_at = now + policy.token_ttl + timedelta(seconds=60)
    await s.flush()


def _readable(fernet: Fernet, row: JwtSigningKey) -> bool:
    try:
        fernet.decrypt(row.private_pem.encode())
    except InvalidToken:
        return False
    return True


async def signer(s: AsyncSession, pepper: bytes) -> tuple[str, Any] | None:
    """(kid, private key) of the active signing key, or None before the first ensure_keys."""
    row = await s.scalar(
        select(JwtSigningKey)
        .where(JwtSigningKey.activated_at.is_not(None), JwtSigningKey.retired_at.is_(None))
        .order_by(JwtSigningKey.activated_at.desc())
        .limit(1)
    )
    if row is None:
        return None
    pem = _fernet(pepper).decrypt(row.private_pem.encode())
    return row.kid, serialization.load_pem_private_key(pem, password=None)
