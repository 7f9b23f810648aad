"""Metering through real Envoy: mixed traffic with the meter SIGKILLed mid-run, with a graceful
Envoy restart (SIGHUP to `tessera up`) mid-run, with Envoy SIGKILLed mid-run (its unflushed lines
lost), and with Envoy and the meter killed and the log directory deleted. The ledger must hold
exactly one row per request the client saw answered, with the tokens the upstream reported (cut
streams estimated and flagged; requests whose lines were lost billed by the usage backstop as
estimated and flagged). The ledger is read straight from the stack's SQLite file; the upstream's
reported usage from the demo upstream's record of what it sent."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.conftest import TESSERA, start_stack, stop_stack
from tests.e2e.test_gateway import eventually
from tests.e2e.test_routing import wait_routed
from tests.upstream import Upstream

pytestmark = pytest.mark.envoy

KINDS = ("json", "stream_usage", "stream_plain", "cut")
INGEST_TIMEOUT = 20.0
WORKERS = 6  # client threads: at most this many requests in flight at any moment
# The usage backstop on a short fuse: a request admitted 3 s ago whose line has not been
# billed is billed as estimated (the default, 900 s, outlasts any request and meter lag).
BACKSTOP_ENV = {
    "TESSERA_BACKSTOP_AFTER_SECONDS": "3",
    "TESSERA_BACKSTOP_HOLD_SECONDS": "5",
    "TESSERA_METER__BACKSTOP_POLL_SECONDS": "0.3",
}


@dataclass
class Outcome:
    kind: str
    request_id: str | None  # None: the request never got an answer (e.g. Envoy restarting)
    completed: bool


def _one(stack, model: str, key: str, kind: str, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "meter me please " * rng.randint(1, 5)}],
        "max_tokens": rng.randint(3, 12),
    }
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    if kind != "json":
        body["stream"] = True
    if kind == "stream_usage":
        body["stream_options"] = {"include_usage": True}
    if kind == "cut":
        body["max_tokens"] = 40
        headers["x-demo-delay-ms"] = "30"  # slow enough that the client leaves mid-stream
    req = urllib.request.Request(  # noqa: S310 - the test's own gateway
        f"{stack.gateway}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            rid = resp.headers.get("x-request-id")
            if kind == "json":
                resp.read()
                return Outcome(kind, rid, completed=True)
            events = 0
            for raw in resp:
                chunk = raw.decode().strip()
                events += chunk.startswith("data: {")
                if kind == "cut" and events >= 2:
                    return Outcome(kind, rid, completed=False)  # closing the response cuts it
                if chunk == "data: [DONE]":
                    return Outcome(kind, rid, completed=True)
            return Outcome(kind, rid, completed=False)
    except urllib.error.HTTPError as exc:
        return Outcome(kind, exc.headers.get("x-request-id"), completed=False)
    except OSError:
        time.sleep(0.2)  # a client's backoff: Envoy is restarting
        return Outcome(kind, None, completed=False)  # no answer (e.g. while Envoy restarts)


def _load(stack, model: str, key: str, n: int, at_third: Callable[[], None]) -> list[Outcome]:
    plan = [KINDS[i % len(KINDS)] for i in range(n)]
    random.Random(n).shuffle(plan)  # noqa: S311 - test traffic
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    queue = list(enumerate(plan))
    fired = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - test traffic, not secrets
        while True:
            with lock:
                if not queue:
                    return
                i, kind = queue.pop()
            if i == n // 3 and not fired.is_set():
                fired.set()
                at_third()
            out = _one(stack, model, key, kind, rng)
            with lock:
                outcomes.append(out)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fired.is_set()
    return outcomes


def _ledger(stack, tenant_id: str) -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(f"file:{stack.root / 'tessera.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT request_id, node, status, prompt_tokens, completion_tokens, usage_estimated, streamed,"
            " model, backstop FROM usage_records WHERE tenant_id = ?",
            (tenant_id,),
        ).fetchall()
    finally:
        db.close()
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a request id twice in the ledger"
    return {r["request_id"]: dict(r) for r in rows}


def _tenant_id(stack, name: str) -> str:
    return str(stack.cli_json("tenants", "get", name)["tenant"]["id"])


def _check_ledger(
    stack, upstream: Upstream, tenant: str, outcomes: list[Outcome], *, lost_lines: bool = False
) -> dict[str, dict[str, Any]]:
    """Every answered request is in the ledger once; tokens are what the upstream reported.
    ``lost_lines``: Envoy died with lines unflushed, so the usage backstop billed some requests
    as estimated: those answered, and at most one per client thread that got no answer."""
    answered = [o for o in outcomes if o.request_id]
    completed = [o for o in answered if o.completed]
    assert len(completed) >= len(outcomes) // 2, outcomes  # the run really ran
    tenant_id = _tenant_id(stack, tenant)

    def all_in() -> dict[str, dict[str, Any]]:
        ledger = _ledger(stack, tenant_id)
        missing = [o.request_id for o in answered if o.request_id not in ledger]
        assert not missing, f"{len(missing)} answered requests not in the ledger yet"
        return ledger

    ledger = eventually(all_in, timeout=INGEST_TIMEOUT, interval=0.5)
    backstopped = {rid for rid, row in ledger.items() if row["backstop"]}
    assert bool(backstopped) == lost_lines, backstopped  # only when lines were lost, and then some
    for rid in backstopped:
        row = ledger[rid]
        assert (row["status"], row["usage_estimated"]) == (0, 1), row  # flagged: estimated, status unknown
        assert row["prompt_tokens"] > 0
        assert row["completion_tokens"] >= 3  # what was reserved (its max_tokens): never free
    # Billed but never answered: in flight when Envoy died (the client got no answer).
    unanswered = backstopped - {o.request_id for o in answered}
    assert len(unanswered) <= WORKERS, unanswered
    reported = {
        r["headers"].get("x-request-id"): r.get("usage")
        for r in upstream.requests()
        if r["path"].endswith("/completions")
    }
    for o in completed:
        row = ledger[o.request_id]
        if row["backstop"]:
            continue  # its line was lost: estimated (checked above)
        usage = reported[o.request_id]
        assert usage is not None, o  # a completed request's usage was sent (include_usage forced on)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert row["usage_estimated"] == 0
        assert bool(row["streamed"]) == (o.kind != "json")
    for o in answered:
        row = ledger[o.request_id]
        if not o.completed and reported.get(o.request_id) is None:
            assert row["usage_estimated"] == 1, (o, row)  # cut before its usage: estimated, flagged
            assert row["completion_tokens"] >= 2  # at least what was sent; never zero
    # Nothing in the ledger that no request of this run made.
    assert set(ledger) - unanswered <= {r["headers"].get("x-request-id") for r in upstream.requests()} | {
        o.request_id for o in answered
    }
    return ledger


def _setup(stack, upstreams) -> tuple[str, str, str, Upstream]:
    model, tenant = f"meter{time.monotonic_ns()}", f"meter{time.monotonic_ns()}"
    upstream = Upstream(model, "metered")
    upstreams.append(upstream)
    stack.cli("models", "add", model, "--backend", upstream.url)
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    wait_routed(stack.client(key), model)
    return model, tenant, key, upstream


def test_a_meter_killed_mid_run_loses_and_doubles_nothing(stack, upstreams):
    model, tenant, key, upstream = _setup(stack, upstreams)
    killed: list[int] = []

    def kill_meter() -> None:
        pid = stack.endpoints()["pids"]["meter"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    outcomes = _load(stack, model, key, 120, kill_meter)
    ledger = _check_ledger(stack, upstream, tenant, outcomes)
    print(f"meter SIGKILL: {_counts(outcomes, ledger)}")  # noqa: T201 - docs/operations.md
    assert killed
    assert stack.endpoints()["pids"]["meter"] != killed[0]  # the supervisor started a new one
    assert {o.kind for o in outcomes if o.completed} == {"json", "stream_usage", "stream_plain"}
    assert any(r["usage_estimated"] for r in ledger.values())  # the cut streams

    # The usage API sums the same ledger (its hourly rollups).
    got = stack.cli_json("usage", "--tenant", tenant, "--group-by", "model")
    (row,) = got["rows"]
    assert row["model"] == model
    assert int(row["requests"]) == len(ledger)
    assert int(row["prompt_tokens"]) == sum(r["prompt_tokens"] for r in ledger.values())
    assert int(row["total_tokens"]) == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in ledger.values()
    )


def test_a_graceful_envoy_restart_mid_run_loses_and_doubles_nothing(stack, upstreams):
    model, tenant, key, upstream = _setup(stack, upstreams)
    supervisor = stack.endpoints()["supervisor_pid"]
    envoy_before = stack.endpoints()["pids"]["envoy"]
    outcomes = _load(stack, model, key, 120, lambda: os.kill(supervisor, signal.SIGHUP))
    _check_ledger(stack, upstream, tenant, outcomes)

    def restarted() -> None:
        assert stack.endpoints()["pids"]["envoy"] != envoy_before

    eventually(restarted, timeout=30, interval=0.2)
    wait_routed(stack.client(key), model, timeout=15)  # and the gateway serves again


def _counts(outcomes: list[Outcome], ledger: dict[str, dict[str, Any]]) -> str:
    """What a fault run's table in docs/operations.md shows: the run's requests only (not the
    set-up's), billed ones answered plus those billed in flight (by the backstop, unanswered)."""
    answered = {o.request_id for o in outcomes if o.request_id}
    backstop = {rid for rid, r in ledger.items() if r["backstop"]}
    billed = len(answered & set(ledger)) + len(backstop - answered)
    return (
        f"sent {len(outcomes)} answered {len(answered)} billed {billed} backstop {len(backstop)}"
        f" (in flight, unanswered: {len(backstop - answered)})"
    )


def _wait_replaced(stack, name: str, pid: int) -> None:
    eventually(lambda: stack.endpoints()["pids"][name] != pid or 1 / 0, timeout=30, interval=0.2)


def test_an_envoy_sigkilled_under_load_bills_every_answered_request_once(tmp_path, upstreams):
    """Envoy SIGKILLed mid-run: the usage lines it had not flushed (up to 200 ms of answers) are
    gone. The usage backstop bills those requests from their admissions, as estimated and
    flagged; no request is billed twice, none answered is missing."""
    stack = start_stack(tmp_path / "stack", env_extra=BACKSTOP_ENV)
    try:
        model, tenant, key, upstream = _setup(stack, upstreams)
        time.sleep(1.5)  # the set-up's own requests are billed before anything is lost
        envoy = stack.endpoints()["pids"]["envoy"]
        outcomes = _load(stack, model, key, 180, lambda: os.kill(envoy, signal.SIGKILL))
        _wait_replaced(stack, "envoy", envoy)
        ledger = _check_ledger(stack, upstream, tenant, outcomes, lost_lines=True)
        print(f"envoy SIGKILL: {_counts(outcomes, ledger)}")  # noqa: T201 - docs/operations.md
    finally:
        stop_stack(stack)


def test_envoy_and_meter_killed_and_the_log_directory_lost_bill_every_answered_request_once(
    tmp_path, upstreams
):
    """The Envoy pod's log volume lost (simulated: Envoy and the meter SIGKILLed, the log directory
    deleted with whatever the meter had not read): the backstop bills those requests."""
    stack = start_stack(tmp_path / "stack", env_extra=BACKSTOP_ENV)
    try:
        model, tenant, key, upstream = _setup(stack, upstreams)
        time.sleep(1.5)  # the set-up's own requests are billed before anything is lost
        pids = stack.endpoints()["pids"]

        def lose_the_volume() -> None:
            os.kill(pids["meter"], signal.SIGKILL)
            os.kill(pids["envoy"], signal.SIGKILL)
            shutil.rmtree(stack.root / "logs")

        outcomes = _load(stack, model, key, 180, lose_the_volume)
        _wait_replaced(stack, "envoy", pids["envoy"])
        _wait_replaced(stack, "meter", pids["meter"])
        ledger = _check_ledger(stack, upstream, tenant, outcomes, lost_lines=True)
        print(f"log volume lost: {_counts(outcomes, ledger)}")  # noqa: T201 - docs/operations.md
        wait_routed(stack.client(key), model, timeout=15)  # the gateway serves and logs again
    finally:
        stop_stack(stack)


def test_a_stack_stopped_mid_run_bills_every_answered_request_before_it_exits(tmp_path, upstreams):
    """SIGTERM to `tessera up` under load, as a rollout or scale-down does: Envoy drains, then the
    meter reads the usage log to its end before it exits. Read from the database once everything
    has exited: every request that got an answer is in the ledger once."""
    stack = start_stack(tmp_path / "stack")
    stopped: list[int] = []
    try:
        model, tenant, key, _ = _setup(stack, upstreams)
        tenant_id = _tenant_id(stack, tenant)
        stopper = threading.Thread(target=lambda: stopped.append(stop_stack(stack)))
        outcomes = _load(stack, model, key, 150, stopper.start)
        stopper.join(60)
    finally:
        stop_stack(stack)
    assert stopped == [0]
    answered = {o.request_id for o in outcomes if o.request_id}
    assert len(answered) >= 150 // 3  # the run ran before the stop
    ledger = _ledger(stack, tenant_id)
    assert answered <= set(ledger), f"{len(answered - set(ledger))} answered requests never billed"
    print(f"tessera up SIGTERM: {_counts(outcomes, ledger)}")  # noqa: T201 - docs/operations.md
    meter_log = (stack.root / "logs" / "meter.log").read_text()
    assert "meter_stopped" in meter_log


def test_usage_csv_and_json_and_bad_input(stack):
    tenant = f"use{time.monotonic_ns()}"
    stack.cli("tenants", "create", tenant)
    key = stack.new_key(tenant)
    client = stack.client(key)
    for n in (3, 5):
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=n
        )

    def counted() -> dict[str, Any]:
        doc = stack.cli_json("usage", "--tenant", tenant, "--group-by", "key")
        assert doc["rows"]
        assert int(doc["rows"][0]["requests"]) == 2
        return doc

    doc = eventually(counted, timeout=INGEST_TIMEOUT, interval=0.5)
    (row,) = doc["rows"]
    assert int(row["completion_tokens"]) == 8
    fields = {"key_id", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_micros"}
    assert set(row) >= {*fields, "currency"}
    csv = subprocess.run(
        [
            TESSERA,
            "usage",
            "--tenant",
            tenant,
            "--group-by",
            "day",
            "--data-dir",
            str(stack.root),
            "-o",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert csv[0].startswith("DAY,REQUESTS,PROMPT_TOKENS,COMPLETION_TOKENS,TOTAL_TOKENS")
    assert csv[1].split(",")[1] == "2"
    bad = stack.cli("usage", "--tenant", tenant, "--from", "2026-13-45", check=False)
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr
    flipped = stack.cli(
        "usage", "--tenant", tenant, "--from", "2026-11-02", "--to", "2026-11-01", check=False
    )
    assert "INVALID_ARGUMENT" in flipped.stderr
    assert json.loads(
        stack.cli("usage", "--tenant", tenant, "--from", "2020-01-01", "--to", "2020-01-02").stdout
    ) == {
        "rows": [],
        "from": "2020-01-01T00:00:00Z",
        "to": "2020-01-02T00:00:00Z",
    }
