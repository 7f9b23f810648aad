"""The integration tier's database: a fresh SQLite file, or the run's real PostgreSQL database,
each at `alembic upgrade head`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.db.migrate import upgrade


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'tessera.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)  # sync: alembic runs its own event loop
    return url


@pytest.fixture
async def sessionmaker(db_url) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    await engine.dispose()
