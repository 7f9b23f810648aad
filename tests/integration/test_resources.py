"""Declarative resources through the real admin API (ResourceService) on SQLite and PostgreSQL:
apply from empty, idempotence, dry run, one change = one audit record, prune, export round
trip, atomicity, hostile documents and RBAC."""

from __future__ import annotations

import uuid

import grpc
import pytest
import yaml

from tessera.admin.v1 import admin_pb2 as pb
from tests.configmap import example_texts
from tests.integration.conftest import ADMIN_TOKEN

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def example_files(**replace: str) -> list[pb.SourceFile]:
    return [pb.SourceFile(name=n, content=c) for n, c in example_texts(**replace).items()]


async def apply(admin, files, **kw) -> pb.ApplyResourcesResponse:
    return await admin.ApplyResources(pb.ApplyResourcesRequest(files=files, **kw), metadata=AUTH)


def actions(resp: pb.ApplyResourcesResponse) -> dict[str, str]:
    return {f"{c.kind}/{c.name}": c.action for c in resp.changes}


async def audit_actions(admin) -> list[str]:
    resp = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000), metadata=AUTH)
    return [e.action for e in resp.items]


def doc(kind: str, name: str, spec: dict) -> pb.SourceFile:
    text = yaml.safe_dump(
        {"apiVersion": "tessera.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    )
    return pb.SourceFile(name=f"{kind.lower()}-{name}.yaml", content=text)


async def test_apply_from_empty_creates_the_set_and_applying_again_changes_nothing(admin):
    first = await apply(admin, example_files())
    assert set(actions(first).values()) == {"created"}
    assert len(first.changes) == 8
    created_key = next(c.key for c in first.changes if c.kind == "Principal")
    assert created_key.startswith("tadm_")  # shown once, to the applier
    assert any("'ci'" in w for w in first.warnings)  # the declared key acme does not have

    models = await admin.ListModels(pb.ListModelsRequest(), metadata=AUTH)
    (model,) = models.items
    assert (model.name, list(model.aliases), model.default_max_tokens) == ("llama-3-8b", ["gpt-4o-mini"], 256)
    assert model.prices[0].input_micros == 150000
    assert model.prices[0].cached_micros == 150000  # omitted: the input price, as SetModelPrice
    limits = await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)
    assert sorted((x.kind, x.window, x.limit, x.fail_mode) for x in limits.items) == [
        ("requests", "minute", 5, "open"),
        ("tokens", "hour", 100000, "open"),
    ]

    events = len(await audit_actions(admin))
    again = await apply(admin, example_files())
    assert set(actions(again).values()) == {"unchanged"}
    assert len(await audit_actions(admin)) == events  # nothing written


async def test_dry_run_reports_the_changes_and_commits_nothing(admin):
    resp = await apply(admin, example_files(), dry_run=True)
    assert set(actions(resp).values()) == {"created"}
    assert all(not c.key for c in resp.changes)  # no key is minted for nothing
    tenants = await admin.ListTenants(pb.ListTenantsRequest(), metadata=AUTH)
    assert list(tenants.items) == []
    assert await audit_actions(admin) == []


async def test_one_changed_document_changes_one_resource_with_one_audit_record(admin):
    await apply(admin, example_files())
    before = await audit_actions(admin)
    resp = await apply(admin, example_files(**{"limit: 5": "limit: 7"}))
    changed = {k: a for k, a in actions(resp).items() if a != "unchanged"}
    assert changed == {"Limit/acme-requests": "updated"}
    assert next(c for c in resp.changes if c.name == "acme-requests").fields == ["limit"]
    after = await audit_actions(admin)
    assert len(after) == len(before) + 1
    assert after[-1] == "limit.update"
    limits = await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)
    assert 7 in [x.limit for x in limits.items]


