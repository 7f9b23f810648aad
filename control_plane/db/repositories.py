"""Repositories: take an AsyncSession, never commit (the caller owns the transaction).

All SQL goes through SQLAlchemy constructs, so every value is a bound parameter. The admin
servicers query their own rows directly (with RBAC filters); what more than one caller needs
lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Backend, Model, ModelAlias
from tessera.errors import AlreadyExistsError


async def all_rows(session: AsyncSession, model: type[Any]) -> Sequence[Any]:
    """Every row of a table (the publisher reads the whole store as one State)."""
    return (await session.scalars(select(model))).all()


def attach_backend(model: Model, backend: Backend) -> None:
    """Add ``backend`` to ``model``; the same URL twice is a conflict."""
    if any(b.url == backend.url for b in model.backends):
        raise AlreadyExistsError(f"model {model.name!r} already has backend {backend.url}")
    model.backends.append(backend)


class ModelRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def get(self, name: str) -> Model | None:
        model: Model | None = await self.s.scalar(select(Model).where(Model.name == name))
        return model

    async def add_backend(
        self, name: str, backend: Backend, *, visibility: str, replace: bool = False
    ) -> Model:
        """Create the model if needed and attach the backend (same URL twice is a conflict)."""
        model = await self.get(name)
        if model is None:
            if (owner := await self.alias_owner(name)) is not None:
                raise AlreadyExistsError(f"{name!r} is an alias of model {owner!r}")
            model = Model(name=name, visibility=visibility)
            self.s.add(model)
            await self.s.flush()
            await self.s.refresh(model, ["backends", "prices", "aliases"])
        elif replace:
            model.backends.clear()
            await self.s.flush()
        attach_backend(model, backend)
        await self.s.flush()
        return model

    async def alias_owner(self, alias: str) -> str | None:
        """The model ``alias`` names, if it is an alias."""
        owner: str | None = await self.s.scalar(
            select(Model.name)
            .join(ModelAlias, ModelAlias.model_id == Model.id)
            .where(ModelAlias.alias == alias)
        )
        return owner

    async def set_aliases(self, model: Model, aliases: list[str]) -> None:
        """The model's aliases become exactly ``aliases``: one namespace with model names."""
        for alias in aliases:
            if alias == model.name or await self.get(alias) is not None:
                raise AlreadyExistsError(f"alias {alias!r} is the name of a model")
            owner = await self.alias_owner(alias)
            if owner is not None and owner != model.name:
                raise AlreadyExistsError(f"alias {alias!r} already names model {owner!r}")
        model.aliases.clear()
        await self.s.flush()
        model.aliases.extend(ModelAlias(alias=a) for a in aliases)

    async def list(self, *, after: str, limit: int) -> Sequence[Model]:
        stmt = select(Model).where(Model.name > after).order_by(Model.name).limit(limit)
        return (await self.s.scalars(stmt)).all()


def insert_stmt(s: AsyncSession, model: Any) -> Any:
    """INSERT with ON CONFLICT (PostgreSQL and SQLite both have it)."""
    dialect = s.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


_Bulk = tuple[str, list[str], list[tuple[int, Any]], bool]  # SQL, keys in order, processors, positional
_BULK: dict[tuple[str, str, tuple[str, ...]], _Bulk] = {}


async def insert_many_new(
    s: AsyncSession, table: Any, rows: Sequence[dict[str, Any]], index_elements: Sequence[str]
) -> None:
    """INSERT many rows (all with the same keys) as one driver-level executemany, skipping rows
    whose ``index_elements`` already exist. SQLAlchemy compiles the statement (once per dialect)
    and the values go through the columns' own bind processors, so what is stored is what
    ``execute`` would store, without its per-row bookkeeping: the meter's hot loop writes two
    rows per request."""
    if not rows:
        return
    conn = await s.connection()
    dialect = conn.dialect
    keys = tuple(rows[0])
    cached = _BULK.get((dialect.name, table.name, keys))
    if cached is None:
        stmt = insert_stmt(s, table).on_conflict_do_nothing(index_elements=list(index_elements))
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        order = list(compiled.positiontup) if compiled.positional else list(keys)  # else named: the keys
        types = [table.c[k].type.dialect_impl(dialect) for k in order]
        processors = [(i, p) for i, t in enumerate(types) if (p := t.bind_processor(dialect)) is not None]
        cached = (compiled.string, order, processors, compiled.positional)
        _BULK[(dialect.name, table.name, keys)] = cached
    sql, order, processors, positional = cached
    params: list[Any] = []
    for row in rows:
        values = [row[k] for k in order]
        for i, process in processors:
            values[i] = process(values[i])
        params.append(tuple(values) if positional else dict(zip(order, values, strict=True)))
    await conn.exec_driver_sql(sql, params)


def as_utc(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
