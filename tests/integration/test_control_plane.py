"""The real control plane (build_app) on a real SQLite file and the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from sqlalchemy import inspect, text

from control_plane.app import build_app
from control_plane.db.engine import make_engine
from control_plane.db.migrate import alembic_config, upgrade
from tessera import keys
from tessera.admin.v1 import admin_pb2
from tessera.errors import ConfigError
from tessera.identity import Authority, spiffe_id
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import GrpcSettings, IdentitySettings
from tessera.tls import grpc_channel
from tests.integration.conftest import ADMIN_TOKEN, Admin, control_plane_settings

TOKEN = ADMIN_TOKEN
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_migrations_upgrade_from_empty_to_every_table(backend, tmp_path, request):
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    await engine.dispose()
    assert {"tenants", "api_keys", "models", "backends", "limits", "alembic_version"} <= tables


def test_models_match_the_migrations(db_url):
    """`alembic check`: the SQLAlchemy models and the migrated schema agree (no missing migration)."""
    command.check(alembic_config(db_url))


async def test_unmigrated_database_is_a_startup_error(tmp_path, pepper):
    with pytest.raises(ConfigError, match="migrate"):
        await build_app(control_plane_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", pepper))


async def test_missing_pepper_is_a_startup_error(tmp_path, db_url):
    with pytest.raises(ConfigError, match="pepper"):
        await build_app(control_plane_settings(db_url, tmp_path / "nope"))


async def test_admin_calls_need_the_admin_token(admin):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=(("authorization", "Bearer wrong"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenant_lifecycle_and_errors(admin):
    name = _name()
    created = await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
    assert created.tenant.id.startswith("ten_")
    assert created.tenant.status == "active"
    by_name = await admin.GetTenant(admin_pb2.GetTenantRequest(tenant=name), metadata=AUTH)
    by_id = await admin.GetTenant(admin_pb2.GetTenantRequest(tenant=created.tenant.id), metadata=AUTH)
    assert by_name.tenant == by_id.tenant == created.tenant

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name="Bad Name!"), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in err.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.GetTenant(admin_pb2.GetTenantRequest(tenant="no-such-tenant"), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_tenants_paginates(admin):
    names = sorted(_name() for _ in range(3))
    for n in names:
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=n), metadata=AUTH)
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.ListTenants(
            admin_pb2.ListTenantsRequest(page_size=2, page_token=token), metadata=AUTH
        )
        assert len(page.items) <= 2
        seen += [t.name for t in page.items]
        token = page.next_page_token
        if not token:
            break
    assert set(names) <= set(seen)
    assert len(seen) == len(set(seen))


async def test_api_key_is_shown_once_and_stored_as_a_digest(admin, app, pepper):
    name = _name()
    await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
    created = await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant=name, name="ci"), metadata=AUTH)
    assert created.key.startswith(f"tsk_{created.id}_")
    assert len(created.key) > 50  # 256-bit secret
    listed = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant=name), metadata=AUTH)
    assert [k.id for k in listed.items] == [created.id]
    assert created.key not in str(listed)
    assert listed.items[0].prefix == created.key[: len(listed.items[0].prefix)]
    # The store holds the HMAC digest only.
    state = app.publisher.state
    assert state is not None
    (row,) = [k for k in state.keys if k.key_id == created.id]
    assert row.digest == keys.digest(keys.load_pepper(pepper), created.key)


async def test_bad_limit_and_model_input_is_invalid_argument(admin):
    name = _name()
    await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
    bad = [
        admin_pb2.CreateLimitRequest(tenant=name, kind="requests", window="fortnight", limit=1),
        admin_pb2.CreateLimitRequest(tenant=name, kind="requests", window="minute", limit=0),
        admin_pb2.CreateLimitRequest(tenant=name, kind="bananas", window="minute", limit=1),
    ]
    for req in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.CreateLimit(req, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for url in ["ftp://x:1", "http://h", "http://h:80/v1", "http://user:pw@h:80"]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.AddModel(
                admin_pb2.AddModelRequest(name="m1", backend=admin_pb2.Backend(url=url)), metadata=AUTH
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
    models = await admin.ListModels(admin_pb2.ListModelsRequest(), metadata=AUTH)
    assert "m1" not in [m.name for m in models.items]  # bad input changed nothing


async def _next_complete(stream) -> policy_pb2.StreamPolicyResponse:
    msg = await asyncio.wait_for(stream.read(), 5)
    while not msg.complete:
        msg = await asyncio.wait_for(stream.read(), 5)
    return msg


async def test_policy_stream_sends_a_snapshot_then_deltas(admin, app, pepper):
    name = _name()
    await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.policy_port}") as ch:
        stream = policy_pb2_grpc.PolicyServiceStub(ch).Stream()
        await stream.write(policy_pb2.StreamPolicyRequest(node_id="test", service="ext_authz"))
        first = await asyncio.wait_for(stream.read(), 5)
        assert first.reset
        tenants = [r.tenant for r in first.upserts if r.WhichOneof("kind") == "tenant"]
        assert name in [t.name for t in tenants]
        if not first.complete:
            await _next_complete(stream)
        created = await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant=name), metadata=AUTH)
        delta = await _next_complete(stream)
        assert not delta.reset
        (upsert,) = [r.api_key for r in delta.upserts if r.WhichOneof("kind") == "api_key"]
        assert upsert.key_id == created.id
        assert upsert.digest == keys.digest(keys.load_pepper(pepper), created.key)
        stream.cancel()


async def test_ext_authz_gets_limits_to_know_whom_they_apply_to_and_their_fail_mode(admin, app):
    name = _name()
    await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
    closed = (
        await admin.CreateLimit(
            admin_pb2.CreateLimitRequest(
                tenant=name, kind="requests", window="minute", limit=3, fail_mode="closed"
            ),
            metadata=AUTH,
        )
    ).limit
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.policy_port}") as ch:
        stream = policy_pb2_grpc.PolicyServiceStub(ch).Stream()
        await stream.write(policy_pb2.StreamPolicyRequest(node_id="test", service="ext_authz"))
        first = await asyncio.wait_for(stream.read(), 5)
        snapshot = list(first.upserts)
        if not first.complete:
            snapshot += (await _next_complete(stream)).upserts
        # ext_authz admits by the counters: it reads limits (whom they apply to, the fail
        # mode), besides keys, tenants and models.
        assert {r.WhichOneof("kind") for r in snapshot} <= {"api_key", "tenant", "model", "limit"}
        (lim,) = [r.limit for r in snapshot if r.WhichOneof("kind") == "limit" and r.limit.id == closed.id]
        assert (lim.fail_closed, lim.shadow, lim.limit) == (True, False, 3)
        await admin.DeleteLimit(admin_pb2.DeleteLimitRequest(id=closed.id), metadata=AUTH)
        assert list((await _next_complete(stream)).deletes) == [f"limit/{closed.id}"]
        stream.cancel()


async def test_ads_pushes_a_new_model_cluster(admin, app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.xds_port}") as ch:
        stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
        node = base_pb2.Node(id="test-envoy", cluster="tessera")
        await stream.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER_TYPE))
        await stream.write(discovery_pb2.DiscoveryRequest(node=node, type_url=LISTENER_TYPE))
        got: dict[str, discovery_pb2.DiscoveryResponse] = {}
        while len(got) < 2:
            resp = await asyncio.wait_for(stream.read(), 5)
            got[resp.type_url] = resp
        listeners = {
            (lst := listener_pb2.Listener.FromString(a.value)).name: lst for a in got[LISTENER_TYPE].resources
        }
        # the public listener, and the admin REST API's own (admin_rest="internal" by default)
        assert listeners.keys() == {"tessera_gateway", "tessera_admin_rest"}
        assert listeners["tessera_gateway"].address.socket_address.port_value == 18080
        # ACK both, then add a model: a new CDS version arrives with its cluster.
        for resp in got.values():
            await stream.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
                )
            )
        model = f"m-{uuid.uuid4().hex[:6]}"
        await admin.AddModel(
            admin_pb2.AddModelRequest(name=model, backend=admin_pb2.Backend(url="http://127.0.0.1:9")),
            metadata=AUTH,
        )
        resp = await asyncio.wait_for(stream.read(), 5)
        assert resp.type_url == CLUSTER_TYPE
        names = {cluster_pb2.Cluster.FromString(r.value).name for r in resp.resources}
        assert f"model/{model}" in names
        stream.cancel()


class TcpProxy:
    """A real TCP forwarder between the control plane and PostgreSQL that a test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.conns: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns += [writer, up_writer]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.conns:
            w.transport.abort()


