"""Tables (Markdown, also what ``make bench`` prints) and the target checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.keyscale import KeyScaleResult
from bench.load import LoadResult
from bench.paths import PYTHON_SERVICES

PROCESS_ORDER = ("envoy", "ext_authz", "ratelimit", "control_plane", "meter", "supervisor", "upstream")
PY_TARGET_US = 150.0


@dataclass
class Measurement:
    path: str  # "a".."e"
    title: str
    load: LoadResult
    cpu: dict[str, float]  # CPU seconds per process over the run
    client_cpu: float  # the load generator's CPU seconds
    notes: list[str] = field(default_factory=list)

    def us_per_request(self, seconds: float) -> float:
        return seconds / self.load.requests * 1e6 if self.load.requests else math.nan

    @property
    def python_us(self) -> float:
        return self.us_per_request(sum(v for k, v in self.cpu.items() if k in PYTHON_SERVICES))

    @property
    def server_us(self) -> float:
        return self.us_per_request(sum(self.cpu.values()))


def _f(value: float, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _find(ms: Sequence[Measurement], path: str, label: str) -> Measurement | None:
    return next((m for m in ms if m.path == path and m.load.label == label), None)


def _vs(m: Measurement, ref: Measurement | None, *, open_loop: bool) -> str:
    if ref is None or ref is m:
        return "-"
    if open_loop:  # added latency at the same offered rate
        return f"+{m.load.p50_ms - ref.load.p50_ms:.2f} / +{m.load.p99_ms - ref.load.p99_ms:.2f} ms"
    return f"{m.load.rps / ref.load.rps:.0%}" if ref.load.rps else "-"


def throughput_table(ms: Sequence[Measurement], labels: Sequence[str], open_label: str) -> list[str]:
    rows = []
    for label in labels:
        for m in (m for m in ms if m.load.label == label):
            open_loop = label == open_label
            rows.append(
                [
                    m.title,
                    f"{m.load.tool} {label}",
                    _f(m.load.rps),
                    _f(m.load.p50_ms, 2),
                    _f(m.load.p90_ms, 2),
                    _f(m.load.p99_ms, 2),
                    f"{m.load.errors:,}",
                    _vs(m, _find(ms, "b", label), open_loop=open_loop) if m.path not in "ab" else "-",
                    _vs(m, _find(ms, "c", label), open_loop=open_loop) if m.path not in "abc" else "-",
                ]
            )
    header = ["path", "load", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "vs (b)", "vs (c)"]
    return _table(header, rows)


def cpu_table(ms: Sequence[Measurement]) -> list[str]:
    rows = []
    for m in ms:
        cells = [_f(m.us_per_request(m.cpu[p])) if p in m.cpu else "" for p in PROCESS_ORDER]
        py = m.python_us if any(p in m.cpu for p in PYTHON_SERVICES) else math.nan
        rows.append(
            [
                m.title,
                m.load.label,
                *cells,
                _f(py),
                _f(m.server_us),
                _f(m.us_per_request(m.client_cpu)),
            ]
        )
    header = ["path", "load", *PROCESS_ORDER, "Python services", "all servers", "load generator"]
    return _table(header, rows)


def keyscale_table(ks: Sequence[KeyScaleResult]) -> list[str]:
    rows = [
        [
            f"{r.keys:,}",
            f"{r.snapshot_mb:.1f} MB / {r.snapshot_messages}",
            f"{r.serving_s:.2f}",
            f"{r.applied_s:.2f}",
            f"{r.rss_mb:.0f}",
            f"{r.peak_rss_mb:.0f}",
            f"{r.check_p50_us:.0f}",
            f"{r.check_p99_us:.0f}",
            f"{r.allowed:,}/{r.checks:,}",
            f"{r.cpu_us_per_check:.0f}",
        ]
        for r in ks
    ]
    header = [
        "keys",
        "snapshot (size / messages)",
        "start → SERVING s",
        "snapshot sent → acked s",
        "RSS MB",
        "peak RSS MB",
        "Check p50 µs",
        "Check p99 µs",
        "allowed",
        "ext_authz CPU µs/Check",
    ]
    return _table(header, rows)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def targets(
    ms: Sequence[Measurement], ks: Sequence[KeyScaleResult], closed: Sequence[str], open_label: str
) -> list[str]:
    rows: list[list[str]] = []
    for label in closed:
        d, c, b = (_find(ms, p, label) for p in "dcb")
        if d and c and c.load.rps:
            ratio = d.load.rps / c.load.rps
            rows.append(
                [f"API key ≥ 80% of callout floor req/s ({label})", f"{ratio:.0%}", _verdict(ratio >= 0.8)]
            )
        if d and b and b.load.rps:
            ratio = d.load.rps / b.load.rps
            rows.append(
                [
                    f"stretch: API key ≥ 25% of plain Envoy req/s ({label})",
                    f"{ratio:.0%}",
                    _verdict(ratio >= 0.25),
                ]
            )
    for label in (*closed, open_label):
        d = _find(ms, "d", label)
        if d:
            rows.append(
                [
                    f"Python services ≤ {PY_TARGET_US:.0f} µs CPU/request ({label})",
                    f"{d.python_us:.0f} µs",
                    _verdict(d.python_us <= PY_TARGET_US),
                ]
            )
    d, b = _find(ms, "d", open_label), _find(ms, "b", open_label)
    if d and b:
        p50, p99 = d.load.p50_ms - b.load.p50_ms, d.load.p99_ms - b.load.p99_ms
        rows.append(
            [f"added p50 over plain Envoy at {open_label} ≤ 1 ms", f"{p50:+.2f} ms", _verdict(p50 <= 1)]
        )
        rows.append(
            [f"added p99 over plain Envoy at {open_label} ≤ 3 ms", f"{p99:+.2f} ms", _verdict(p99 <= 3)]
        )
    small = next((r for r in ks if r.keys < 1_000_000), None)
    big = next((r for r in ks if r.keys >= 1_000_000), None)
    if big:
        rows.append(
            [
                f"{big.keys:,} keys: RSS ≤ 300 MB per worker",
                f"{big.rss_mb:.0f} MB (peak {big.peak_rss_mb:.0f})",
                _verdict(big.rss_mb <= 300),
            ]
        )
        rows.append(
            [
                f"{big.keys:,} keys: snapshot applied ≤ 10 s",
                f"{big.applied_s:.1f} s (SERVING after {big.serving_s:.1f} s)",
                _verdict(big.applied_s <= 10),
            ]
        )
        if small:
            ratio = big.check_p99_us / small.check_p99_us
            rows.append(
                [
                    f"{big.keys:,} keys: Check p99 within 10% of {small.keys:,} keys",
                    f"{big.check_p99_us:.0f} vs {small.check_p99_us:.0f} µs ({ratio - 1:+.0%})",
                    _verdict(ratio <= 1.10),
                ]
            )
    return _table(["target", "measured", "verdict"], rows)
