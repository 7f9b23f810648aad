"""Tessera as replicas (issue 15): two whole stacks on one PostgreSQL and one Redis, each with its
own control plane, Envoy and meter, ext_authz and ratelimit. Under load on both gateways each
kind of component is SIGKILLed in turn (the supervisor restarts it); afterwards a revocation
written on one replica reaches both gateways within a second, and the ledger holds every request
answered 200, once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import psycopg
import pytest

from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.e2e.test_admission import tenant as admission_tenant
from tests.e2e.test_gateway import eventually, http

pytestmark = [pytest.mark.envoy, pytest.mark.postgres, pytest.mark.redis]

# (stack, component) SIGKILLed in turn, each while both gateways are under load. Envoy is not in
# the list: a SIGKILLed Envoy loses the usage lines it had not flushed (docs/operations.md).
KILLS = [(0, "ext-authz"), (1, "ratelimit"), (0, "control-plane"), (1, "meter"), (1, "ext-authz")]
# What a request may get while a component is down: 503 while its ext_authz restarts (fail
# closed: never let through unchecked), else 200 (ratelimit down: the token limit fails open).
ALLOWED = {200, 503}


class Client:
    """Posts chat completions and keeps every outcome: (status, the x-request-id answered)."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()

    def post(self, stack: Stack, key: str) -> int:
        body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        status, got, _ = http(
            "POST", f"{stack.gateway}/v1/chat/completions", json.dumps(body).encode(), headers
        )
        with self._lock:
            self.outcomes.append((status, got.get("x-request-id")))
        return status

    def answered(self) -> set[str]:
        ids = [rid for status, rid in self.outcomes if status == 200]
        assert None not in ids  # each answer carries its own id
        assert len(ids) == len(set(ids))
        return {rid for rid in ids if rid is not None}


def _ledger(postgres_url: str, tenant_id: str) -> dict[str, int]:
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT request_id, status FROM usage_records WHERE tenant_id = %s", (tenant_id,)
        ).fetchall()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a request billed twice"
    return {r[0]: r[1] for r in rows}


def _kill(stack: Stack, child: str) -> None:
    pid = stack.endpoints()["pids"][child]
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: stack.endpoints()["pids"][child] != pid or 1 / 0, timeout=15, interval=0.2)


def test_replicas_under_load_survive_each_component_killed_and_bill_exactly(
    tmp_path, postgres_url, redis_url
):
    a = start_stack(tmp_path / "a", "--db", postgres_url, "--redis", redis_url)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "pepper", tmp_path / "b" / "pepper")  # replicas share the pepper
    b = start_stack(tmp_path / "b", "--db", postgres_url, "--redis", redis_url)
    stacks = [a, b]
    client = Client()
    try:
        tenant, key = admission_tenant(a, ["--kind", "tokens", "--window", "hour", "--limit", "100000000"])
        tenant_id = a.cli_json("tenants", "get", tenant)["tenant"]["id"]
        eventually(lambda: client.post(b, key) == 200 or 1 / 0, timeout=5, interval=0.1)  # b has it

        stop = threading.Event()
        during: list[int] = []

        def load(stack: Stack) -> None:
            while not stop.is_set():
                during.append(client.post(stack, key))

        loaders = [threading.Thread(target=load, args=(s,)) for s in stacks]
        for t in loaders:
            t.start()
        try:
            for index, child in KILLS:
                time.sleep(1.0)
                _kill(stacks[index], child)
            # both gateways answer again (each restarted child is back) before the load stops
            eventually(lambda: {client.post(s, key) for s in stacks} == {200} or 1 / 0, timeout=30)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in loaders:
                t.join()
        assert set(during) <= ALLOWED, sorted(set(during))
        assert during[-20:] == [200] * 20  # recovered
        assert during.count(200) > len(during) // 2

        # a revocation written on a's control plane: both gateways refuse the key within 1 s
        other = a.new_key(tenant)
        listed = a.cli_json("keys", "list", "--tenant", tenant)["items"]
        (key_id,) = [k["id"] for k in listed if other.startswith(k["prefix"])]
        eventually(lambda: client.post(b, other) == 200 or 1 / 0, timeout=5, interval=0.1)
        a.cli("keys", "revoke", key_id)
        revoked = time.monotonic()
        eventually(
            lambda: {client.post(s, other) for s in stacks} == {401} or 1 / 0, timeout=5, interval=0.05
        )
        assert time.monotonic() - revoked <= 1.0

        # every request answered 200 is in the ledger once, and no other request is billed as one
        answered = client.answered()

        def billed() -> dict[str, int]:
            ledger = _ledger(postgres_url, tenant_id)
            missing = answered - set(ledger)
            assert not missing, f"{len(missing)} answered requests not billed yet"
            return ledger

        ledger = eventually(billed, timeout=30, interval=0.5)
        assert {rid for rid, status in ledger.items() if status == 200} == answered
    finally:
        for s in reversed(stacks):
            stop_stack(s)
