"""Declarative resources against the running stack, driven as an operator would: `tessera
apply/diff/get` on files, and the stack's --config-dir updated like a ConfigMap volume. The
gateway serves what the documents declare within 2 s (the issue's bound)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.configmap import example_texts, kubelet_update
from tests.e2e.conftest import TESSERA, Stack
from tests.e2e.test_gateway import http
from tests.upstream import Upstream

pytestmark = pytest.mark.envoy
BOUND = 2.0


def tessera(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TESSERA, *args, "--data-dir", str(stack.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def upstream_of() -> Iterator[Callable[[str], Upstream]]:
    """A demo upstream (a vLLM stand-in) serving one model name; stopped after the test."""
    started: list[Upstream] = []

    def start(model: str) -> Upstream:
        started.append(Upstream(model, model))
        return started[-1]

    yield start
    for u in started:
        u.stop()


def renamed(upstream: Upstream, tag: str, **more: str) -> dict[str, str]:
    """The example set with names of this test's own, its model served by ``upstream``."""
    return example_texts(
        **{
            "http://127.0.0.1:8000": upstream.url,
            "llama-3-8b": f"llama-{tag}",
            "gpt-4o-mini": f"mini-{tag}",
            "acme": f"acme-{tag}",
            "globex": f"globex-{tag}",
            "name: starter": f"name: starter-{tag}",
            "plan: starter": f"plan: starter-{tag}",
            "name: pro": f"name: pro-{tag}",
            "plan: pro": f"plan: pro-{tag}",
        },
        **more,
    )


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def chat(stack: Stack, key: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    status, _, _ = http("POST", f"{stack.gateway}/v1/chat/completions", json.dumps(body).encode(), headers)
    return status


def served_within(stack: Stack, key: str, model: str, since: float) -> float:
    """Seconds from ``since`` until the gateway answers 200 for ``model``."""
    while (status := chat(stack, key, model)) != 200:
        assert time.monotonic() - since < BOUND, f"still {status} after {BOUND} s"
        time.sleep(0.05)
    return time.monotonic() - since


def not_near_a_minute_boundary() -> None:
    """Request limits count calendar minutes: start a count early in one."""
    if time.gmtime().tm_sec > 45:
        time.sleep(61 - time.gmtime().tm_sec)


def test_apply_from_empty_serves_the_declared_models_and_limits_and_diff_is_clean(
    stack, tmp_path, upstream_of
):
    tag = f"a{time.monotonic_ns() % 10**9}"
    upstream = upstream_of(f"llama-{tag}")
    not_near_a_minute_boundary()
    folder = write(tmp_path / "resources", renamed(upstream, tag))
    before = len(stack.cli_json("audit", "list", "--limit", "1000")["items"])
    applied = tessera(stack, "apply", "-f", str(folder))
    started = time.monotonic()
    assert applied.returncode == 0, applied.stderr
    assert f"tenant.tessera.dev/acme-{tag} created" in applied.stdout
    assert f"admin key of acme-{tag}-ops (shown once): tadm_" in applied.stdout
    # served within 2 s (asked with globex's key: its plan's limit is not the one counted below)
    served_within(stack, stack.new_key(f"globex-{tag}"), f"llama-{tag}", started)
    key = stack.new_key(f"acme-{tag}")
    time.sleep(1.0)  # a new key is live everywhere within 1 s
    # the alias routes too; acme's declared 5 requests a minute hold
    statuses = [chat(stack, key, f"mini-{tag}") for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2, statuses
    # a model the tenant is not allowed: the tenant's allowedModels hold
    assert chat(stack, key, "demo") == 404

    diff = tessera(stack, "diff", "-f", str(folder))
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert diff.stdout == ""

    # one file changed: one resource, one audit record
    created = len(stack.cli_json("audit", "list", "--limit", "1000")["items"])
    assert created > before
    (folder / "plans.yaml").write_text(
        (folder / "plans.yaml").read_text().replace("priority: 5", "priority: 6")
    )
    diff = tessera(stack, "diff", "-f", str(folder))
    assert diff.returncode == 1
    assert diff.stdout.strip() == f"plan.tessera.dev/pro-{tag} updated (priority)"
    assert tessera(stack, "apply", "-f", str(folder)).returncode == 0
    events = stack.cli_json("audit", "list", "--limit", "1000")["items"]
    assert len(events) == created + 1
    assert events[-1]["action"] == "plan.update"


def test_prune_removes_only_what_apply_made_and_get_round_trips(stack, tmp_path, upstream_of):
    tag = f"p{time.monotonic_ns() % 10**9}"
    upstream = upstream_of(f"llama-{tag}")
    folder = write(tmp_path / "resources", renamed(upstream, tag))
    manager = f"e2e-{tag}"  # a set of its own: prune deletes only what its manager applied
    assert tessera(stack, "apply", "-f", str(folder), "--manager", manager).returncode == 0
    stack.cli("tenants", "create", f"imperative-{tag}")
    (folder / "principals.yaml").unlink()
    limits = (folder / "limits.yaml").read_text().split("---")
    (folder / "limits.yaml").write_text(limits[0])
    # prune touches the kinds in the files: Limit is there, Principal no longer is
    pruned = tessera(stack, "apply", "-f", str(folder), "--prune", "--manager", manager)
    assert pruned.returncode == 0, pruned.stderr
    assert [line for line in pruned.stdout.splitlines() if "deleted" in line] == [
        f"limit.tessera.dev/acme-{tag}-llama-tokens deleted"
    ]
    assert stack.cli_json("tenants", "get", f"imperative-{tag}")["tenant"]["status"] == "active"
    assert stack.cli_json("tenants", "get", "demo")["tenant"]["status"] == "active"

    # get -o yaml: the documents apply back unchanged
    exported = tessera(stack, "get", "tenants", f"acme-{tag}", "-o", "yaml")
    assert exported.returncode == 0
    assert exported.stdout.startswith("apiVersion: tessera.dev/v1alpha1\nkind: Tenant\n")
    everything = tessera(stack, "get", "all", "-o", "yaml")
    (tmp_path / "all.yaml").write_text(everything.stdout)
    back = tessera(stack, "diff", "-f", str(tmp_path / "all.yaml"))
    assert back.returncode == 0, back.stdout + back.stderr


def test_the_config_dir_of_a_running_stack_follows_a_configmap_swap_within_two_seconds(stack, upstream_of):
    tag = f"c{time.monotonic_ns() % 10**9}"
    upstream = upstream_of(f"llama-{tag}")
    directory = stack.root / "resources"
    files = renamed(upstream, tag)
    del files["principals.yaml"]
    started = time.monotonic()
    kubelet_update(directory, files)
    while (found := stack.cli("tenants", "get", f"acme-{tag}", check=False)).returncode != 0:
        assert time.monotonic() - started < BOUND, found.stderr
        time.sleep(0.05)
    key = stack.new_key(f"acme-{tag}")
    # the swap: the model's alias changes; the new name serves within 2 s
    started = time.monotonic()
    kubelet_update(
        directory, renamed(upstream, tag, **{f"mini-{tag}": f"micro-{tag}"}) | {"principals.yaml": ""}
    )
    served_within(stack, key, f"micro-{tag}", started)
    assert chat(stack, key, f"mini-{tag}") == 404

    # a broken document: nothing of the change is applied, and the log says why
    log = stack.root / "logs" / "control-plane.log"
    seen = len(log.read_text().splitlines())
    broken = renamed(upstream, tag, **{f"mini-{tag}": f"nano-{tag}"})
    del broken["principals.yaml"]
    broken["zz.yaml"] = (
        "apiVersion: tessera.dev/v1alpha1\nkind: Limit\nmetadata: {name: z}\nspec: {kind: x}\n"
    )
    kubelet_update(directory, broken)
    deadline = time.monotonic() + BOUND
    while not [line for line in log.read_text().splitlines()[seen:] if "config_dir_rejected" in line]:
        assert time.monotonic() < deadline, "the rejection was not logged"
        time.sleep(0.05)
    (rejection,) = [line for line in log.read_text().splitlines()[seen:] if "config_dir_rejected" in line]
    assert "zz.yaml#1: Limit/z" in rejection
    assert chat(stack, key, f"nano-{tag}") == 404
    assert chat(stack, key, f"micro-{tag}") == 200
    kubelet_update(directory, {})  # empty: prunes nothing (no kinds), other tests unaffected