async def test_a_limit_change_an_update_cannot_make_replaces_it(admin):
    await apply(admin, example_files())
    resp = await apply(admin, example_files(**{"window: minute\n  limit: 5": "window: hour\n  limit: 5"}))
    assert actions(resp)["Limit/acme-requests"] == "updated"
    limits = await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)
    assert sorted((x.kind, x.window) for x in limits.items) == [("requests", "hour"), ("tokens", "hour")]
    assert set(
        actions(
            await apply(admin, example_files(**{"window: minute\n  limit: 5": "window: hour\n  limit: 5"}))
        ).values()
    ) == {"unchanged"}


async def test_prune_deletes_what_apply_made_and_is_gone_from_the_set_never_imperative_resources(admin):
    await apply(admin, example_files())
    # An imperative limit on the same tenant, and an imperative tenant.
    await admin.CreateLimit(
        pb.CreateLimitRequest(tenant="acme", kind="requests", window="day", limit=1000), metadata=AUTH
    )
    await admin.CreateTenant(pb.CreateTenantRequest(name="initech"), metadata=AUTH)
    files = [f for f in example_files() if f.name != "principals.yaml"]
    files = [
        pb.SourceFile(name=f.name, content=f.content.split("---")[0]) if f.name == "limits.yaml" else f
        for f in files
    ]
    resp = await apply(admin, files, prune=True)
    assert {k: a for k, a in actions(resp).items() if a == "deleted"} == {
        "Limit/acme-llama-tokens": "deleted"
    }
    limits = await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)
    assert sorted((x.kind, x.window) for x in limits.items) == [("requests", "day"), ("requests", "minute")]
    # Principals were not in the set: prune leaves that kind alone.
    assert (
        await admin.GetPrincipal(pb.GetPrincipalRequest(principal="acme-ops"), metadata=AUTH)
    ).principal.status == "active"
    assert (
        await admin.GetTenant(pb.GetTenantRequest(tenant="initech"), metadata=AUTH)
    ).tenant.status == "active"
    # Without --prune a missing document deletes nothing.
    without = [f for f in files if f.name != "limits.yaml"] + [
        doc("Limit", "other", {"tenant": "globex", "kind": "requests", "window": "minute", "limit": 3})
    ]
    resp = await apply(admin, without)
    assert "deleted" not in actions(resp).values()


async def test_prune_of_a_whole_kind_deletes_its_documents_resources(admin):
    await apply(admin, example_files())
    files = [
        f
        for f in example_files()
        if f.name in {"plans.yaml", "models.yaml", "limits.yaml", "principals.yaml"}
    ]
    files.append(doc("Tenant", "acme", {"plan": "starter"}))
    resp = await apply(admin, files, prune=True)
    assert actions(resp)["Tenant/globex"] == "deleted"
    assert (
        await admin.GetTenant(pb.GetTenantRequest(tenant="globex"), metadata=AUTH)
    ).tenant.status == "deleted"


async def test_export_applies_back_unchanged(admin):
    await apply(admin, example_files())
    # imperative resources export too, and apply back as themselves (a limit by its id)
    await admin.CreateLimit(
        pb.CreateLimitRequest(tenant="globex", kind="tokens", window="day", limit=9), metadata=AUTH
    )
    exported = await admin.ExportResources(pb.ExportResourcesRequest(), metadata=AUTH)
    assert exported.count == 9
    assert "credential" not in exported.yaml
    resp = await apply(admin, [pb.SourceFile(name="export.yaml", content=exported.yaml)])
    assert set(actions(resp).values()) == {"unchanged"}, actions(resp)
    again = await admin.ExportResources(pb.ExportResourcesRequest(), metadata=AUTH)
    assert again.yaml == exported.yaml
    one = await admin.ExportResources(pb.ExportResourcesRequest(kind="tenants", name="acme"), metadata=AUTH)
    (tenant,) = list(yaml.safe_load_all(one.yaml))
    assert tenant == {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "acme"},
        "spec": {"plan": "starter", "allowedModels": ["llama-3-8b"]},
    }


