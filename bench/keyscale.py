"""ext_authz at 1k and 1M keys: snapshot apply time, memory, Check latency.

For each key count N:

1. ``bench.policy_server`` builds a full snapshot of N ``ApiKey`` resources (before
   anything is timed) and serves it in <= 3.5 MB messages.
2. The real ``python -m ext_authz serve`` starts against it (one worker, metrics off).
   ``serving_s``: process start -> gRPC health SERVING (i.e. the first snapshot received,
   compiled and swapped in; Python start-up and imports included). ``applied_s``: first
   snapshot message sent -> ack received (transfer + compile only).
3. ``bench.check_client`` (a separate process) makes sequential Checks with valid keys;
   Check p50/p99 and ext_authz CPU per Check over that run.
4. ``VmRSS`` after the Checks (steady state) and ``VmHWM`` (peak, i.e. during the apply).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HOST, cpu_seconds, free_port, memory_kb, spawn, stop
from tessera.keys import ensure_pepper
from tessera.probe import grpc_serving

TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class KeyScaleResult:
    keys: int
    snapshot_messages: int
    snapshot_mb: float
    serving_s: float  # process start -> SERVING
    applied_s: float  # first message sent -> ack
    rss_mb: float  # steady state, after the Checks
    peak_rss_mb: float
    check_p50_us: float
    check_p99_us: float
    checks: int
    allowed: int
    cpu_us_per_check: float


def _wait_file(path: Path, proc: subprocess.Popen[bytes], what: str) -> dict[str, float]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if path.exists():
            data: dict[str, float] = json.loads(path.read_text())
            return data
        if proc.poll() is not None:
            msg = f"{what} exited with {proc.returncode}"
            raise RuntimeError(msg)
        time.sleep(0.05)
    msg = f"{what}: no {path.name} after {TIMEOUT:.0f}s"
    raise RuntimeError(msg)


def _wait_serving(target: str, proc: subprocess.Popen[bytes]) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                msg = f"ext_authz exited with {proc.returncode}"
                raise RuntimeError(msg)
            if await grpc_serving(target, timeout=1.0):
                return
            await asyncio.sleep(0.05)
        msg = f"ext_authz not SERVING after {TIMEOUT:.0f}s"
        raise RuntimeError(msg)

    asyncio.run(poll())


def measure(n_keys: int, workdir: Path, checks: int) -> KeyScaleResult:
    state = workdir / f"keys-{n_keys}"
    state.mkdir(parents=True, exist_ok=True)
    pepper = state / "pepper"
    ensure_pepper(pepper)
    policy_port, authz_port = free_port(), free_port()
    py = sys.executable
    argv = [py, "-m", "bench.policy_server", "--keys", str(n_keys), "--port", str(policy_port)]
    argv += ["--pepper-file", str(pepper), "--state-dir", str(state)]
    policy = spawn(argv, state / "policy-server.log")
    authz: subprocess.Popen[bytes] | None = None
    try:
        ready = _wait_file(state / "ready.json", policy, "policy server")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env |= {
            "TESSERA_GRPC__PORT": str(authz_port),
            "TESSERA_METRICS__PORT": "0",
            "TESSERA_PEPPER__FILE": str(pepper),
            "TESSERA_POLICY__URL": f"{HOST}:{policy_port}",
        }
        t0 = time.monotonic()
        authz = spawn([py, "-m", "ext_authz", "serve"], state / "ext_authz.log", env)
        target = f"{HOST}:{authz_port}"
        _wait_serving(target, authz)
        serving_s = time.monotonic() - t0
        stream = _wait_file(state / "stream.json", policy, "policy server (ack)")
        cpu0 = cpu_seconds(authz.pid)
        argv = [py, "-m", "bench.check_client", "--target", target, "--keys", str(n_keys)]
        out = subprocess.run(
            [*argv, "--count", str(checks)],
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout
        cpu = cpu_seconds(authz.pid) - cpu0
        lat = json.loads(out)
        mem = memory_kb(authz.pid)
    finally:
        if authz is not None:
            stop(authz)
        stop(policy)
    calls = checks + 1000  # the client's warm-up calls hit the server too
    return KeyScaleResult(
        keys=n_keys,
        snapshot_messages=int(ready["messages"]),
        snapshot_mb=ready["bytes"] / 1e6,
        serving_s=serving_s,
        applied_s=stream["acked_unix"] - stream["first_sent_unix"],
        rss_mb=mem.get("VmRSS", 0) / 1024,
        peak_rss_mb=mem.get("VmHWM", 0) / 1024,
        check_p50_us=lat["p50_us"],
        check_p99_us=lat["p99_us"],
        checks=int(lat["count"]),
        allowed=int(lat["allowed"]),
        cpu_us_per_check=cpu / calls * 1e6,
    )


def run(sizes: list[int], workdir: Path, checks: int = 20_000) -> list[KeyScaleResult]:
    results = []
    for n in sizes:
        print(f"bench: ext_authz with {n:,} keys ...", flush=True)
        r = measure(n, workdir, checks)
        print(
            f"bench:   SERVING after {r.serving_s:.2f}s (applied {r.applied_s:.2f}s), RSS {r.rss_mb:.0f} MB"
            f" (peak {r.peak_rss_mb:.0f}), Check p50 {r.check_p50_us:.0f} µs p99 {r.check_p99_us:.0f} µs",
            flush=True,
        )
        results.append(r)
    return results


if __name__ == "__main__":
    import tempfile

    sizes = [int(s) for s in (sys.argv[1:] or ["1000"])]
    with tempfile.TemporaryDirectory(prefix="tessera-keyscale-") as d:
        for res in run(sizes, Path(d)):
            print(res)
