"""Deterministic, well-formed API keys by index, shared by the policy server and the Check client.

``api_key(i)`` is ``tsk_<12 base32 chars>_<43 url-safe chars>`` like a minted key, so it
passes ext_authz's format check; the policy server publishes HMAC(pepper, key) for each.
"""

from __future__ import annotations

import base64
import hashlib

TENANT_ID = "t-bench"


def public_id(i: int) -> str:
    return base64.b32encode(i.to_bytes(10, "big")).decode().lower()[-12:]


def api_key(i: int) -> str:
    secret = base64.urlsafe_b64encode(hashlib.sha256(b"tessera-bench-%d" % i).digest()).rstrip(b"=")
    return f"tsk_{public_id(i)}_{secret.decode()}"
