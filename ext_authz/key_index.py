"""The compiled, immutable view of the policy stream that ext_authz decides from.

``key_index_from_policy`` is pure: it turns the policy client's full resource map
into a ``KeyIndex`` (digest → key, tenant id → tenant, model visibility). The
service builds a new index on every policy version and swaps it in with one
attribute assignment; a compile error propagates so the policy client keeps the
previous index and does not ack the version.

Compiling is CPU work on the event loop, so it reuses the previous index's entry
for every api_key resource that is the very same object (the policy client keeps
unchanged resources across deltas, and never mutates one): a delta costs a dict
pass, not a full rebuild (measured: ~0.8 s vs well under 0.1 s for 100k keys).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tessera.errors import InvalidArgumentError
from tessera.policy.v1 import policy_pb2

DIGEST_BYTES = 32  # HMAC-SHA256
NO_MODELS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    secret_id: str
    tenant_id: str
    revoked: bool
    expire_time_unix: int  # 0 = never
    allowed_models: frozenset[str]  # empty = no key-level restriction


@dataclass(frozen=True, slots=True)
class TenantEntry:
    tenant_id: str
    suspended: bool
    allowed_models: frozenset[str]  # empty = every public model


@dataclass(frozen=True, slots=True)
class KeyIndex:
    version: str = ""
    keys: Mapping[bytes, KeyEntry] = field(default_factory=lambda: MappingProxyType({}))
    tenants: Mapping[str, TenantEntry] = field(default_factory=lambda: MappingProxyType({}))
    public_models: frozenset[str] = frozenset()
    restricted_models: frozenset[str] = frozenset()
    # logical key id -> its most usable secret's entry (for callers with a verified JWT)
    by_key_id: Mapping[str, KeyEntry] = field(default_factory=lambda: MappingProxyType({}))
    # resource key -> (the ApiKey resource it was compiled from, entry, digest); for reuse only
    compiled_keys: Mapping[str, tuple[policy_pb2.Resource, KeyEntry, bytes]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )


EMPTY_INDEX = KeyIndex()


def key_index_from_policy(
    resources: Mapping[str, policy_pb2.Resource],
    *,
    version: str = "",
    previous: KeyIndex = EMPTY_INDEX,
) -> KeyIndex:
    """Compile a complete resource map; raises InvalidArgumentError on an inconsistent one.

    ``previous`` only saves work: the result is the same with or without it.
    """
    reusable = previous.compiled_keys
    compiled: dict[str, tuple[policy_pb2.Resource, KeyEntry, bytes]] = {}
    keys: dict[bytes, KeyEntry] = {}
    tenants: dict[str, TenantEntry] = {}
    public: set[str] = set()
    restricted: set[str] = set()
    for name, resource in resources.items():
        hit = reusable.get(name)
        if hit is None or hit[0] is not resource:
            kind = resource.WhichOneof("kind")
            if kind == "tenant":
                t = resource.tenant
                tenants[t.id] = TenantEntry(
                    tenant_id=t.id, suspended=t.suspended, allowed_models=frozenset(t.allowed_models)
                )
                continue
            if kind == "model":
                (restricted if resource.model.restricted else public).add(resource.model.name)
                continue
            if kind != "api_key":
                continue  # limits are ratelimit's business
            hit = (resource, *_key_entry(name, resource.api_key))
        _, entry, digest = hit
        if digest in keys:
            raise InvalidArgumentError(f"{name}.digest", f"duplicates {keys[digest].secret_id}")
        keys[digest] = entry
        compiled[name] = hit
    by_key_id: dict[str, KeyEntry] = {}
    for entry in keys.values():
        best = by_key_id.get(entry.key_id)
        if best is None or _usability(entry) > _usability(best):
            by_key_id[entry.key_id] = entry
    return KeyIndex(
        version=version,
        keys=MappingProxyType(keys),
        by_key_id=MappingProxyType(by_key_id),
        tenants=MappingProxyType(tenants),
        public_models=frozenset(public),
        restricted_models=frozenset(restricted),
        compiled_keys=MappingProxyType(compiled),
    )


def _usability(entry: KeyEntry) -> tuple[bool, float]:
    """Not revoked first, then the latest expiry (never = infinitely late)."""
    return (not entry.revoked, entry.expire_time_unix or float("inf"))


def _key_entry(name: str, key: policy_pb2.ApiKey) -> tuple[KeyEntry, bytes]:
    if len(key.digest) != DIGEST_BYTES:
        raise InvalidArgumentError(f"{name}.digest", f"must be {DIGEST_BYTES} bytes, got {len(key.digest)}")
    if not key.key_id or not key.tenant_id:
        raise InvalidArgumentError(name, "key_id and tenant_id are required")
    # Per-key memory matters at a million keys: share what repeats. An empty frozenset is not
    # a singleton in CPython (~200 bytes each), tenant ids repeat across keys, and a first
    # secret's id equals its key's id.
    key_id = key.key_id
    entry = KeyEntry(
        key_id=key_id,
        secret_id=key_id if key.id == key_id else key.id,
        tenant_id=sys.intern(key.tenant_id),
        revoked=key.revoked,
        expire_time_unix=key.expire_time_unix,
        allowed_models=frozenset(key.allowed_models) if key.allowed_models else NO_MODELS,
    )
    return entry, bytes(key.digest)