async def test_a_backend_credential_set_imperatively_survives_an_apply(admin):
    await apply(admin, example_files())
    await admin.UpdateBackend(
        pb.UpdateBackendRequest(
            name="llama-3-8b",
            url="http://127.0.0.1:8000",
            update_mask=["credential"],
            credential="sk-upstream-1",
        ),
        metadata=AUTH,
    )
    resp = await apply(admin, example_files())
    assert actions(resp)["Model/llama-3-8b"] == "unchanged"
    model = (await admin.GetModel(pb.GetModelRequest(name="llama-3-8b"), metadata=AUTH)).model
    assert model.backends[0].has_credential


async def test_an_invalid_document_anywhere_applies_nothing_and_names_itself(admin):
    files = [
        *example_files(),
        doc("Limit", "broken", {"tenant": "acme", "kind": "requests", "window": "fortnight", "limit": 1}),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await apply(admin, files)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit-broken.yaml#1: Limit/broken" in err.value.details()
    assert list((await admin.ListTenants(pb.ListTenantsRequest(), metadata=AUTH)).items) == []
    assert await audit_actions(admin) == []


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("a: &x [1]\nb: *x\n", "aliases"),
        ("apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a}\nspec: {plann: x}\n", "plann"),
        ("apiVersion: tessera.dev/v1\nkind: Tenant\nmetadata: {name: a}\n", "apiVersion"),
        ("apiVersion: tessera.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: a}\n", "kind"),
        ("apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nspec: {}\n", "metadata.name"),
        ("apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a}\nspec: {plan: [1]}\n", "plan"),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [{url: 'http://h:1', credential: sk-secret-value}]}\n"
            ),
            "no secrets",
        ),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a}\n---\n"
                "apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a}\n"
            ),
            "also declared",
        ),
        ("{{{", "not YAML"),
        (
            "a: 1\nb: sk-secret-value: x\n",
            "not YAML: mapping values are not allowed in this context at line 2",
        ),
        ("[" * 100 + "]" * 100, "nested deeper than 64"),
        ("[" + "1," * 250_000 + "1]", "more than 200000 YAML nodes"),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [[{url: 'http://h:1', credential: sk-secret-value}]]}\n"
            ),
            "spec.backends[0]: must be a mapping",
        ),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [{url: 'http://h:1', weight: sk-secret-value}]}\n"
            ),
            "field 'backends.weight': wrong type or value",
        ),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [{url: 'http://h:1', credential: sk-secret-value}]}\nspec: {}\n"
            ),
            "duplicate",
        ),
        ("apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a, name: b}\n", "duplicate"),
        ('apiVersion: tessera.dev/v1alpha1\nkind: Limit\nmetadata: {name: "x\\0y"}\n', "metadata.name"),
        ('apiVersion: tessera.dev/v1alpha1\nkind: Tenant\nmetadata: {name: "a\\u202eb"}\n', "metadata.name"),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Principal\nmetadata: {name: p}\n"
                "spec: {bindings: [{role: platform-admin}, {role: platform-admin}]}\n"
            ),
            "listed twice",
        ),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [{url: 'http://h:1'}, {url: 'http://h:1/'}]}\n"
            ),
            "listed twice",
        ),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [{url: 'http://h:1'}],"
                " prices: [{effectiveTime: '2026-01-01', inputMicros: 1},"
                " {effectiveTime: '2026-01-01', inputMicros: 1}]}\n"
            ),
            "same time",
        ),
        (
            (
                "apiVersion: tessera.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                "spec: {backends: [{url: 'http://h:1'}], prices: [{inputMicros: 1}]}\n"
            ),
            "effectiveTime",
        ),
    ],
)
async def test_hostile_documents_are_invalid_argument_and_change_nothing(admin, content, says):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await apply(admin, [pb.SourceFile(name="bad.yaml", content=content)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in err.value.details()
    assert "sk-secret-value" not in err.value.details()
    assert await audit_actions(admin) == []


async def test_prices_are_history_a_document_cannot_change_or_drop_one(admin):
    await apply(admin, example_files())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await apply(admin, example_files(**{"inputMicros: 150000": "inputMicros: 100000"}))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "never changes" in err.value.details()
    new_price = '\n    - {effectiveTime: "2027-01-01", inputMicros: 1, outputMicros: 2}'
    later = example_files(**{"      currency: USD": "      currency: USD" + new_price})
    resp = await apply(admin, later)
    assert actions(resp)["Model/llama-3-8b"] == "updated"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await apply(admin, example_files())
    assert "never removed" in err.value.details()


async def test_apply_needs_a_platform_admin(admin):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ApplyResources(pb.ApplyResourcesRequest(files=example_files()))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await apply(admin, example_files())
    tenant_admin = (
        await admin.CreatePrincipal(
            pb.CreatePrincipalRequest(
                name=f"p-{uuid.uuid4().hex[:6]}",
                bindings=[pb.RoleBinding(role="tenant-admin", tenant_id="acme")],
            ),
            metadata=AUTH,
        )
    ).key
    theirs = (("authorization", f"Bearer {tenant_admin}"),)
    for call in (
        admin.ApplyResources(pb.ApplyResourcesRequest(files=example_files()), metadata=theirs),
        admin.ExportResources(pb.ExportResourcesRequest(), metadata=theirs),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_resource_applied_by_one_manager_is_not_taken_by_another(admin):
    await apply(admin, example_files(), manager="team-a")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await apply(admin, [doc("Plan", "starter", {"priority": 2})])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "team-a" in err.value.details()
    # and a prune by another manager deletes none of it
    resp = await apply(admin, [doc("Plan", "other", {})], prune=True)
    assert "deleted" not in actions(resp).values()


async def test_an_unauthenticated_caller_is_refused_before_its_files_are_read(admin):
    huge = pb.SourceFile(name="x.yaml", content="[" + "1," * 500_000 + "1]")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ApplyResources(pb.ApplyResourcesRequest(files=[huge]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_sources_own_managers_are_reserved(admin):
    for manager in ("config-dir", "kubernetes"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await apply(admin, example_files(), manager=manager, prune=True)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_limit_named_after_another_managers_limit_id_does_not_take_it(admin):
    await apply(admin, example_files(), manager="team-a")
    theirs = (await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)).items
    target = next(x for x in theirs if x.limit == 5)
    spec = {"tenant": "acme", "kind": "requests", "window": "minute", "limit": 999}
    resp = await apply(admin, [doc("Limit", target.id, spec)], manager="mallory")
    assert actions(resp) == {f"Limit/{target.id}": "created"}  # a new limit, not theirs
    await apply(admin, [doc("Plan", "other", {})], manager="mallory", prune=True)
    after = (await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)).items
    assert target.id in [x.id for x in after]
    assert next(x for x in after if x.id == target.id).limit == 5


async def test_prune_leaves_a_resource_deleted_and_made_again_imperatively(admin):
    await apply(admin, example_files())
    await admin.RemoveModel(pb.RemoveModelRequest(name="llama-3-8b"), metadata=AUTH)
    backend = pb.Backend(url="http://127.0.0.1:8001", kind="vllm")
    await admin.AddModel(pb.AddModelRequest(name="llama-3-8b", backend=backend), metadata=AUTH)
    files = [f for f in example_files() if f.name != "models.yaml"]
    files.append(doc("Model", "other", {"backends": [{"url": "http://127.0.0.1:8002"}]}))
    resp = await apply(admin, files, prune=True)
    assert "Model/llama-3-8b" not in actions(resp)
    model = (await admin.GetModel(pb.GetModelRequest(name="llama-3-8b"), metadata=AUTH)).model
    assert [b.url for b in model.backends] == ["http://127.0.0.1:8001"]


async def test_an_export_after_a_tenant_is_deleted_still_applies_back(admin):
    await apply(admin, example_files())
    await admin.DeleteTenant(pb.DeleteTenantRequest(tenant="acme"), metadata=AUTH)
    exported = await admin.ExportResources(pb.ExportResourcesRequest(), metadata=AUTH)
    assert "acme-requests" not in exported.yaml  # its limits went with it
    resp = await apply(admin, [pb.SourceFile(name="export.yaml", content=exported.yaml)])
    assert set(actions(resp).values()) == {"unchanged"}
