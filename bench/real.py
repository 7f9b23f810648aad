"""Real inference, direct vs through the full Tessera path: llama-server with Gemma 3 270M
(`make llm`), streaming chat. Per stream: time to first token, tokens per second after it, and
the whole stream; the gateway's share of end-to-end latency is the headline. Sequential streams
on one keep-alive connection each, alternating direct and gateway so both see the same machine.
Skipped (with a note) when `make llm` has not been run."""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HOST, free_port, spawn, stop, until
from bench.report import _table
from tessera import llm

MODEL = "gemma-bench"
MAX_TOKENS = 32
STREAMS = 20


@dataclass(frozen=True, slots=True)
class RealResult:
    path: str
    streams: int
    ttft_p50_ms: float
    tokens_per_s_p50: float
    total_p50_ms: float


def _one(url: str, key: str | None) -> tuple[float, float, int]:
    """One stream on a fresh connection (llama-server closes its connection after a stream)."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        return _stream(conn, key)
    finally:
        conn.close()


def _stream(conn: http.client.HTTPConnection, key: str | None) -> tuple[float, float, int]:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        }
    )
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        msg = f"stream answered {resp.status}: {resp.read()[:200]!r}"
        raise RuntimeError(msg)
    first, tokens = 0.0, 0
    for line in resp:
        if line.startswith(b"data: {") and b'"content":"' in line:
            tokens += 1
            first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, tokens


def start_server(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    proc = spawn(
        llm.server_argv(llm.binary_path(), llm.model_path(), HOST, port), workdir / "llama-server.log"
    )
    url = f"http://{HOST}:{port}"
    try:  # /health answers 503 while the model loads (urlopen raises it as an OSError)
        until(lambda: urllib.request.urlopen(f"{url}/health", timeout=1), timeout=60)  # noqa: S310
    except OSError:
        stop(proc)
        raise
    return url, proc


def measure(server_url: str, gateway_url: str, key: str) -> list[RealResult]:
    conns: dict[str, tuple[str, str | None]] = {
        "direct to llama-server": (server_url, None),
        "through Tessera (key auth, limits, metering)": (gateway_url, key),
    }
    gateway, gateway_key = conns["through Tessera (key auth, limits, metering)"]
    until(lambda: _one(gateway, gateway_key), timeout=20)  # the model reaches Envoy within a second
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in conns}
    for _ in range(STREAMS):
        for name, (url, k) in conns.items():
            samples[name].append(_one(url, k))
    return [
        RealResult(
            path=name,
            streams=len(values),
            ttft_p50_ms=statistics.median(v[0] for v in values) * 1000,
            tokens_per_s_p50=statistics.median((v[2] - 1) / (v[1] - v[0]) for v in values if v[1] > v[0]),
            total_p50_ms=statistics.median(v[1] for v in values) * 1000,
        )
        for name, values in samples.items()
    ]


def table(results: list[RealResult]) -> list[str]:
    direct = results[0]
    rows = [
        [
            r.path,
            str(r.streams),
            f"{r.ttft_p50_ms:.1f}",
            f"{r.tokens_per_s_p50:.1f}",
            f"{r.total_p50_ms:.0f}",
            "-"
            if r is direct
            else f"+{r.ttft_p50_ms - direct.ttft_p50_ms:.1f} ms TTFT, "
            f"{(r.total_p50_ms - direct.total_p50_ms) / r.total_p50_ms:.1%} of the stream",
        ]
        for r in results
    ]
    return _table(
        ["path", "streams", "TTFT p50 ms", "tokens/s p50", "stream p50 ms", "gateway's share"], rows
    )
