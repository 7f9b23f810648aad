"""The authorization decision, as a pure function on plain values.

No I/O, no logging, no Envoy types: headers (lower-case names) and the request's
model go in with the current ``KeyIndex``, the pepper and the time; a ``Decision``
comes out. The servicer turns it into a CheckResponse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ext_authz.key_index import KeyEntry, KeyIndex
from tessera.keys import digest, display_prefix, parse_public_id

SUSPENDED_MESSAGE = "This API key's tenant is suspended."


@dataclass(frozen=True, slots=True)
class Decision:
    """``code`` is "" for an allow, else an error code of ``tessera.client_errors``."""

    code: str = ""
    message: str | None = None  # None: the code's default message
    param: str | None = None
    tenant_id: str = ""
    key_id: str = ""
    key_prefix: str = ""  # display prefix only; never the key
    priority: int = 0  # the tenant's plan priority (allowed decisions only)

    @property
    def allowed(self) -> bool:
        return not self.code


MISSING_KEY = Decision(code="missing_api_key")
MALFORMED_KEY = Decision(code="invalid_api_key")


def credential_from_headers(headers: Mapping[str, str]) -> str:
    """The API key from ``authorization: Bearer <key>`` or ``x-api-key``; "" if none."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = token.strip()
            if token:
                return token
    return (headers.get("x-api-key") or "").strip()


def model_not_found_message(model: str) -> str:
    return f"The model `{model}` does not exist or you do not have access to it."


def decide(
    headers: Mapping[str, str],
    model: str | None,
    index: KeyIndex,
    *,
    pepper: bytes,
    now: float,
    jwt_key_id: str | None = None,
) -> Decision:
    """Who is calling, and may they call ``model`` (None/""/":…" = no model in the request).

    ``jwt_key_id`` is the key id of a JWT Envoy's jwt_authn has already verified (signature,
    issuer, audience, expiry). It is checked against the snapshot like the key it was issued
    for, so revoking the key or suspending the tenant refuses its JWTs within the same second.
    """
    if jwt_key_id:
        entry = index.key_for_id(jwt_key_id)
        if entry is None:
            return Decision(code="invalid_api_key")
        return check_entry(entry, f"jwt:{jwt_key_id}", model, index, now)
    key = credential_from_headers(headers)
    if not key:
        return MISSING_KEY
    if parse_public_id(key) is None:
        # Not ours: log no part of it, it may be someone else's whole secret.
        return MALFORMED_KEY
    prefix = display_prefix(key)
    # A dict hit on the full 32-byte HMAC leaks nothing an attacker can use: they do not
    # know or control the stored digests, so this is as safe as hmac.compare_digest.
    entry = index.key(digest(pepper, key))
    if entry is None:
        return Decision(code="invalid_api_key", key_prefix=prefix)
    return check_entry(entry, prefix, model, index, now)


def check_entry(entry: KeyEntry, prefix: str, model: str | None, index: KeyIndex, now: float) -> Decision:
    """The key's own state, its tenant's, then the model entitlement."""
    tenant_id = entry.tenant_id
    if entry.revoked:
        return Decision(code="api_key_revoked", tenant_id=tenant_id, key_id=entry.key_id, key_prefix=prefix)
    if entry.expire_time_unix and entry.expire_time_unix <= now:
        return Decision(code="api_key_expired", tenant_id=tenant_id, key_id=entry.key_id, key_prefix=prefix)
    tenant = index.tenants.get(tenant_id)
    if tenant is None or tenant.suspended:
        return Decision(
            code="invalid_api_key",
            message=SUSPENDED_MESSAGE if tenant is not None else None,
            tenant_id=tenant_id,
            key_id=entry.key_id,
            key_prefix=prefix,
        )
    if model and not model.startswith(":"):
        tenant_models = tenant.allowed_models
        if (
            (tenant_models and model not in tenant_models)
            or (entry.allowed_models and model not in entry.allowed_models)
            or (model in index.restricted_models and model not in tenant_models)
        ):
            return Decision(
                code="model_not_found",
                message=model_not_found_message(model),
                param="model",
                tenant_id=tenant_id,
                key_id=entry.key_id,
                key_prefix=prefix,
            )
    return Decision(tenant_id=tenant_id, key_id=entry.key_id, key_prefix=prefix, priority=tenant.priority)
