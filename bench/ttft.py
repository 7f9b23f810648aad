"""Time to first token, streaming, direct to an upstream vs through the full Tessera path.

The upstream is the demo upstream (a vLLM stand-in) generating one token every
``TOKEN_MS`` ms: what is measured is the gateway's share of a stream's latency, which an
Envoy ``direct_response`` cannot show. Each request: ``POST /v1/chat/completions`` with
``"stream": true``; the clock stops at the first SSE event carrying content (TTFT) and at
the end of the stream. Sequential requests on one keep-alive connection, alternating
direct / gateway so both see the same machine.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HOST, free_port, spawn, stop, until
from bench.report import _table

TOKEN_MS = 10
MAX_TOKENS = 16
MODEL = "stream"


@dataclass(frozen=True, slots=True)
class TtftResult:
    path: str
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float


def _one(conn: http.client.HTTPConnection, key: str | None) -> tuple[float, float]:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
        }
    )
    headers = {"content-type": "application/json", "x-demo-delay-ms": str(TOKEN_MS)}
    if key:
        headers["authorization"] = f"Bearer {key}"
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        msg = f"stream answered {resp.status}: {resp.read()[:200]!r}"
        raise RuntimeError(msg)
    first = 0.0
    for line in resp:
        if not first and line.startswith(b"data: {") and b'"content":"' in line:
            first = time.perf_counter() - started
    return first * 1000, (time.perf_counter() - started) * 1000


def start_upstream(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "tessera.demo_upstream",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--name",
        "ttft",
    ]
    proc = spawn(argv, workdir / "ttft-upstream.log")
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return url, proc
        except OSError:
            time.sleep(0.1)
    stop(proc)
    msg = "the TTFT upstream did not start"
    raise RuntimeError(msg)


def measure(upstream_url: str, gateway_url: str, key: str, requests: int = 200) -> list[TtftResult]:
    """Alternate direct and gateway requests; one keep-alive connection each."""
    conns = {
        "direct to the upstream": (http.client.HTTPConnection(*_host_port(upstream_url), timeout=30), None),
        "through Tessera (key auth, limits, usage)": (
            http.client.HTTPConnection(*_host_port(gateway_url), timeout=30),
            key,
        ),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in conns}
    gateway, gateway_key = conns["through Tessera (key auth, limits, usage)"]
    until(lambda: _one(gateway, gateway_key), timeout=15)  # the model reaches Envoy within a second
    for _ in range(5):  # warm-up
        for conn, k in conns.values():
            _one(conn, k)
    for _ in range(requests):
        for name, (conn, k) in conns.items():
            samples[name].append(_one(conn, k))
    out = []
    for name, values in samples.items():
        firsts = sorted(v[0] for v in values)
        out.append(
            TtftResult(
                path=name,
                requests=len(values),
                ttft_p50_ms=statistics.median(firsts),
                ttft_p99_ms=firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))],
                total_p50_ms=statistics.median(v[1] for v in values),
            )
        )
    return out


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def table(results: list[TtftResult]) -> list[str]:
    direct = results[0]
    rows = [
        [
            r.path,
            str(r.requests),
            f"{r.ttft_p50_ms:.2f}",
            f"{r.ttft_p99_ms:.2f}",
            f"{r.total_p50_ms:.1f}",
            "-"
            if r is direct
            else f"+{r.ttft_p50_ms - direct.ttft_p50_ms:.2f} / +{r.ttft_p99_ms - direct.ttft_p99_ms:.2f} ms",
        ]
        for r in results
    ]
    return _table(
        ["path", "streams", "TTFT p50 ms", "TTFT p99 ms", "stream p50 ms", "added TTFT p50 / p99"], rows
    )
