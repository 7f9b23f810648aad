"""Secrets at rest: encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a key derived from the
pepper per purpose, so one provisioned secret protects them all and a leaked database holds no
usable secret. JWT signing keys and upstream credentials are sealed here."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet


def fernet(pepper: bytes, purpose: str) -> Fernet:
    derived = hmac.new(pepper, f"tessera/{purpose}".encode(), hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


UPSTREAM_CREDENTIAL = "upstream-credential-encryption"
JWT_SIGNING_KEY = "jwt-signing-key-encryption"


def seal(pepper: bytes, purpose: str, plaintext: str) -> str:
    return fernet(pepper, purpose).encrypt(plaintext.encode()).decode()


def unseal(pepper: bytes, purpose: str, token: str) -> str:
    """Raises ``cryptography.fernet.InvalidToken`` when sealed with another pepper."""
    return fernet(pepper, purpose).decrypt(token.encode()).decode()
