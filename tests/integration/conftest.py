"""The integration tier's database: a fresh SQLite file, or the run's real PostgreSQL database,
each at `alembic upgrade head`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.db.migrate import upgrade
from control_plane.settings import ControlPlaneSettings

ADMIN_TOKEN = "test-admin-token"  # the control plane's static platform-admin token in these tests


def control_plane_settings(url: str, pepper: Path) -> ControlPlaneSettings:
    """A control plane on ``url`` with every port chosen by the OS (read them from the App)."""
    return ControlPlaneSettings(
        database={"url": url},
        pepper={"file": pepper},
        admin={"port": 0},
        xds={"port": 0},
        policy_server={"port": 0},
        http={"port": 0},
        metrics={"port": 0},
        admin_token=ADMIN_TOKEN,
        gateway={"port": 18080},
    )


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
