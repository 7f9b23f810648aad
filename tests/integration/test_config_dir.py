"""The control plane keeps a directory of documents applied (``config_dir``), updated the way
kubelet updates a ConfigMap volume: a new ``..<timestamp>`` folder, then an atomic swap of the
``..data`` symlink the files point through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from control_plane.app import App, build_app
from control_plane.resources.config_dir import ConfigDirSource
from tessera.admin.v1 import admin_pb2 as pb
from tests.configmap import example_texts, kubelet_update
from tests.integration.conftest import ADMIN_TOKEN, Admin, control_plane_settings

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def examples(**replace: str) -> dict[str, str]:
    return example_texts(**replace)


@pytest.fixture
async def watched(db_url, pepper, tmp_path) -> AsyncIterator[tuple[App, Admin, Path]]:
    directory = tmp_path / "resources"
    directory.mkdir()
    kubelet_update(directory, examples())
    settings = control_plane_settings(db_url, pepper).model_copy(
        update={"config_dir": directory, "config_dir_poll_seconds": 0.2}
    )
    app = await build_app(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as ch:
        yield app, Admin(ch), directory
    await app.stop(0)


async def eventually(fetch, predicate, timeout: float = 2.0):
    """``await fetch()`` until ``predicate`` holds for it, within ``timeout`` seconds (the issue's
    bound for a change to take effect); returns the value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: last {value!r}")
        await asyncio.sleep(0.05)


async def limit_values(admin: Admin) -> list[int]:
    try:
        resp = await admin.ListLimits(pb.ListLimitsRequest(tenant="acme"), metadata=AUTH)
    except grpc.aio.AioRpcError:
        return []
    return sorted(x.limit for x in resp.items)


def rejected() -> float:
    return REGISTRY.get_sample_value("tessera_config_dir_applies_total", {"result": "rejected"}) or 0.0


async def test_the_directory_is_applied_at_start_and_a_symlink_swap_within_two_seconds(watched):
    _, admin, directory = watched
    await eventually(lambda: limit_values(admin), lambda v: v == [5, 100000], timeout=10)
    kubelet_update(directory, examples(**{"limit: 5": "limit: 9"}))
    await eventually(lambda: limit_values(admin), lambda v: v == [9, 100000])
    audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000), metadata=AUTH)
    assert [e.actor for e in audit.items if e.action == "limit.update"] == ["config-dir"]


async def test_a_broken_document_changes_nothing_and_is_reported(watched, capsys):
    _, admin, directory = watched
    await eventually(lambda: limit_values(admin), lambda v: v == [5, 100000], timeout=10)
    before = rejected()
    broken = examples(**{"limit: 5": "limit: 9"})  # a good change beside a broken document
    broken["zz-broken.yaml"] = (
        "apiVersion: tessera.dev/v1alpha1\nkind: Limit\nmetadata: {name: x}\nspec: {kind: nope}\n"
    )
    kubelet_update(directory, broken)
    await eventually(lambda: asyncio.sleep(0), lambda _: rejected() > before)
    assert await limit_values(admin) == [5, 100000]  # neither the good nor the broken change
    out = capsys.readouterr().out
    assert "config_dir_rejected" in out
    assert "zz-broken.yaml#1: Limit/x" in out
    # fixed: applied at once
    kubelet_update(directory, examples(**{"limit: 5": "limit: 9"}))
    await eventually(lambda: limit_values(admin), lambda v: v == [9, 100000])


async def test_a_document_removed_from_the_directory_is_pruned(watched):
    _, admin, directory = watched
    await eventually(lambda: limit_values(admin), lambda v: v == [5, 100000], timeout=10)
    files = examples()
    files["limits.yaml"] = files["limits.yaml"].split("---")[0]
    kubelet_update(directory, files)
    await eventually(lambda: limit_values(admin), lambda v: v == [5])


async def test_a_plain_directory_is_applied_only_once_two_reads_agree(app, admin, tmp_path):
    """No atomic swap without kubelet: a file caught half written (here: cut before a tenant)
    must not be applied with prune; the next poll reads it whole."""
    directory = tmp_path / "plain"
    directory.mkdir()
    source = ConfigDirSource(directory, app.applier, poll_seconds=1)
    full = examples()
    for name, text in full.items():
        (directory / name).write_text(text)
    await source.sync()
    assert await limit_values(admin) == []  # one read: not yet
    await source.sync()
    assert await limit_values(admin) == [5, 100000]
    cut = full["tenants.yaml"].split("---")[0]  # globex cut off mid-write
    (directory / "tenants.yaml").write_text(cut)
    await source.sync()
    (directory / "tenants.yaml").write_text(full["tenants.yaml"])  # the write completes
    await source.sync()
    await source.sync()
    tenant = await admin.GetTenant(pb.GetTenantRequest(tenant="globex"), metadata=AUTH)
    assert tenant.tenant.status == "active"
