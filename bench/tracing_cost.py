"""The tracer's own cost: Envoy CPU per request with the gateway's tracing config and without.

``python -m bench.tracing_cost [--seconds 5] [--rounds 3]`` (``make bench`` runs it).

One direct-response upstream Envoy (``bench.lua_cost.upstream_config``) and front Envoys side by
side, ``--concurrency 1`` each:

* ``plain``: the router only;
* ``no-collector``: the same plus the HTTP connection manager's ``tracing`` exactly as the
  gateway configures it without a collector (``control_plane.xds.listener.tracing``: the
  OpenTelemetry tracer, nothing sampled, the trace context continued to the backend), and the
  collector cluster with no endpoint (``control_plane.xds.translate.otlp_cluster``);
* ``sampled``: with a collector, every request sampled and exported. The collector is a third
  Envoy answering each OTLP ``Export`` with an empty gRPC OK (trailers-only): what is measured is
  the front's span recording and export, not a collector's work.

Bodies: the bench's standard chat request, and a stream (``bench.lua_cost.BODIES``). The target
(issue 16): the no-collector tracer costs at most 5% of the gateway Envoy's CPU per request. The
gateway's figure is row (d) of the main bench's report (``--report``, default
``bench/results/latest.md``, which ``make bench`` has just written); its share is printed beside
the share of a router-only Envoy.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path
from typing import Any

from bench import envoy_configs
from bench.lua_cost import BODIES, Fleet, upstream_config
from control_plane.xds.config import GatewayConfig
from control_plane.xds.listener import tracing
from control_plane.xds.translate import otlp_cluster

TARGET_SHARE = 0.05
GATEWAY_ROW = re.compile(r"^\| \(d\) Tessera, API key \| c16 \| ([\d,]+) \|", re.MULTILINE)


def gateway_envoy_us(report: Path) -> float | None:
    """Envoy CPU µs per request of the whole gateway (the main bench's row (d), c16)."""
    if not report.is_file():
        return None
    found = GATEWAY_ROW.search(report.read_text())
    return float(found.group(1).replace(",", "")) if found else None


def _gateway(otlp_endpoint: str, sampling: float) -> GatewayConfig:
    return GatewayConfig(
        host=envoy_configs.HOST,
        port=0,
        control_plane_http_host="",
        control_plane_http_port=0,
        access_log_path=None,
        max_request_bytes=1 << 20,
        otlp_endpoint=otlp_endpoint,
        trace_sampling_percent=sampling,
    )


def front_config(port: int, upstream_port: int, gateway: GatewayConfig | None) -> dict[str, Any]:
    clusters = [envoy_configs._cluster("upstream", upstream_port)]  # noqa: SLF001
    config = envoy_configs._bootstrap(port, envoy_configs._proxy_route(), [], clusters)  # noqa: SLF001
    if gateway is not None:
        listener = config["static_resources"]["listeners"][0]
        listener["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = tracing(gateway)
        config["static_resources"]["clusters"].append(otlp_cluster(gateway.otlp_endpoint))
    return config


def collector_config(port: int) -> dict[str, Any]:
    """An Envoy that accepts every OTLP export: a trailers-only gRPC OK."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in (("content-type", "application/grpc"), ("grpc-status", "0"))
        ],
    }
    return envoy_configs._bootstrap(port, route, [], [])  # noqa: SLF001


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per (front, body) run")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--report", type=Path, default=Path("bench/results/latest.md"), help="the main bench's"
    )
    args = parser.parse_args()
    bodies = [b for b in BODIES if b.name in ("chat", "stream")]
    with Fleet("tessera-tracing-cost-", 9301) as fleet:
        upstream = fleet.start("upstream", upstream_config)
        collector = fleet.start("collector", collector_config)
        variants = {
            "plain": None,
            "no-collector": _gateway("", 100.0),
            "sampled": _gateway(f"{envoy_configs.HOST}:{collector.port}", 100.0),
        }
        fronts = [
            fleet.start(name, lambda port, gw=gateway: front_config(port, upstream.port, gw))
            for name, gateway in variants.items()
        ]
        samples = fleet.measure(fronts, bodies, args)
    print(
        f"\nTracing: front Envoy CPU per request (utime+stime / responses), --concurrency 1, "
        f"wrk -t2 -c{args.connections} {args.seconds} s, median of {args.rounds}:\n"
    )
    print("| body | Envoy | µs/req | Δ vs plain | share | req/s | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    verdicts: list[tuple[str, float]] = []
    for body in bodies:
        plain = statistics.median(samples.us[("plain", body.name)])
        for name in variants:
            key = (name, body.name)
            us = statistics.median(samples.us[key])
            delta = "" if name == "plain" else f"{us - plain:+.1f}"
            pct = "" if name == "plain" else f"{(us - plain) / plain:+.1%}"
            rps, errors = statistics.median(samples.rps[key]), samples.errors[key]
            print(f"| {body.name} | {name} | {us:.1f} | {delta} | {pct} | {rps:,.0f} | {errors} |")
            if name == "no-collector":
                verdicts.append((body.name, us - plain))
    gateway_us = gateway_envoy_us(args.report)
    if gateway_us is None:
        print(
            f"\nNo gateway row in {args.report} (run the main bench first): shares above are of a bare Envoy."
        )
        return
    print(
        f"\nThe tracer without a collector, of the gateway Envoy's {gateway_us:.0f} µs/request "
        f"((d) in {args.report}):"
    )
    for body_name, added in verdicts:
        share = added / gateway_us
        verdict = "within" if share <= TARGET_SHARE else "over"
        print(f"- {body_name}: {added:+.1f} µs = {share:+.1%} ({verdict} the 5% target)")


if __name__ == "__main__":
    main()
