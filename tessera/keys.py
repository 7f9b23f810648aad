"""API key format, hashing and the pepper. The only place keys are hashed.

A key is ``<kind>_<public id>_<secret>``: ``tsk`` for gateway API keys, ``tadm`` for admin
keys. The public id (12 base32 characters) names the secret for display and lookup; the
secret is 43 url-safe characters (256 bits). Only HMAC-SHA256(pepper, key) is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import ConfigError

API_KEY = "tsk"
ADMIN_KEY = "tadm"
_PUBLIC_ID_LEN = 12
_KEY_RE = re.compile(r"^(tsk|tadm)_([a-z2-7]{12})_([A-Za-z0-9_-]{43})$")
_DISPLAY_SECRET_CHARS = 4
PEPPER_BYTES = 32


@dataclass(frozen=True, slots=True)
class MintedKey:
    public_id: str
    key: str

    @property
    def prefix(self) -> str:
        return display_prefix(self.key)


def new_public_id() -> str:
    raw = base64.b32encode(secrets.token_bytes(10)).decode().lower()
    return raw[:_PUBLIC_ID_LEN]


def mint_key(public_id: str | None = None, *, kind: str = API_KEY) -> MintedKey:
    """A fresh key with 256 bits of randomness."""
    pid = public_id or new_public_id()
    return MintedKey(public_id=pid, key=f"{kind}_{pid}_{secrets.token_urlsafe(32)}")


def parse_public_id(key: str, *, kind: str = API_KEY) -> str | None:
    """The public id of a well-formed key of this kind, else None."""
    m = _KEY_RE.match(key)
    return m.group(2) if m and m.group(1) == kind else None


def display_prefix(key: str) -> str:
    """What may be shown and logged: ``<kind>_<id>_`` plus a few secret characters."""
    kind = key.split("_", 1)[0]
    return key[: len(kind) + 1 + _PUBLIC_ID_LEN + 1 + _DISPLAY_SECRET_CHARS]


def digest(pepper: bytes, key: str) -> bytes:
    return hmac.new(pepper, key.encode(), hashlib.sha256).digest()


def load_pepper(path: Path) -> bytes:
    """Read the pepper; a missing or short pepper is a startup error, never a fallback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"pepper file {path} is unreadable: {exc.strerror}"
        raise ConfigError(msg) from exc
    pepper = data.strip()
    if len(pepper) < PEPPER_BYTES:
        msg = f"pepper file {path} holds {len(pepper)} bytes; at least {PEPPER_BYTES} are required"
        raise ConfigError(msg)
    return pepper


def ensure_pepper(path: Path) -> bytes:
    """Create the pepper once (0600), then always reuse it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(PEPPER_BYTES).encode())
    return load_pepper(path)
