"""Cost independent of traffic: a long run at load, in slices, with request and token limits.

``python -m bench.flat_load [--seconds 60] [--slice 10] [--redis URL]``: one ``tessera up``
(memory://, and a second on ``--redis`` unless it is empty) in front of the bench upstream, the
tenant under a request limit and a token limit of 1e9/minute (every request is admitted,
reserved and settled); ``wrk -c16`` for ``--seconds`` in consecutive slices. Per slice: req/s and
CPU per request of the Python services and of all servers. Flat rows = no cost that grows with
the requests in a window or a lease (before the counters were rewritten, an admission took
455 µs after 5,000 requests and 6 ms after 30,000 on memory://).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.load import run_wrk, wrk_script
from bench.paths import PYTHON_SERVICES, Target, kind, start_tessera_redis, start_upstream
from bench.procs import CpuMeter

LIMIT = 1_000_000_000


def _slices(target: Target, workdir: Path, seconds: int, slice_seconds: int) -> list[str]:
    script = wrk_script(workdir / f"{target.name}.lua", target.key)
    run_wrk(target.base_url, script, connections=16, seconds=3)  # warm-up
    rows = []
    done = 0
    while done < seconds:
        meter = CpuMeter(target.pids)
        meter.start()
        result = run_wrk(target.base_url, script, connections=16, seconds=slice_seconds)
        cpu, _ = meter.stop()
        n = max(1, result.ok)
        python = sum(v for k, v in cpu.items() if kind(k) in PYTHON_SERVICES) / n * 1e6
        servers = sum(v for k, v in cpu.items() if kind(k) != "upstream") / n * 1e6
        rows.append(
            f"| {done}-{done + slice_seconds} s | {result.ok / result.seconds:,.0f} | {result.errors} "
            f"| {python:,.0f} | {servers:,.0f} |"
        )
        done += slice_seconds
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flat_load")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--slice", type=int, default=10)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help='"" skips the redis:// run')
    parser.add_argument("--transport", default="grpc", choices=("grpc", "http"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-flat-") as tmp:
        workdir = Path(tmp)
        upstream = start_upstream(workdir)
        try:
            for counters in ("memory://", *((args.redis,) if args.redis else ())):
                target = start_tessera_redis(
                    workdir,
                    upstream,
                    redis_url=counters,
                    limit=LIMIT,
                    extra=("--authz-transport", args.transport),
                    name=f"tessera-{counters.partition(':')[0]}",
                )
                try:
                    rows = _slices(target, workdir, args.seconds, args.slice)
                finally:
                    target.stop()
                print(f"\n{counters}, ext_authz over {args.transport}, request + token limits, wrk -c16:\n")
                print("| slice | req/s | errors | Python µs/req | all servers µs/req |")
                print("|---|---:|---:|---:|---:|")
                print("\n".join(rows))
        finally:
            upstream.stop()


if __name__ == "__main__":
    main()
