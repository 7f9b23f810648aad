"""``make bench``: every path under the same loads in one run, then ext_authz at 1k/1M keys.

Environment knobs: ``BENCH_DURATION`` (seconds per load run, default 10), ``BENCH_RATE``
(open-loop req/s, default 500), ``BENCH_KEYS`` (comma-separated key counts for the ext_authz
scale test, default ``1000,1000000``; empty to skip), ``BENCH_CHECKS`` (Checks per key count,
default 20000), ``BENCH_REDIS`` (counters of path (f), default ``redis://127.0.0.1:6379/0``; empty
to skip (f)), ``BENCH_REQUEST_LIMIT`` (requests/minute limit put on the bench tenant so the
ratelimit path counts, default 1000000000; 0 for none), ``BENCH_OUTPUT`` (Markdown results,
default ``bench/results/latest.md``), ``BENCH_KEEP=1`` (keep the temp dir with all logs),
``BENCH_ONE_CORE=0`` (skip path (g), the whole stack on one core).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import keyscale, paths, real, report, ttft
from bench.load import run_h2load, run_wrk, wrk_script
from bench.procs import CpuMeter, envoy_counters, stop
from bench.report import Measurement
from tessera import llm

CONNECTIONS = (16, 64)
WARMUP_SECONDS = 2


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} vCPU ({model}), Linux {platform.release()}, load average at start {load}"


def _versions() -> str:
    envoy = subprocess.run([paths.ENVOY, "--version"], capture_output=True, text=True, check=False).stdout
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        [
            "git",
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!bench",
            ":!docs",
            ":!Makefile",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if dirty:
        commit += " + uncommitted product changes"
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    return f"Envoy {m.group(1) if m else '?'}, Python {platform.python_version()}, git {commit or '?'}"


def _alive(pids: dict[str, int]) -> list[str]:
    dead = []
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.append(name)
    return dead


def measure(target: paths.Target, label: str, run: object) -> Measurement:
    counters = envoy_counters(target.envoy_admin) if target.envoy_admin else {}
    meter = CpuMeter(target.pids)
    meter.start()
    result = run()  # type: ignore[operator]
    cpu, client = meter.stop()
    m = Measurement(target.name, target.title, result, cpu, client, list(target.notes), floor=target.floor)
    if target.envoy_admin:  # how many calls Envoy made to each cluster for the requests it served
        after = envoy_counters(target.envoy_admin)
        m.callouts = {k: v - counters.get(k, 0) for k, v in after.items()}
    if dead := _alive(target.pids):
        m.notes.append(f"{', '.join(dead)} exited during {label}: its CPU is undercounted")
    print(
        f"bench: {target.title:<24} {result.tool} {label:<7} {result.rps:>8,.0f} req/s  "
        f"p50 {result.p50_ms:6.2f}  p99 {result.p99_ms:6.2f} ms  errors {result.errors:,}  "
        f"CPU/req {m.server_us:,.0f} µs (Python {m.python_us:,.0f})",
        flush=True,
    )
    return m


def _ttft(workdir: Path, tessera: paths.Target) -> list[ttft.TtftResult]:
    """Streaming time to first token, direct vs path (d), on a demo upstream of its own."""
    if tessera.cli is None or tessera.key is None:
        return []
    url, proc = ttft.start_upstream(workdir)
    try:
        tessera.cli("models", "add", ttft.MODEL, "--backend", url, "--kind", "vllm")
        print("bench: time to first token ...", flush=True)
        return ttft.measure(url, tessera.base_url, tessera.key)
    finally:
        stop(proc)


def _real(workdir: Path, tessera: paths.Target) -> list[real.RealResult]:
    """Real inference (llama-server + Gemma 3 270M), direct vs path (d); none without `make llm`."""
    if tessera.cli is None or tessera.key is None or not llm.available():
        return []
    url, proc = real.start_server(workdir)
    try:
        tessera.cli("models", "add", real.MODEL, "--backend", url, "--kind", "llamacpp")
        print("bench: real inference (llama-server) ...", flush=True)
        return real.measure(url, tessera.base_url, tessera.key)
    finally:
        stop(proc)


def _real_section(results: list[real.RealResult]) -> list[str]:
    if not results:
        return ["## Real inference (llama-server, Gemma 3 270M)", "", "Not measured: run `make llm`.", ""]
    return [
        "## Real inference (llama-server, Gemma 3 270M)",
        "",
        (
            f"`llama-server` (`-t 1`, 4 slots) streaming {real.MAX_TOKENS} tokens at temperature 0, "
            f"{real.STREAMS} sequential streams each way, alternating direct and through path (d). "
            "Tokens/s: content events after the first, over the time after the first."
        ),
        "",
        *real.table(results),
        "",
    ]


def _start_paths(
    targets: list[paths.Target], workdir: Path, request_limit: int, redis_url: str, *, one_core: bool
) -> paths.Target:
    """Start every path into ``targets`` (so the caller stops what started); returns (d)."""
    upstream = paths.start_upstream(workdir)
    targets.append(upstream)
    targets.append(paths.start_plain(workdir, upstream))
    targets.append(paths.start_authz_floor(workdir, upstream, "grpc"))
    targets.append(paths.start_authz_floor(workdir, upstream, "grpc-sync"))
    targets.append(paths.start_authz_floor(workdir, upstream, "http"))
    print("bench: starting tessera up ...", flush=True)
    tessera = paths.start_tessera(workdir, upstream, request_limit=request_limit)
    targets.append(tessera)
    if paths.tessera_has_http_authz():
        print("bench: starting tessera up --authz-transport http ...", flush=True)
        targets.append(paths.start_tessera(workdir, upstream, request_limit=request_limit, transport="http"))
    else:
        print("bench: tessera up has no --authz-transport: path (d-http) skipped", flush=True)
    targets.append(paths.start_tessera_jwt(tessera))
    if redis_url:
        print("bench: starting tessera up on redis:// ...", flush=True)
        targets.append(paths.start_tessera_redis(workdir, upstream, redis_url=redis_url, limit=10**9))
    if one_core and shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1:
        print("bench: starting taskset -c 0 tessera up ...", flush=True)
        targets.append(paths.start_tessera_one_core(workdir, upstream, limit=10**9))
    return tessera


def main() -> int:
    duration = _env_int("BENCH_DURATION", 10)
    rate = _env_int("BENCH_RATE", 500)
    checks = _env_int("BENCH_CHECKS", 20_000)
    request_limit = _env_int("BENCH_REQUEST_LIMIT", 1_000_000_000)
    redis_url = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
    sizes = [int(s) for s in os.environ.get("BENCH_KEYS", "1000,1000000").split(",") if s.strip()]
    output = Path(os.environ.get("BENCH_OUTPUT", "bench/results/latest.md"))
    workdir = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    started = datetime.now(UTC)
    machine, versions = _machine(), _versions()
    print(f"bench: {machine}\nbench: {versions}\nbench: logs in {workdir}", flush=True)

    targets: list[paths.Target] = []
    measurements: list[Measurement] = []
    ttft_results: list[ttft.TtftResult] = []
    real_results: list[real.RealResult] = []
    open_label = f"{rate}rps"
    closed_labels = [f"c{c}" for c in CONNECTIONS]
    try:
        tessera = _start_paths(
            targets, workdir, request_limit, redis_url, one_core=os.environ.get("BENCH_ONE_CORE") != "0"
        )
        # Every path gets the same request bytes: Tessera's key goes to all of them (the JWT to (e)).
        scripts = {t.name: wrk_script(workdir / f"{t.name}.lua", t.key or tessera.key) for t in targets}
        for t in targets:  # warm connections, caches and the JITs nobody has
            run_wrk(
                t.base_url,
                scripts[t.name],
                connections=CONNECTIONS[0],
                seconds=WARMUP_SECONDS,
                prefix=t.client_prefix,
            )
        for conns in CONNECTIONS:
            for t in targets:
                time.sleep(1)
                measurements.append(
                    measure(
                        t,
                        f"c{conns}",
                        lambda t=t, conns=conns: run_wrk(
                            t.base_url,
                            scripts[t.name],
                            connections=conns,
                            seconds=duration,
                            prefix=t.client_prefix,
                        ),
                    )
                )
        ttft_results = _ttft(workdir, tessera)
        real_results = _real(workdir, tessera)
        for t in targets:
            time.sleep(1)
            measurements.append(
                measure(
                    t,
                    open_label,
                    lambda t=t: run_h2load(
                        t.base_url,
                        workdir,
                        t.key or tessera.key,
                        rate=rate,
                        seconds=duration,
                        prefix=t.client_prefix,
                    ),
                )
            )
    finally:
        for t in reversed(targets):
            t.stop()

    ks = keyscale.run(sizes, workdir, checks) if sizes else []

    lines = [
        "# Tessera benchmark results",
        "",
        f"- run: {started:%Y-%m-%d %H:%M} UTC, {duration} s per load run, `make bench`",
        f"- machine: {machine}; load generator on the same machine",
        f"- {versions}; every Envoy `--concurrency {paths.ENVOY_CONCURRENCY}`",
    ]
    notes = sorted({n for m in measurements for n in m.notes})
    lines += [f"- note: {n}" for n in notes]
    lines += [
        "",
        "## Throughput and latency",
        "",
        (
            f"Closed loop: `wrk -t2 -cN`. Open loop: `h2load --h1` at {rate} req/s (10 staggered "
            "connections). Errors: non-2xx responses + socket errors. `vs (b)` / `vs (c1)`: req/s "
            "as a share of plain Envoy's / of the one-callout floor on the same ext_authz transport "
            "(closed loop), or added p50 / p99 (open loop)."
        ),
        "",
        *report.throughput_table(measurements, [*closed_labels, open_label], open_label),
        "",
        "## CPU per request (µs)",
        "",
        (
            "utime + stime from `/proc/<pid>/stat` over the run, divided by requests served. "
            "Python services = ext_authz + ratelimit + control plane + meter. All servers = every "
            "process of the path, upstream included."
        ),
        "",
        *report.cpu_table(measurements),
        "",
        "## Python callouts per request (Envoy admin `/stats`)",
        "",
        (
            "Tessera paths: deltas of Envoy's own counters over each run: requests served by the "
            "gateway listener vs requests Envoy sent to each cluster (the model upstream excluded)."
        ),
        "",
        *report.callouts_table(measurements),
        "",
    ]
    if ttft_results:
        lines += [
            "## Time to first token (streaming)",
            "",
            (
                f"A demo upstream (vLLM stand-in) streaming {ttft.MAX_TOKENS} tokens, one every "
                f"{ttft.TOKEN_MS} ms; sequential streams on one keep-alive connection each, "
                "alternating direct and through path (d). TTFT = first SSE event with content."
            ),
            "",
            *ttft.table(ttft_results),
            "",
        ]
    lines += _real_section(real_results)
    if ks:
        lines += [
            "## ext_authz with many keys",
            "",
            (
                "One worker; snapshot streamed by `bench/policy_server.py`; sequential Checks "
                "with valid keys from a separate process (`bench/check_client.py`)."
            ),
            "",
            *report.keyscale_table(ks),
            "",
        ]
    lines += ["## Targets", "", *report.targets(measurements, ks, closed_labels, open_label), ""]
    text = "\n".join(lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print("\n" + text)
    print(f"bench: written to {output}", flush=True)
    if os.environ.get("BENCH_KEEP"):
        print(f"bench: logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
