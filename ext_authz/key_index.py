"""The compiled, immutable view of the policy stream that ext_authz decides from.

``key_index_from_policy`` is pure: it applies one policy version (a full snapshot or a
delta) to the previous ``KeyIndex`` and returns a new one; the service swaps it in with
one attribute assignment. A compile error propagates, so the policy client keeps the
previous index and does not ack the version.

Memory is the design constraint (a million keys must fit a few hundred MB per worker),
so keys are not Python objects per key. A full snapshot compiles into a ``_KeyTable``:
columns in ``array``/``bytes``/``str`` blobs, rows sorted by the digest's first 8 bytes
and found with ``bisect`` (about 130 bytes per key, and nothing the garbage collector has
to walk). Deltas go to a small overlay (digest → entry, or None for a deleted key) that
is consulted first; once the overlay holds ``COMPACT_AT`` keys the table is rebuilt from
both. A ``KeyEntry`` is built only for the key a Check asks about.
"""

from __future__ import annotations

import operator
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from types import MappingProxyType
from typing import Final, TypeVar

from tessera.errors import InvalidArgumentError
from tessera.policy.v1 import policy_pb2

DIGEST_BYTES: Final = 32  # HMAC-SHA256
COMPACT_AT: Final = 50_000  # overlay keys before the table is rebuilt
NO_MODELS: frozenset[str] = frozenset()
_ABSENT: Final = object()
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    tenant_id: str
    revoked: bool
    expire_time_unix: int  # 0 = never
    allowed_models: frozenset[str]  # empty = no key-level restriction


@dataclass(frozen=True, slots=True)
class ModelTokens:
    """A model's completion tokens: written into a body that names none, and the most a request
    may ask for (0 = the platform's, ``ext_authz.request_facts``)."""

    default: int = 0
    cap: int = 0


@dataclass(frozen=True, slots=True)
class LimitScope:
    """What ext_authz needs of a limit (ratelimit owns its semantics and counters): whom it
    applies to (key "" / model "" = any), and what to do when the counters cannot answer."""

    limit_id: str
    tenant_id: str
    key_id: str
    model: str
    fail_closed: bool
    shadow: bool

    def applies(self, key_id: str, model: str) -> bool:
        return (not self.key_id or self.key_id == key_id) and (not self.model or self.model == model)


@dataclass(frozen=True, slots=True)
class TenantEntry:
    tenant_id: str
    suspended: bool
    allowed_models: frozenset[str]  # empty = every public model
    priority: int = 0  # the plan's scheduling priority, passed to the backend as a hint


def _prefix(d: bytes) -> int:
    """The digest's first 8 bytes as a signed int (native byte order, as ``_build_table`` reads them)."""
    return int.from_bytes(d[:8], sys.byteorder, signed=True)


@dataclass(frozen=True, slots=True, eq=False)
class _KeyTable:
    """Immutable columns, one row per key, sorted by ``_prefix(digest)``."""

    prefixes: array[int]  # 'q', sorted
    digests: bytes  # DIGEST_BYTES per row
    key_ids: str  # concatenated; row r is key_ids[ends[r-1]:ends[r]]
    key_id_ends: array[int]  # 'I'
    tenant_of: array[int]  # 'I', index into tenant_ids
    tenant_ids: tuple[str, ...]
    expires: array[int]  # 'q'
    revoked: bytes  # 0/1 per row
    models: Mapping[int, frozenset[str]]  # sparse: rows with a key-level allow-list
    id_hashes: array[int]  # 'q', sorted hash(key_id)
    id_rows: array[int]  # 'I', the row of each id_hashes entry

    def __len__(self) -> int:
        return len(self.prefixes)

    def find(self, d: bytes) -> int:
        """The row holding digest ``d``, or -1."""
        prefixes = self.prefixes
        p = _prefix(d)
        i = bisect_left(prefixes, p)
        n = len(prefixes)
        while i < n and prefixes[i] == p:
            if self.digests[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES] == d:
                return i
            i += 1
        return -1

    def digest(self, row: int) -> bytes:
        return self.digests[row * DIGEST_BYTES : (row + 1) * DIGEST_BYTES]

    def key_id(self, row: int) -> str:
        return self.key_ids[self.key_id_ends[row - 1] if row else 0 : self.key_id_ends[row]]

    def entry(self, row: int) -> KeyEntry:
        return KeyEntry(
            key_id=self.key_id(row),
            tenant_id=self.tenant_ids[self.tenant_of[row]],
            revoked=bool(self.revoked[row]),
            expire_time_unix=self.expires[row],
            allowed_models=self.models.get(row, NO_MODELS),
        )

    def rows_for_key_id(self, key_id: str) -> list[int]:
        hashes = self.id_hashes
        h = hash(key_id)
        i = bisect_left(hashes, h)
        rows = []
        while i < len(hashes) and hashes[i] == h:
            row = self.id_rows[i]
            if self.key_id(row) == key_id:
                rows.append(row)
            i += 1
        return rows


