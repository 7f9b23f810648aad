"""`tessera up` as a supervisor: crashed children come back, SIGTERM leaves nothing behind."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest

from tests.e2e.conftest import TESSERA, start_stack, stop_stack
from tests.e2e.test_gateway import eventually, upstream_requests
from tests.proxy import ThreadedTcpProxy

pytestmark = pytest.mark.envoy


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # noqa: PTH123
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def chat(stack) -> None:
    stack.client(stack.demo_key).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "still there?"}], max_tokens=1
    )


@pytest.mark.parametrize("child", ["ext-authz", "ratelimit", "demo-upstream", "control-plane", "envoy"])
def test_sigkilled_child_is_restarted_and_the_gateway_recovers(stack, child):
    old = stack.endpoints()["pids"][child]
    os.kill(old, signal.SIGKILL)
    new = eventually(lambda: _restarted(stack, child, old), timeout=30, interval=0.2)
    assert new != old
    eventually(lambda: chat(stack), timeout=30, interval=0.2)
    # The admin API (control plane) works again too, and the restart was logged.
    eventually(lambda: stack.cli("tenants", "list"), timeout=30, interval=0.2)
    assert any(f"{child} exited" in line for line in stack.output)
    # Every stream reconnected: a new key (policy stream) and a new model (ADS) take effect.
    key = stack.new_key()
    model = f"after-{child}"
    stack.cli("models", "add", model, "--backend", stack.endpoints()["demo_upstream"])
    client = stack.client(key)
    eventually(lambda: _routed_to_upstream(client, model), timeout=3)


def _routed_to_upstream(client, model: str) -> None:
    """The request reached the demo upstream (which answers 404 itself for a name it doesn't serve)."""
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert err.value.response.headers.get("x-demo-upstream") == "demo-upstream"


def _restarted(stack, child: str, old: int) -> int:
    pid = stack.endpoints()["pids"][child]
    assert pid != old
    assert alive(pid)
    return int(pid)


def test_port_in_use_is_a_clear_startup_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [TESSERA, "up", "--port", str(port), "--admin-port", "0", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
@pytest.mark.redis
def test_sigterm_stops_every_child_on_postgres_and_redis(tmp_path, postgres_url, redis_url):
    # PostgreSQL is reached through a TCP proxy the test can cut, like a network partition.
    proxy = ThreadedTcpProxy(5432)
    db_url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    stack = start_stack(tmp_path, "--db", db_url, "--redis", redis_url)
    try:
        chat(stack)  # the whole path works on PostgreSQL + Redis too
        tenant = f"pg{time.monotonic_ns()}"
        stack.cli("tenants", "create", tenant)
        key = stack.new_key(tenant)
        stack.cli(
            "limits", "create", "--tenant", tenant, "--kind", "requests", "--window", "minute", "--limit", "1"
        )
        client = stack.client(key)
        time.sleep(1.0)
        client.models.list()
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        other = stack.client(stack.new_key(tenant))
        pids = list(stack.endpoints()["pids"].values())
        assert all(alive(p) for p in pids)
        # The database becomes unreachable after the first snapshot: decisions go on unchanged.
        proxy.cut()
        chat(stack)
        with pytest.raises(openai.AuthenticationError):
            stack.client("tsk_" + "a" * 12 + "_" + "b" * 43).models.list()
        with pytest.raises(openai.RateLimitError):
            other.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        failed = stack.cli("tenants", "create", f"down{time.monotonic_ns()}", check=False)
        assert failed.returncode == 1
        assert "UNAVAILABLE" in failed.stderr
    finally:
        code = stop_stack(stack)
        proxy.close()
    assert code == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if alive(p)] == []


def test_sigterm_lets_a_stream_in_flight_finish_and_every_child_exits_0(tmp_path):
    """A rollout's SIGTERM: Envoy drains (the stream that is running gets to its end, whole),
    then each child is asked to stop and exits 0 of its own accord, none killed."""
    stack = start_stack(tmp_path)
    client = stack.client(stack.demo_key)
    words: list[str] = []

    def stream() -> None:
        chunks = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=30,
            stream=True,
            extra_headers={"x-demo-delay-ms": "50"},  # 1.5 s of tokens
        )
        words.extend(c.choices[0].delta.content or "" for c in chunks if c.choices)

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.5)
    code = stop_stack(stack)
    reader.join(10)
    assert code == 0
    assert "".join(words).split() == [f"tok{i}" for i in range(30)]
    (line,) = [ln for ln in stack.output if "tessera up: stopped: " in ln]
    codes = dict(item.split("=") for item in line.split("stopped: ")[1].split())
    assert {"envoy", "meter", "ext-authz", "ratelimit", "control-plane"} <= codes.keys()
    assert set(codes.values()) == {"0"}, codes


def test_ext_authz_unresponsive_fails_closed_with_503(stack):
    pid = stack.endpoints()["pids"]["ext-authz"]
    before = len(upstream_requests(stack))
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            chat(stack)
        assert err.value.status_code == 503
        assert err.value.code == "service_unavailable"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(upstream_requests(stack)) == before  # nothing, and no key, went upstream
    eventually(lambda: chat(stack), timeout=10)


def test_ratelimit_unresponsive_fails_open(stack):
    pid = stack.endpoints()["pids"]["ratelimit"]
    os.kill(pid, signal.SIGSTOP)
    try:
        chat(stack)  # admitted after the filter's 250 ms timeout
    finally:
        os.kill(pid, signal.SIGCONT)


def _command_lines() -> list[str]:
    """Every process's command line on this machine, as any local user can read it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue  # gone meanwhile
    return found


@pytest.mark.postgres
def test_no_store_password_is_ever_on_a_command_line(tmp_path, postgres_url):
    secret = f"pw-{secrets.token_hex(8)}"
    parts = urlsplit(postgres_url)
    user = parts.username or "postgres"
    netloc = f"{user}:{secret}@{parts.hostname}:{parts.port or 5432}"
    with_password = urlunsplit(parts._replace(netloc=netloc))  # trust auth: any password is taken
    # On the command line: refused before anything starts, and not echoed back.
    for flag, url in (("--db", with_password), ("--redis", f"redis://:{secret}@127.0.0.1:6379/0")):
        refused = subprocess.run(
            [TESSERA, "up", "--data-dir", str(tmp_path / "refused"), flag, url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 2, refused.stderr
        assert f"{flag} carries a password" in refused.stderr
        assert secret not in refused.stdout + refused.stderr
    # From a file (0600): the stack runs on it, and no process shows the password.
    url_file = tmp_path / "db-url"
    url_file.write_text(with_password + "\n")
    url_file.chmod(0o600)
    stack = start_stack(tmp_path / "stack", "--db-file", str(url_file))
    try:
        chat(stack)  # the whole path works on that database
        leaked = [line for line in _command_lines() if secret in line]
        assert leaked == []
        assert secret not in "".join(stack.output)
    finally:
        stop_stack(stack)
