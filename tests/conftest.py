"""Shared fixtures: real PostgreSQL (a per-run database) and real Redis (a per-run key prefix)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera import ports
from tessera.envoy_tls import write_inline_identity
from tessera.identity import Authority, spiffe_id
from tests.redis_topologies import LocalCluster, LocalSentinel

PG_ADMIN_DSN = os.environ.get("TESSERA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TESSERA_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    return ports.free_port()


def envoy_identity(directory: Path, node: str = "n") -> tuple[str, str]:
    """An Envoy identity from a CA in ``directory``: (its SDS file, the CA file), the two paths a
    rendered bootstrap names."""
    authority = Authority(directory)
    cert, key, _ = authority.ensure("envoy", spiffe_id("envoy", node=node)).files
    sds = directory / "envoy-sds.json"
    write_inline_identity(sds, cert.read_bytes(), key.read_bytes())
    return str(sds), str(authority.cert_path)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped at the end of the run."""
    psycopg = pytest.importorskip("psycopg")
    name = f"tessera_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """A real Redis Cluster (3 masters, a replica each) for the whole run."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory) -> Iterator[LocalSentinel]:
    """A master and its replica under three Sentinels for the whole run."""
    sentinel = LocalSentinel(tmp_path_factory.mktemp("redis-sentinel"))
    yield sentinel
    sentinel.close()


@pytest.fixture
def redis_prefix() -> str:
    return f"tessera-test-{uuid.uuid4().hex[:8]}:"
