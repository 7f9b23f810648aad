"""Key lifecycle through real Envoy with the openai client: rotation grace, revocation, suspension."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from datetime import UTC, datetime

import openai
import pytest

from tests.e2e.conftest import TESSERA
from tests.e2e.test_gateway import eventually

pytestmark = pytest.mark.envoy


def chat(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=1)


def refused(client: openai.OpenAI, code: str) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        chat(client)
    assert err.value.code == code


def _tenant(stack) -> str:
    name = f"kl{uuid.uuid4().hex[:10]}"
    stack.cli("tenants", "create", name)
    return name


def test_rotated_key_old_secret_works_until_grace_then_refused(stack):
    tenant = _tenant(stack)
    created = stack.cli_json("keys", "create", "--tenant", tenant)
    old = stack.client(created["key"])
    eventually(lambda: chat(old))
    rotated = stack.cli_json("keys", "rotate", created["id"], "--grace", "3s", "--rotation-id", "r1")
    assert rotated["id"] == created["id"]
    assert rotated["key"]
    assert rotated["key"] != created["key"]
    new = stack.client(rotated["key"])
    eventually(lambda: chat(new))
    chat(old)  # still inside the grace period
    grace_until = datetime.fromisoformat(rotated["grace_until"])
    assert grace_until > datetime.now(UTC)
    # A retry of the same rotation mints nothing new: same secret id and prefix, no secret.
    retry = stack.cli_json("keys", "rotate", created["id"], "--grace", "3s", "--rotation-id", "r1")
    assert (retry["secret_id"], retry["prefix"], retry["key"]) == (
        rotated["secret_id"],
        rotated["prefix"],
        "",
    )
    time.sleep(max(0.0, (grace_until - datetime.now(UTC)).total_seconds()) + 1.0)
    refused(old, "api_key_expired")
    chat(new)
    listed = stack.cli_json("keys", "get", created["id"])["api_key"]
    assert listed["secret_id"] == rotated["secret_id"]
    assert listed["last_rotation_time"]


def test_revoked_key_is_refused_within_a_second(stack):
    tenant = _tenant(stack)
    created = stack.cli_json("keys", "create", "--tenant", tenant)
    client = stack.client(created["key"])
    eventually(lambda: chat(client))
    stack.cli("keys", "revoke", created["id"])
    revoked_at = time.monotonic()
    eventually(lambda: refused(client, "api_key_revoked"), timeout=1.0)
    assert time.monotonic() - revoked_at <= 1.0 + 0.2
    assert stack.cli_json("keys", "get", created["id"])["api_key"]["status"] == "revoked"


def test_suspended_tenant_keys_are_refused_within_a_second_and_resume_restores(stack):
    tenant = _tenant(stack)
    clients = [stack.client(stack.cli_json("keys", "create", "--tenant", tenant)["key"]) for _ in range(2)]
    for c in clients:
        eventually(lambda c=c: chat(c))
    stack.cli("tenants", "suspend", tenant)
    for c in clients:
        eventually(lambda c=c: refused(c, "invalid_api_key"), timeout=1.0)
    stack.cli("tenants", "resume", tenant)
    for c in clients:
        eventually(lambda c=c: chat(c), timeout=1.0)


def test_deleted_tenant_keys_are_revoked_and_its_audit_trail_kept(stack):
    tenant = _tenant(stack)
    created = stack.cli_json("keys", "create", "--tenant", tenant)
    client = stack.client(created["key"])
    eventually(lambda: chat(client))
    result = stack.cli_json("tenants", "delete", tenant)
    assert result["tenant"]["status"] == "deleted"
    assert result["revoked_keys"] == 1
    eventually(lambda: refused(client, "api_key_revoked"), timeout=1.0)
    events = stack.cli_json("audit", "list", "--tenant", tenant)["items"]
    assert [e["action"] for e in events] == ["tenant.create", "api_key.create", "tenant.delete"]


def test_admin_bootstrap_creates_the_first_platform_admin_once(stack, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {
        "TESSERA_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'boot.db'}",
        "TESSERA_PEPPER__FILE": str(stack.root / "pepper"),
    }
    subprocess.run(
        [TESSERA, "control-plane", "migrate"], env=env, check=True, capture_output=True, timeout=60
    )
    first = subprocess.run(
        [TESSERA, "admin", "bootstrap", "ops@example.com", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    import json  # noqa: PLC0415

    doc = json.loads(first.stdout)
    assert doc["key"].startswith("tadm_")
    assert doc["principal"]["bindings"] == [{"role": "platform-admin"}]
    assert doc["key"] not in first.stderr
    again = subprocess.run(
        [TESSERA, "admin", "bootstrap", "other@example.com"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode != 0
    assert "already exists" in again.stderr