class _Columns:
    """A table being built: one list per column, one position per key, in arrival order."""

    __slots__ = ("digests", "expires", "key_ids", "models", "revoked", "tenant_ids")

    def __init__(self) -> None:
        self.digests: list[bytes] = []
        self.key_ids: list[str] = []
        self.tenant_ids: list[str] = []
        self.expires: list[int] = []
        self.revoked: list[bool] = []
        self.models: dict[int, frozenset[str]] = {}  # sparse

    def add_proto(self, key: policy_pb2.ApiKey) -> None:
        d, key_id, tenant_id = key.digest, key.key_id, key.tenant_id
        _check_key(key, d, key_id, tenant_id)
        self._add(d, key_id, tenant_id, key.expire_time_unix, key.revoked)
        if key.allowed_models:
            self.models[len(self.digests) - 1] = frozenset(key.allowed_models)

    def add_entry(self, d: bytes, e: KeyEntry) -> None:
        self._add(d, e.key_id, e.tenant_id, e.expire_time_unix, e.revoked)
        if e.allowed_models:
            self.models[len(self.digests) - 1] = e.allowed_models

    def _add(self, d: bytes, key_id: str, tenant_id: str, expires: int, revoked: bool) -> None:
        self.digests.append(d)
        self.key_ids.append(key_id)
        self.tenant_ids.append(tenant_id)
        self.expires.append(expires)
        self.revoked.append(revoked)


