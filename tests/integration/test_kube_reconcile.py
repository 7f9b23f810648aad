"""The Kubernetes controller's reconcile core (control_plane/resources/kube.py) on the real
control plane: custom-resource objects as the API server lists them → the store, and the Ready
condition each object gets. No kube-apiserver runs here, so the watch and the status patch
(lightkube) are not exercised; everything they call is."""

from __future__ import annotations

from datetime import UTC, datetime

import yaml

from control_plane.resources.kube import reconcile
from tessera.admin.v1 import admin_pb2 as pb
from tests.configmap import example_texts
from tests.integration.conftest import ADMIN_TOKEN

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def objects(**replace: str) -> list[dict]:
    """The example documents as the API server returns them: with metadata it adds."""
    out = []
    for text in example_texts(**replace).values():
        for doc in yaml.safe_load_all(text):
            doc["metadata"] |= {"namespace": "tessera", "generation": 3, "uid": "u", "resourceVersion": "9"}
            doc["status"] = {"conditions": []}
            out.append(doc)
    return out


async def limits(admin) -> list[int]:
    resp = await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)
    return sorted(x.limit for x in resp.items)


async def test_every_object_is_applied_and_ready(app, admin):
    conditions = await reconcile(app.applier, objects())
    assert len(conditions) == 8
    assert all(c.ready and c.reason == "Applied" for c in conditions.values())
    assert conditions[("Tenant", "acme")].message == "created"
    assert await limits(admin) == [5, 100000]
    status = conditions[("Tenant", "acme")].status(3, datetime(2030, 1, 2, tzinfo=UTC))
    assert status["observedGeneration"] == 3
    assert status["conditions"][0] | {} == {
        "type": "Ready",
        "status": "True",
        "reason": "Applied",
        "message": "created",
        "lastTransitionTime": "2030-01-02T00:00:00Z",
        "observedGeneration": 3,
    }
    again = await reconcile(app.applier, objects())
    assert {c.message for c in again.values()} == {"unchanged"}


async def test_an_invalid_object_is_reported_alone_and_its_resource_left_as_it_was(app, admin):
    await reconcile(app.applier, objects())
    objs = objects(**{"limit: 5": "limit: 7"})
    bad = next(o for o in objs if o["metadata"]["name"] == "acme-llama-tokens")
    bad["spec"]["window"] = "fortnight"
    conditions = await reconcile(app.applier, objs)
    bad_condition = conditions[("Limit", "acme-llama-tokens")]
    assert (bad_condition.ready, bad_condition.reason) == (False, "Rejected")
    assert "window: must be one of" in bad_condition.message
    assert conditions[("Limit", "acme-requests")].ready is True  # the other change went in
    assert await limits(admin) == [7, 100000]  # the invalid one's limit was kept, not pruned


async def test_a_deleted_object_is_pruned_even_the_last_of_its_kind(app, admin):
    await reconcile(app.applier, objects())
    await reconcile(app.applier, [o for o in objects() if o["kind"] != "Limit"])
    assert await limits(admin) == []


async def test_an_object_naming_a_missing_tenant_is_rejected_and_the_rest_applied(app, admin):
    await reconcile(app.applier, objects())
    objs = objects(**{"limit: 5": "limit: 6", "tenant: acme\n  model": "tenant: nobody\n  model"})
    conditions = await reconcile(app.applier, objs)
    rejected = {k: c for k, c in conditions.items() if not c.ready}
    assert list(rejected) == [("Limit", "acme-llama-tokens")]
    assert "no tenant 'nobody'" in rejected[("Limit", "acme-llama-tokens")].message
    assert await limits(admin) == [6, 100000]  # the rejected object's limit stays as it was


async def test_objects_the_controller_applied_are_not_its_to_take_from_another_manager(app, admin):
    files = [pb.SourceFile(name=n, content=c) for n, c in example_texts().items()]
    await admin.ApplyResources(pb.ApplyResourcesRequest(files=files), metadata=AUTH)
    changed = await reconcile(app.applier, objects(**{"limit: 5": "limit: 8"}))
    assert not changed[("Limit", "acme-requests")].ready
    assert "tessera-apply" in changed[("Limit", "acme-requests")].message
    assert all(c.ready for k, c in changed.items() if k != ("Limit", "acme-requests"))
    assert await limits(admin) == [5, 100000]
