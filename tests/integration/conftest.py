"""The integration tier's database: a fresh SQLite file, or the run's real PostgreSQL database,
each at `alembic upgrade head`."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.app import App, build_app
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.db.migrate import upgrade
from control_plane.settings import ControlPlaneSettings
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import PG_ADMIN_DSN

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


@pytest.fixture(scope="session")
def postgres_template(postgres_url) -> Iterator[str]:
    """A database at head that nothing connects to, copied for each test (CREATE DATABASE
    ... TEMPLATE takes ~0.1 s, a migration from empty seconds)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"tessera_tmpl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    upgrade(f"{postgres_url.rsplit('/', 1)[0]}/{name}")
    yield name
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def isolated_postgres_url(postgres_url, postgres_template) -> Iterator[str]:
    """A database of this test's own, at head: no test sees another's rows."""
    import psycopg  # noqa: PLC0415 - present: postgres_template skipped otherwise

    name = f"tessera_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """SQLite in the test's folder, or a PostgreSQL database of the test's own; both at head."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'tessera.db'}"
        upgrade(url)  # sync: alembic runs its own event loop
        return url
    return str(request.getfixturevalue("isolated_postgres_url"))


@pytest.fixture
async def sessionmaker(db_url) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def pepper(tmp_path) -> Path:
    path = tmp_path / "pepper"
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture
async def app(db_url, pepper) -> AsyncIterator[App]:
    """The real control plane (build_app) on the test's database."""
    app = await build_app(control_plane_settings(db_url, pepper))
    yield app
    await app.stop(0)


class Admin:
    """Every admin RPC by name on one channel (RPC names are unique across the services)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        for service in admin_pb2.DESCRIPTOR.services_by_name.values():
            stub = getattr(admin_pb2_grpc, f"{service.name}Stub")(channel)
            for m in service.methods:
                setattr(self, m.name, getattr(stub, m.name))


@pytest.fixture
async def admin(app) -> AsyncIterator[Admin]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as ch:
        yield Admin(ch)
