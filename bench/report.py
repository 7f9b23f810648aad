"""Tables (Markdown, also what ``make bench`` prints) and the target checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.keyscale import KeyScaleResult
from bench.load import LoadResult
from bench.paths import PYTHON_SERVICES, kind

PROCESS_ORDER = ("envoy", "ext_authz", "ratelimit", "control_plane", "meter", "supervisor", "upstream")
# The targets (closed loop c16): Python services and all servers, CPU µs per request,
# on memory:// (path d) and redis:// (path f).
PY_TARGET_US = {"d": 300.0, "f": 350.0}
ALL_TARGET_US = {"d": 550.0, "f": 600.0}
FLOOR_SHARE = 0.85  # (d) req/s over its floor's: (c1-grpc), grpc.aio like ext_authz's default
HTTP_PLAIN_SHARE = 0.35  # (d-http) req/s over plain Envoy's
ONE_CORE_TARGET_US = 1000.0


@dataclass
class Measurement:
    path: str  # "a".."e"
    title: str
    load: LoadResult
    cpu: dict[str, float]  # CPU seconds per process over the run
    client_cpu: float  # the load generator's CPU seconds
    notes: list[str] = field(default_factory=list)
    floor: str = ""  # the (c1) path compared with
    callouts: dict[str, int] = field(default_factory=dict)  # Envoy counter deltas over the run

    def cpu_of(self, process_kind: str) -> float | None:
        values = [v for k, v in self.cpu.items() if kind(k) == process_kind]
        return sum(values) if values else None

    def us_per_request(self, seconds: float) -> float:
        return seconds / self.load.requests * 1e6 if self.load.requests else math.nan

    @property
    def python_us(self) -> float:
        return self.us_per_request(sum(v for k, v in self.cpu.items() if kind(k) in PYTHON_SERVICES))

    @property
    def server_us(self) -> float:
        return self.us_per_request(sum(self.cpu.values()))

    @property
    def stack_us(self) -> float:
        """Every server process but the upstream (what a gateway deployment runs)."""
        return self.us_per_request(sum(v for k, v in self.cpu.items() if kind(k) != "upstream"))


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
                    _vs(m, _find(ms, "b", label), open_loop=open_loop) if m.path not in ("a", "b") else "-",
                    _vs(m, _find(ms, m.floor, label), open_loop=open_loop) if m.floor else "-",
                ]
            )
    header = ["path", "load", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "vs (b)", "vs (c1)"]
    return _table(header, rows)


def cpu_table(ms: Sequence[Measurement]) -> list[str]:
    rows = []
    for m in ms:
        cells = ["" if (sec := m.cpu_of(p)) is None else _f(m.us_per_request(sec)) for p in PROCESS_ORDER]
        py = m.python_us if any(kind(p) in PYTHON_SERVICES for p in m.cpu) else math.nan
        rows.append(
            [
                m.title,
                m.load.label,
                *cells,
                _f(py),
                _f(m.server_us),
                _f(m.stack_us),
                _f(m.us_per_request(m.client_cpu)),
            ]
        )
    header = [
        "path",
        "load",
        *PROCESS_ORDER,
        "Python services",
        "all servers",
        "all but upstream",
        "load generator",
    ]
    return _table(header, rows)


DOWNSTREAM = "http.gateway.downstream_rq_total"
DOWNSTREAM_FLOOR = "http.bench.downstream_rq_total"  # the static Envoys' listener
AUTHZ_CLUSTERS = ("cluster.tessera_ext_authz.upstream_rq_total",)
RATELIMIT_CLUSTER = "cluster.tessera_ratelimit.upstream_rq_total"


def _authz_calls(m: Measurement) -> int:
    """Calls to ext_authz clusters: the gRPC one, or any cluster named for ext_authz over HTTP."""
    return sum(
        v
        for k, v in m.callouts.items()
        if k.startswith("cluster.") and k.endswith(".upstream_rq_total") and "authz" in k
    )


def _python_calls(m: Measurement) -> int:
    """Calls Envoy made to any Python service (ext_authz, ratelimit, meter, control plane)."""
    return sum(
        v
        for k, v in m.callouts.items()
        if k.startswith(("cluster.tessera_", "cluster.authz")) and k.endswith(".upstream_rq_total")
    )


def callouts_table(ms: Sequence[Measurement]) -> list[str]:
    rows = []
    for m in ms:
        if not m.callouts:
            continue
        down = m.callouts.get(DOWNSTREAM) or m.callouts.get(DOWNSTREAM_FLOOR, 0)
        rl = m.callouts.get(RATELIMIT_CLUSTER)
        others = sorted(
            f"{k.removeprefix('cluster.').removesuffix('.upstream_rq_total')} {v:,}"
            for k, v in m.callouts.items()
            if k.startswith("cluster.")
            and k.endswith(".upstream_rq_total")
            and v
            and "authz" not in k
            and k != RATELIMIT_CLUSTER
        )
        rows.append(
            [
                m.title,
                m.load.label,
                f"{down:,}",
                f"{_authz_calls(m):,}",
                "absent" if rl is None else f"{rl:,}",
                f"{_python_calls(m) / down:.3f}" if down else "-",
                ", ".join(others) or "-",
            ]
        )
    header = [
        "path",
        "load",
        "http.gateway (http.bench for c1) downstream_rq_total",
        "ext_authz cluster upstream_rq_total",
        "cluster.tessera_ratelimit.upstream_rq_total",
        "Python callouts / request",
        "other clusters (upstream_rq_total)",
    ]
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


def _cpu_targets(ms: Sequence[Measurement], c16: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for path, store in (("d", "memory://"), ("f", "redis://")):
        m = _find(ms, path, c16)
        if m:
            py, allt = PY_TARGET_US[path], ALL_TARGET_US[path]
            rows.append(
                [
                    f"Python services ≤ {py:.0f} µs CPU/request, {store} ({c16})",
                    f"{m.python_us:.0f} µs",
                    _verdict(m.python_us <= py),
                ]
            )
            rows.append(
                [
                    f"all servers ≤ {allt:.0f} µs CPU/request, {store} ({c16})",
                    f"{m.server_us:.0f} µs",
                    _verdict(m.server_us <= allt),
                ]
            )
    g = _find(ms, "g", c16)
    if g:
        rows.append(
            [
                f"one core: CPU/request ≤ {ONE_CORE_TARGET_US / 1000:.1f} ms ({c16}, stack without upstream)",
                f"{g.stack_us:.0f} µs (with upstream {g.server_us:.0f})",
                _verdict(g.stack_us <= ONE_CORE_TARGET_US),
            ]
        )
    return rows


def _throughput_targets(ms: Sequence[Measurement], closed: Sequence[str]) -> list[list[str]]:
    rows: list[list[str]] = []
    for label in closed:
        d, c1, b, dh = (_find(ms, p, label) for p in ("d", "c1g", "b", "dh"))
        if d and c1 and c1.load.rps:
            ratio = d.load.rps / c1.load.rps
            rows.append(
                [
                    f"API key ≥ {FLOOR_SHARE:.0%} of (c1-grpc) req/s ({label})",
                    f"{ratio:.0%} ({d.load.rps:,.0f} vs {c1.load.rps:,.0f})",
                    _verdict(ratio >= FLOOR_SHARE),
                ]
            )
        if dh and b and b.load.rps:
            ratio = dh.load.rps / b.load.rps
            rows.append(
                [
                    f"--authz-transport http ≥ {HTTP_PLAIN_SHARE:.0%} of plain Envoy req/s ({label})",
                    f"{ratio:.0%} ({dh.load.rps:,.0f} vs {b.load.rps:,.0f})",
                    _verdict(ratio >= HTTP_PLAIN_SHARE),
                ]
            )
    return rows


def _latency_targets(ms: Sequence[Measurement], open_label: str) -> list[list[str]]:
    rows: list[list[str]] = []
    b = _find(ms, "b", open_label)
    for path in ("d", "dh"):
        d = _find(ms, path, open_label)
        if d and b:
            p50, p99 = d.load.p50_ms - b.load.p50_ms, d.load.p99_ms - b.load.p99_ms
            rows.append(
                [
                    f"{d.title}: added p50 over plain Envoy at {open_label} ≤ 1 ms",
                    f"{p50:+.2f} ms",
                    _verdict(p50 <= 1),
                ]
            )
            rows.append(
                [
                    f"{d.title}: added p99 over plain Envoy at {open_label} ≤ 3 ms",
                    f"{p99:+.2f} ms",
                    _verdict(p99 <= 3),
                ]
            )
    return rows


def _callout_targets(ms: Sequence[Measurement], c16: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for path in ("d", "dh"):
        m = _find(ms, path, c16)
        if m and m.callouts.get(DOWNSTREAM):
            per = _python_calls(m) / m.callouts[DOWNSTREAM]
            rl = m.callouts.get(RATELIMIT_CLUSTER, 0)
            rows.append(
                [
                    f"{m.title}: exactly one Python callout per request ({c16}, Envoy /stats)",
                    (
                        f"{per:.3f} (ext_authz {_authz_calls(m):,}, ratelimit {rl:,}, "
                        f"requests {m.callouts[DOWNSTREAM]:,})"
                    ),
                    _verdict(abs(per - 1) < 0.001 and rl == 0),
                ]
            )
    return rows


def targets(
    ms: Sequence[Measurement], ks: Sequence[KeyScaleResult], closed: Sequence[str], open_label: str
) -> list[str]:
    rows = _cpu_targets(ms, closed[0]) + _throughput_targets(ms, closed)
    rows += _latency_targets(ms, open_label) + _callout_targets(ms, closed[0])
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
