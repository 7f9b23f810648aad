"""`tessera admin bootstrap` on a database nobody has migrated yet (issue 17): it changes
nothing and says exactly what to run; after that command, it works. The real CLI, as a newcomer
runs it, on a fresh SQLite file and a fresh PostgreSQL database."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_DSN

TESSERA = str(Path(sys.executable).parent / "tessera")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    psycopg = pytest.importorskip("psycopg")
    name = f"tessera_boot_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_bootstrap_on_an_unmigrated_database_says_to_migrate_then_works(empty_db, tmp_path):
    pepper = tmp_path / "pepper"
    pepper.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {"TESSERA_DATABASE__URL": empty_db, "TESSERA_PEPPER__FILE": str(pepper)}

    def tessera(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TESSERA, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    refused = tessera("admin", "bootstrap", "ops@example.com")
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "run `tessera control-plane migrate`" in refused.stderr
    assert "Traceback" not in refused.stderr

    assert tessera("control-plane", "migrate").returncode == 0
    created = tessera("admin", "bootstrap", "ops@example.com")
    assert created.returncode == 0, created.stderr
    assert "platform admin ops@example.com created" in created.stdout
    assert "tadm_" in created.stdout  # the key, shown once
    again = tessera("admin", "bootstrap", "ops@example.com")  # the first admin exists: refused
    assert again.returncode != 0
    assert "tadm_" not in again.stdout + again.stderr
