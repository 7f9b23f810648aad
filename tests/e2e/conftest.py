"""One real stack (`tessera up`: Envoy + control plane + ext_authz + ratelimit + demo upstream)
per test session, driven from outside like a user would: the CLI and the official openai client."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tessera.admin_client import admin_channel, resolve_target
from tessera.identity import Authority, server_name, spiffe_id
from tessera.settings import IdentitySettings
from tests.conftest import free_port
from tests.upstream import Upstream

BIN = Path(sys.executable).parent
TESSERA = str(BIN / "tessera")
START_TIMEOUT = 120
# How Envoy calls ext_authz in every stack these tests start: grpc (default) or http.
# `make test` runs the tier once with each.
AUTHZ_TRANSPORT = os.environ.get("TESSERA_TEST_AUTHZ_TRANSPORT", "grpc")


@dataclass
class Stack:
    root: Path
    port: int
    admin_port: int
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    demo_key: str = ""

    @property
    def gateway(self) -> str:
        """The gateway's URL: https with --tls."""
        return str(self.endpoints()["gateway"])

    @property
    def gateway_ca(self) -> str | None:
        """The CA file a client of a --tls gateway trusts."""
        return self.endpoints().get("gateway_ca")

    def endpoints(self) -> dict[str, Any]:
        return json.loads((self.root / "endpoints.json").read_text())

    def admin_channel(self) -> grpc.Channel:
        """The admin API as the CLI reaches it: mutual TLS with the operator's identity."""
        return admin_channel(resolve_target(self.root))

    def identity(self, component: str, node: str = "") -> IdentitySettings:
        """A certificate from this stack's CA naming ``component`` (``node``): what a peer with
        that identity would hold (e.g. to call ext_authz as an Envoy)."""
        name = f"test-{component}-{node}" if node else f"test-{component}"
        return Authority(self.root / "identity").ensure(name, spiffe_id(component, node=node))

    @staticmethod
    def channel(target: str, identity: IdentitySettings, peer: str, **options: Any) -> grpc.Channel:
        """A blocking channel to the internal component ``peer`` under mutual TLS."""
        cert, key, ca = (path.read_bytes() for path in identity.files)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        opts = [("grpc.ssl_target_name_override", server_name(spiffe_id(peer))), *options.items()]
        return grpc.secure_channel(target, creds, options=opts)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [TESSERA, *args, "--data-dir", str(self.root), "--output", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and result.returncode != 0:
            msg = f"tessera {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            raise AssertionError(msg)
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args).stdout)

    def client(self, key: str, *, http2: bool = False) -> openai.OpenAI:
        """The official client, trusting the gateway's CA when it serves TLS."""
        http_client = None
        if self.gateway_ca or http2:
            verify = ssl.create_default_context(cafile=self.gateway_ca)
            http_client = openai.DefaultHttpx2Client(verify=verify, http2=http2)
        return openai.OpenAI(
            base_url=f"{self.gateway}/v1", api_key=key, max_retries=0, timeout=30, http_client=http_client
        )

    def ledger_row(self, request_id: str, timeout: float = 15) -> dict[str, Any]:
        """The request's one ledger row, read from the stack's SQLite file once the meter wrote it."""
        deadline = time.monotonic() + timeout
        while True:
            db = sqlite3.connect(f"file:{self.root / 'tessera.db'}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
            try:
                found = db.execute(
                    "SELECT * FROM usage_records WHERE request_id = ?", (request_id,)
                ).fetchall()
            finally:
                db.close()
            if found:
                assert len(found) == 1, f"{len(found)} ledger rows for {request_id}"
                return dict(found[0])
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id} within {timeout} s")
            time.sleep(0.2)

    def new_key(self, tenant: str | None = None) -> str:
        name = tenant or f"t{time.monotonic_ns()}"
        if tenant is None:
            self.cli("tenants", "create", name)
        return str(self.cli_json("keys", "create", "--tenant", name)["key"])


def start_stack(root: Path, *extra: str, env_extra: dict[str, str] | None = None) -> Stack:
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")} | (env_extra or {})
    proc = subprocess.Popen(
        [
            TESSERA,
            "up",
            "--demo-upstream",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--data-dir",
            str(root),
            "--authz-transport",
            AUTHZ_TRANSPORT,
            *extra,  # after: a test's own --authz-transport wins
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    stack = Stack(root, port, admin_port, proc)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stack.output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        if m := re.search(r"Demo key \(shown once\): (\S+)", line):
            stack.demo_key = m.group(1)
        if "Ctrl-C stops everything" in line:
            return stack
    stop_stack(stack)
    logs = "".join(stack.output)
    msg = f"tessera up did not become ready:\n{logs}"
    raise AssertionError(msg)


def stop_stack(stack: Stack) -> int:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            return stack.proc.wait(30)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
    return stack.proc.wait()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """The session's stack; it keeps ``<root>/resources`` applied (``--config-dir``), empty
    until a test writes documents there."""
    root = tmp_path_factory.mktemp("stack")
    (root / "resources").mkdir()
    s = start_stack(root, "--config-dir", str(root / "resources"))
    yield s
    stop_stack(s)


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    """Demo upstreams a test starts (append them); stopped when it ends."""
    started: list[Upstream] = []
    yield started
    for u in started:
        u.stop()