def _build_table(columns: _Columns) -> _KeyTable:
    """Sort the columns by digest prefix into a table. Whole-column operations, not a
    Python loop per key: this runs on every full snapshot."""
    digests, key_ids, models = columns.digests, columns.key_ids, columns.models
    blob = b"".join(digests)
    prefixes = memoryview(blob).cast("q")[:: DIGEST_BYTES // 8].tolist()
    order = sorted(range(len(digests)), key=prefixes.__getitem__)
    prefixes = [prefixes[i] for i in order]
    if any(map(operator.eq, prefixes, islice(prefixes, 1, None))) and len(set(digests)) != len(digests):
        raise InvalidArgumentError("api_key.digest", "two keys have the same digest")
    key_ids = [key_ids[i] for i in order]
    tenant_ids = list(_reordered(columns.tenant_ids, order))
    tenant_index = {t: n for n, t in enumerate(dict.fromkeys(tenant_ids))}
    row_models: dict[int, frozenset[str]] = {}
    if models:
        row_of = {i: row for row, i in enumerate(order) if i in models}
        row_models = {row_of[i]: m for i, m in models.items()}
    id_hashes = list(map(hash, key_ids))
    id_order = sorted(range(len(order)), key=id_hashes.__getitem__)
    return _KeyTable(
        prefixes=array("q", prefixes),
        digests=b"".join([digests[i] for i in order]),
        key_ids="".join(key_ids),
        key_id_ends=array("I", accumulate(map(len, key_ids))),
        tenant_of=array("I", map(tenant_index.__getitem__, tenant_ids)),
        tenant_ids=tuple(tenant_index),
        expires=array("q", _reordered(columns.expires, order)),
        revoked=bytes(_reordered(columns.revoked, order)),
        models=MappingProxyType(row_models),
        id_hashes=array("q", [id_hashes[r] for r in id_order]),
        id_rows=array("I", id_order),
    )


def _reordered(column: Sequence[_T], order: list[int]) -> Sequence[_T]:
    """``column`` in ``order``; a column of one repeated value (one tenant, no expiries) is
    not shuffled at all."""
    if not column or column.count(column[0]) == len(column):  # one C-level pass
        return column
    return [column[i] for i in order]


_EMPTY_TABLE = _build_table(_Columns())


@dataclass(frozen=True, slots=True)
class KeyIndex:
    version: str = ""
    tenants: Mapping[str, TenantEntry] = field(default_factory=lambda: MappingProxyType({}))
    public_models: frozenset[str] = frozenset()
    restricted_models: frozenset[str] = frozenset()
    models: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    model_tokens: Mapping[str, ModelTokens] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    limits: Mapping[str, LimitScope] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    """limit id -> scope"""
    tenant_limits: Mapping[str, tuple[LimitScope, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    _table: _KeyTable = field(default=_EMPTY_TABLE, repr=False)
    # digest -> entry (None: deleted) for keys changed since the table was built
    _overlay: Mapping[bytes, KeyEntry | None] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    # key id -> the overlay digests carrying it
    _overlay_ids: Mapping[str, tuple[bytes, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )

    def __len__(self) -> int:
        """The number of keys."""
        t = self._table
        return len(t) + sum((e is not None) - (t.find(d) >= 0) for d, e in self._overlay.items())

    def key(self, d: bytes) -> KeyEntry | None:
        """The key whose HMAC digest is ``d``."""
        hit = self._overlay.get(d, _ABSENT)
        if hit is not _ABSENT:
            return hit  # type: ignore[return-value]
        row = self._table.find(d)
        return None if row < 0 else self._table.entry(row)

    def key_for_id(self, key_id: str) -> KeyEntry | None:
        """The most usable secret of logical key ``key_id`` (for a caller with a verified JWT):
        not revoked first, then the latest expiry."""
        t = self._table
        candidates = [t.entry(r) for r in t.rows_for_key_id(key_id) if t.digest(r) not in self._overlay]
        for d in self._overlay_ids.get(key_id, ()):
            e = self._overlay[d]
            if e is not None:
                candidates.append(e)
        return max(candidates, key=_usability, default=None)

    def limits_for(self, tenant_id: str, key_id: str, model: str) -> tuple[LimitScope, ...]:
        """The limits that apply to this caller and model (none: no admission to make)."""
        scopes = self.tenant_limits.get(tenant_id)
        if not scopes:
            return ()
        return tuple(s for s in scopes if s.applies(key_id, model))


EMPTY_INDEX = KeyIndex()


def _usability(entry: KeyEntry) -> tuple[bool, float]:
    return (not entry.revoked, entry.expire_time_unix or float("inf"))


def key_index_from_policy(
    upserts: Iterable[policy_pb2.Resource],
    deletes: Iterable[str] = (),
    *,
    version: str = "",
    previous: KeyIndex | None = None,
) -> KeyIndex:
    """Apply one policy version. ``previous=None`` means a full snapshot (reset); otherwise
    ``upserts``/``deletes`` are a delta on ``previous``. Raises InvalidArgumentError on an
    inconsistent version."""
    base = EMPTY_INDEX if previous is None else previous  # an index with no keys is falsy
    tenants = {} if previous is None else dict(base.tenants)
    models = {} if previous is None else dict(base.models)
    tokens = {} if previous is None else dict(base.model_tokens)
    limits = {} if previous is None else dict(base.limits)
    changed: dict[bytes, KeyEntry | None] = {}
    columns = _Columns() if previous is None else None
    _apply_deletes(deletes, changed, tenants, models, tokens, limits)
    _apply_upserts(upserts, tenants, models, tokens, limits, columns=columns, changed=changed)
    if columns is not None:
        table = _build_table(columns)
        del columns
        overlay: dict[bytes, KeyEntry | None] = {}
    else:
        table = base._table  # noqa: SLF001 - same class
        overlay = {**base._overlay, **changed}  # noqa: SLF001
        if len(overlay) >= COMPACT_AT:
            table = _build_table(_merged(table, overlay))
            overlay = {}
    overlay_ids: dict[str, list[bytes]] = {}
    for d, e in overlay.items():
        if e is not None:
            overlay_ids.setdefault(e.key_id, []).append(d)
    return KeyIndex(
        version=version,
        tenants=MappingProxyType(tenants),
        public_models=frozenset(m for m, restricted in models.items() if not restricted),
        restricted_models=frozenset(m for m, restricted in models.items() if restricted),
        models=MappingProxyType(models),
        model_tokens=MappingProxyType(tokens),
        limits=MappingProxyType(limits),
        tenant_limits=MappingProxyType(_by_tenant(limits.values())),
        _table=table,
        _overlay=MappingProxyType(overlay),
        _overlay_ids=MappingProxyType({k: tuple(v) for k, v in overlay_ids.items()}),
    )


def _by_tenant(limits: Iterable[LimitScope]) -> dict[str, tuple[LimitScope, ...]]:
    grouped: dict[str, list[LimitScope]] = {}
    for scope in limits:
        grouped.setdefault(scope.tenant_id, []).append(scope)
    return {tenant: tuple(scopes) for tenant, scopes in grouped.items()}


def _apply_deletes(  # noqa: PLR0917 - one map per resource kind
    deletes: Iterable[str],
    keys: dict[bytes, KeyEntry | None],
    tenants: dict[str, TenantEntry],
    models: dict[str, bool],
    tokens: dict[str, ModelTokens],
    limits: dict[str, LimitScope],
) -> None:
    for name in deletes:
        kind, _, ident = name.partition("/")
        if kind == "api_key":
            keys[_digest_of_name(name, ident)] = None
        elif kind == "tenant":
            tenants.pop(ident, None)
        elif kind == "model":
            models.pop(ident, None)
            tokens.pop(ident, None)
        elif kind == "limit":
            limits.pop(ident, None)


def _apply_upserts(
    upserts: Iterable[policy_pb2.Resource],
    tenants: dict[str, TenantEntry],
    models: dict[str, bool],
    tokens: dict[str, ModelTokens],
    limits: dict[str, LimitScope],
    *,
    columns: _Columns | None,
    changed: dict[bytes, KeyEntry | None],
) -> None:
    """Tenants and models into their maps; API keys into ``columns`` (a full snapshot) or
    ``changed`` (a delta). No resource object is kept (see ``PolicyUpdate``)."""
    for resource in upserts:
        kind = resource.WhichOneof("kind")
        if kind == "api_key":
            if columns is not None:
                columns.add_proto(resource.api_key)
            else:
                d, entry = _key_entry(resource.api_key)
                changed[d] = entry
        elif kind == "tenant":
            t = resource.tenant
            tenants[t.id] = TenantEntry(
                tenant_id=t.id,
                suspended=t.suspended,
                allowed_models=frozenset(t.allowed_models),
                priority=t.priority,
            )
        elif kind == "model":
            m = resource.model
            models[m.name] = m.restricted
            tokens[m.name] = ModelTokens(default=m.default_max_tokens, cap=m.max_max_tokens)
        elif kind == "limit":
            lim = resource.limit
            limits[lim.id] = LimitScope(
                limit_id=lim.id,
                tenant_id=lim.tenant_id,
                key_id=lim.key_id,
                model=lim.model,
                fail_closed=lim.fail_closed,
                shadow=lim.shadow,
            )


def _merged(table: _KeyTable, overlay: Mapping[bytes, KeyEntry | None]) -> _Columns:
    columns = _Columns()
    for row in range(len(table)):
        d = table.digest(row)
        if d not in overlay:
            columns.add_entry(d, table.entry(row))
    for d, e in overlay.items():
        if e is not None:
            columns.add_entry(d, e)
    return columns


def _digest_of_name(name: str, ident: str) -> bytes:
    try:
        d = bytes.fromhex(ident)
    except ValueError:
        d = b""
    if len(d) != DIGEST_BYTES:
        raise InvalidArgumentError(name, "an api_key resource is named by its hex digest")
    return d


def _check_key(key: policy_pb2.ApiKey, d: bytes, key_id: str, tenant_id: str) -> None:
    if len(d) != DIGEST_BYTES:
        raise InvalidArgumentError(f"api_key/{key.id}.digest", f"must be {DIGEST_BYTES} bytes, got {len(d)}")
    if not key_id or not tenant_id:
        raise InvalidArgumentError(f"api_key/{key.id}", "key_id and tenant_id are required")


def _key_entry(key: policy_pb2.ApiKey) -> tuple[bytes, KeyEntry]:
    d = key.digest
    _check_key(key, d, key.key_id, key.tenant_id)
    entry = KeyEntry(
        key_id=key.key_id,
        tenant_id=sys.intern(key.tenant_id),
        revoked=key.revoked,
        expire_time_unix=key.expire_time_unix,
        allowed_models=frozenset(key.allowed_models) if key.allowed_models else NO_MODELS,
    )
    return d, entry