@pytest.mark.postgres
async def test_database_outage_is_unavailable(postgres_url, pepper):
    await asyncio.to_thread(upgrade, postgres_url)
    proxy = TcpProxy(5432)
    port = await proxy.start()
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    app = await build_app(control_plane_settings(url, pepper))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as ch:
            admin = Admin(ch)
            await admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=AUTH)
            await proxy.cut()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=_name()), metadata=AUTH)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "database" in err.value.details()
    finally:
        await app.stop(0)


@pytest.fixture
def empty_db_url(request, tmp_path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh database on the real PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'walk.db'}"
        return
    import psycopg  # noqa: PLC0415

    from tests.conftest import PG_ADMIN_DSN  # noqa: PLC0415

    name = f"tessera_walk_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "empty_db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_each_migration_upgrades_from_the_previous_head_and_downgrades(empty_db_url):
    """Walk the chain one revision at a time with data in place, then all the way down and up."""
    url = empty_db_url
    cfg = alembic_config(url)
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(cfg).walk_revisions()))]
    assert revisions[0] == "0001"
    for rev in revisions:
        command.upgrade(cfg, rev)
        if rev == "0001":  # a row from the first schema must survive every later migration
            _sql(
                url,
                "INSERT INTO tenants (id, name, status, allowed_models, created_at, updated_at) "
                "VALUES ('ten_walk', 'walk', 'active', '[]', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            )
    assert _sql(url, "SELECT name FROM tenants WHERE id = 'ten_walk'") == [("walk",)]
    for rev in reversed(revisions[:-1]):
        command.downgrade(cfg, rev)
        assert _sql(url, "SELECT name FROM tenants WHERE id = 'ten_walk'") == [("walk",)]
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    command.check(cfg)


def _sql(url: str, statement: str) -> list[tuple[object, ...]]:
    async def run() -> list[tuple[object, ...]]:
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement))
                return [tuple(r) for r in result.fetchall()] if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_audit_log_is_append_only_in_the_database(backend, db_url):
    del backend
    _sql(
        db_url,
        "INSERT INTO audit_log (time, actor_id, actor_name, action, target_type, target_id, "
        "request_id, before, after) "
        "VALUES (CURRENT_TIMESTAMP, 'a', 'a', 'test.append', 't', 'x', '', '', '')",
    )
    for statement in ("UPDATE audit_log SET action = 'forged'", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"):
            _sql(db_url, statement)
    assert ("test.append",) in _sql(db_url, "SELECT action FROM audit_log")


async def test_limits_of_every_kind_and_model_prices_reach_the_ratelimit_stream(admin, app):
    name, model = _name(), f"m-{uuid.uuid4().hex[:8]}"
    tenant = (await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)).tenant
    await admin.AddModel(
        admin_pb2.AddModelRequest(name=model, backend=admin_pb2.Backend(url="http://127.0.0.1:9")),
        metadata=AUTH,
    )
    await admin.UpdateModel(
        admin_pb2.UpdateModelRequest(
            name=model,
            update_mask=["default_max_tokens", "max_max_tokens"],
            default_max_tokens=64,
            max_max_tokens=512,
        ),
        metadata=AUTH,
    )
    price = admin_pb2.SetModelPriceRequest(name=model, input_micros=150_000, output_micros=600_000)
    priced = (await admin.SetModelPrice(price, metadata=AUTH)).model
    assert (priced.prices[0].cached_micros, priced.prices[0].currency) == (150_000, "USD")
    free_cache = admin_pb2.SetModelPriceRequest(
        name=model, input_micros=3, output_micros=4, cached_micros=0, effective_time="2998-01-01"
    )
    assert (await admin.SetModelPrice(free_cache, metadata=AUTH)).model.prices[-1].cached_micros == 0
    future = admin_pb2.SetModelPriceRequest(
        name=model, input_micros=1, output_micros=2, effective_time="2999-01-01"
    )
    assert len((await admin.SetModelPrice(future, metadata=AUTH)).model.prices) == 3
    tokens = (
        await admin.CreateLimit(
            admin_pb2.CreateLimitRequest(
                tenant=name, kind="tokens", window="month", limit=1000, completion_weight=300
            ),
            metadata=AUTH,
        )
    ).limit
    assert (tokens.window, tokens.prompt_weight, tokens.completion_weight) == ("month", 100, 300)
    slots = (
        await admin.CreateLimit(
            admin_pb2.CreateLimitRequest(tenant=name, kind="concurrency", limit=2), metadata=AUTH
        )
    ).limit
    assert slots.window == ""

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.policy_port}") as ch:
        stream = policy_pb2_grpc.PolicyServiceStub(ch).Stream()
        await stream.write(policy_pb2.StreamPolicyRequest(node_id="test", service="ratelimit"))
        first = await asyncio.wait_for(stream.read(), 5)
        snapshot = list(first.upserts)
        if not first.complete:
            snapshot += (await _next_complete(stream)).upserts
        assert {r.WhichOneof("kind") for r in snapshot} <= {"limit", "model"}  # no keys, no tenants
        limits = {r.limit.id: r.limit for r in snapshot if r.WhichOneof("kind") == "limit"}
        assert limits[tokens.id].window_seconds == 0  # calendar month
        assert limits[tokens.id].completion_weight == 300
        assert limits[slots.id].kind == policy_pb2.Limit.CONCURRENCY
        (m,) = [r.model for r in snapshot if r.WhichOneof("kind") == "model" and r.model.name == model]
        assert (m.default_max_tokens, m.max_max_tokens) == (64, 512)
        assert (m.input_micros, m.output_micros, m.currency) == (
            150_000,
            600_000,
            "USD",
        )  # not the future price

        changed = admin_pb2.UpdateLimitRequest(
            id=tokens.id, update_mask=["limit", "shadow"], limit=5, shadow=True
        )
        assert (await admin.UpdateLimit(changed, metadata=AUTH)).limit.limit == 5
        delta = await _next_complete(stream)
        (upsert,) = [r.limit for r in delta.upserts]
        assert (upsert.id, upsert.limit, upsert.shadow) == (tokens.id, 5, True)
        await admin.DeleteLimit(admin_pb2.DeleteLimitRequest(id=slots.id), metadata=AUTH)
        assert list((await _next_complete(stream)).deletes) == [f"limit/{slots.id}"]
        stream.cancel()

    listed = await admin.ListLimits(admin_pb2.ListLimitsRequest(tenant=tenant.id), metadata=AUTH)
    assert [x.id for x in listed.items] == [tokens.id]
    bad = [
        (
            admin.CreateLimit,
            admin_pb2.CreateLimitRequest(tenant=name, kind="concurrency", window="minute", limit=1),
        ),
        (admin.CreateLimit, admin_pb2.CreateLimitRequest(tenant=name, kind="tokens", limit=1)),
        (admin.UpdateLimit, admin_pb2.UpdateLimitRequest(id=tokens.id, update_mask=["kind"])),
        (admin.UpdateLimit, admin_pb2.UpdateLimitRequest(id=tokens.id, update_mask=["limit"], limit=0)),
        (admin.SetModelPrice, admin_pb2.SetModelPriceRequest(name=model, currency="dollars")),
        (admin.SetModelPrice, admin_pb2.SetModelPriceRequest(name=model, effective_time="yesterday")),
        (
            admin.UpdateModel,
            admin_pb2.UpdateModelRequest(
                name=model, update_mask=["default_max_tokens"], default_max_tokens=513
            ),
        ),
    ]
    for call, req in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
    for call, req, code in [
        (admin.SetModelPrice, future, grpc.StatusCode.ALREADY_EXISTS),
        (admin.DeleteLimit, admin_pb2.DeleteLimitRequest(id=slots.id), grpc.StatusCode.NOT_FOUND),
        (
            admin.UpdateModel,
            admin_pb2.UpdateModelRequest(name="nope", update_mask=["max_max_tokens"]),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, metadata=AUTH)
        assert err.value.code() == code


async def test_model_registry_backends_can_be_added_changed_removed(admin):
    name = f"m-{uuid.uuid4().hex[:8]}"
    first, second = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    missing = admin_pb2.AddBackendRequest(name=name, backend=admin_pb2.Backend(url=second))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.AddBackend(missing, metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # AddBackend never creates a model
    await admin.AddModel(
        admin_pb2.AddModelRequest(name=name, backend=admin_pb2.Backend(url=first)), metadata=AUTH
    )
    added = (await admin.AddBackend(missing, metadata=AUTH)).model
    assert [b.url for b in added.backends] == [first, second]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.AddBackend(missing, metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    change = admin_pb2.UpdateBackendRequest(
        name=name, url=second, update_mask=["weight", "priority"], weight=5, priority=2
    )
    changed = (await admin.UpdateBackend(change, metadata=AUTH)).model
    assert [(b.weight, b.priority) for b in changed.backends] == [(1, 0), (5, 2)]
    for bad, code in [
        (
            admin_pb2.UpdateBackendRequest(name=name, url="http://127.0.0.1:9", update_mask=["weight"]),
            "NOT_FOUND",
        ),
        (admin_pb2.UpdateBackendRequest(name=name, url=second, update_mask=["url"]), "INVALID_ARGUMENT"),
        (
            admin_pb2.UpdateBackendRequest(name=name, url=second, update_mask=["kind"], kind="gpu"),
            "INVALID_ARGUMENT",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.UpdateBackend(bad, metadata=AUTH)
        assert err.value.code().name == code
    left = (
        await admin.RemoveBackend(admin_pb2.RemoveBackendRequest(name=name, url=first), metadata=AUTH)
    ).model
    assert [b.url for b in left.backends] == [second]
    assert (await admin.GetModel(admin_pb2.GetModelRequest(name=name), metadata=AUTH)).model.name == name
    await admin.RemoveModel(admin_pb2.RemoveModelRequest(name=name), metadata=AUTH)
    listed = await admin.ListModels(admin_pb2.ListModelsRequest(), metadata=AUTH)
    assert name not in [m.name for m in listed.items]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.GetModel(admin_pb2.GetModelRequest(name=name), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def stream_read_until_complete(stream, deadline: float) -> policy_pb2.StreamPolicyResponse:
    """The next complete message, waiting until ``deadline`` (the loop's time) at most."""
    loop = asyncio.get_running_loop()
    while True:
        msg = await asyncio.wait_for(stream.read(), max(0.1, deadline - loop.time()))
        if msg.complete:
            return msg


async def test_a_price_reaches_the_ratelimit_stream_when_it_takes_effect(admin, app):
    model = f"m-{uuid.uuid4().hex[:8]}"
    await admin.AddModel(
        admin_pb2.AddModelRequest(name=model, backend=admin_pb2.Backend(url="http://127.0.0.1:9")),
        metadata=AUTH,
    )
    soon = datetime.now(UTC) + timedelta(seconds=2)
    price = admin_pb2.SetModelPriceRequest(
        name=model, input_micros=7, output_micros=9, effective_time=soon.isoformat().replace("+00:00", "Z")
    )
    await admin.SetModelPrice(price, metadata=AUTH)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.policy_port}") as ch:
        stream = policy_pb2_grpc.PolicyServiceStub(ch).Stream()
        await stream.write(policy_pb2.StreamPolicyRequest(node_id="test", service="ratelimit"))
        first = await asyncio.wait_for(stream.read(), 5)
        snapshot = (
            list(first.upserts)
            if first.complete
            else [*first.upserts, *(await _next_complete(stream)).upserts]
        )
        (m,) = [r.model for r in snapshot if r.WhichOneof("kind") == "model" and r.model.name == model]
        assert m.currency == ""  # not in effect yet: unpriced
        # The 5 s refresh notices the new price: the delta comes at the first refresh after it
        # takes effect, up to ~5 s after the snapshot, so no single read may time out at 5 s
        # (that raced the refresh); only the overall deadline bounds the wait.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 12
        while True:
            delta = await stream_read_until_complete(stream, deadline)
            priced = [
                r.model for r in delta.upserts if r.WhichOneof("kind") == "model" and r.model.name == model
            ]
            if priced:
                assert (priced[0].input_micros, priced[0].output_micros, priced[0].currency) == (7, 9, "USD")
                break
        stream.cancel()


async def test_the_policy_stream_under_mutual_tls_serves_each_identity_its_own_view(db_url, pepper, tmp_path):
    """An anonymous client, a certificate from another CA and an identity that is no subscriber
    get nothing; ratelimit never receives key digests, whatever its hello claims."""
    ca = Authority(tmp_path / "identity")

    def identity(component: str, authority: Authority = ca) -> IdentitySettings:
        return authority.ensure(component, spiffe_id(component))

    settings = control_plane_settings(db_url, pepper).model_copy(
        update={"policy_server": GrpcSettings(port=0), "identity": identity("control-plane")}
    )
    app = await build_app(settings)
    target = f"127.0.0.1:{app.policy_port}"
    try:
        # the admin API is under mutual TLS too: the operator's identity
        async with grpc_channel(f"127.0.0.1:{app.admin_port}", identity("operator"), "control-plane") as ch:
            admin = Admin(ch)
            name = _name()
            await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
            await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant=name), metadata=AUTH)

        async def subscribe(channel: grpc.aio.Channel, claim: str) -> set[str] | grpc.StatusCode:
            stream = policy_pb2_grpc.PolicyServiceStub(channel).Stream()
            kinds: set[str] = set()
            try:
                await stream.write(policy_pb2.StreamPolicyRequest(node_id="probe", service=claim))
                msg = await asyncio.wait_for(stream.read(), 5)
                while msg is not grpc.aio.EOF:
                    kinds |= {str(r.WhichOneof("kind")) for r in msg.upserts}
                    if msg.complete:
                        break
                    msg = await asyncio.wait_for(stream.read(), 5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            finally:
                stream.cancel()
            return kinds

        async with grpc.aio.insecure_channel(target) as plain:
            assert await subscribe(plain, "ext_authz") == grpc.StatusCode.UNAVAILABLE
        for who, expected in (
            (identity("ext-authz", Authority(tmp_path / "other")), grpc.StatusCode.UNAVAILABLE),
            (identity("meter"), grpc.StatusCode.PERMISSION_DENIED),
        ):
            async with grpc_channel(target, who, "control-plane") as channel:
                assert await subscribe(channel, "ext_authz") == expected
        async with grpc_channel(target, identity("ratelimit"), "control-plane") as channel:
            kinds = await subscribe(channel, "ext_authz")  # it claims to be ext_authz
        assert isinstance(kinds, set)
        assert "api_key" not in kinds
        assert "tenant" not in kinds
        async with grpc_channel(target, identity("ext-authz"), "control-plane") as channel:
            kinds = await subscribe(channel, "ratelimit")
        assert isinstance(kinds, set)
        assert {"api_key", "tenant"} <= kinds
    finally:
        await app.stop(0)


@pytest.mark.postgres
async def test_a_write_on_one_replica_reaches_the_other_replicas_subscribers_within_a_second(
    postgres_url, pepper
):
    """Two control planes on one PostgreSQL, periodic refresh far off (60 s): a key created on
    one is in the other's policy stream within a second (NOTIFY/LISTEN), and revoked likewise."""
    await asyncio.to_thread(upgrade, postgres_url)
    settings = control_plane_settings(postgres_url, pepper).model_copy(update={"refresh_seconds": 60.0})
    a, b = await build_app(settings), await build_app(settings)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{a.admin_port}") as ch,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.policy_port}") as pch,
        ):
            admin = Admin(ch)
            name = _name()
            await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=AUTH)
            stream = policy_pb2_grpc.PolicyServiceStub(pch).Stream()
            await stream.write(policy_pb2.StreamPolicyRequest(node_id="test", service="ext_authz"))
            await _next_complete(stream)  # b's snapshot
            await asyncio.sleep(0.5)  # b's listener is up (it publishes once on connecting)
            for step in ("created", "revoked"):
                started = time.monotonic()
                if step == "created":
                    created = await admin.CreateApiKey(
                        admin_pb2.CreateApiKeyRequest(tenant=name), metadata=AUTH
                    )
                else:
                    await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id=created.id), metadata=AUTH)
                while True:
                    delta = await asyncio.wait_for(stream.read(), 1.0)  # not on the 60 s refresh
                    if any(
                        r.api_key.key_id == created.id
                        for r in delta.upserts
                        if r.WhichOneof("kind") == "api_key"
                    ):
                        break
                    if step == "revoked" and any(created.id in d for d in delta.deletes):
                        break
                assert time.monotonic() - started < 1.0, step
            stream.cancel()
    finally:
        await b.stop(0)
        await a.stop(0)
