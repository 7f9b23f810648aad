"""The meter's CPU per usage line, in the meter's own process.

``python -m bench.meter_cost [--lines N] [--batch B] [--db URL]`` (not part of ``make bench``,
which charges the meter its share of each request from /proc). A fresh database at
``alembic upgrade head`` (a temp SQLite file unless ``--db``), one usage log, and the real
``Meter`` with a ``Settler`` (its queue only; nothing is sent). Per block of ``--batch`` lines,
written the way Envoy writes them (every line of an admitted request, ``reserved``), the meter
runs five settle passes (its 100 ms cadence within the ledger's 500 ms) and one ledger pass:
the CPU of this process over those passes, divided by the lines, is the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.db.migrate import upgrade
from control_plane.usage.meter import Meter
from control_plane.usage.settler import Settler
from tessera import usage_line
from tessera.logging import configure_logging
from tessera.settings import LogSettings

SETTLE_PASSES = 5  # settle_poll_seconds 0.1 within poll_seconds 0.5


def envoy_line() -> str:
    doc = dict.fromkeys(usage_line.ENVOY_FORMAT)
    doc |= {
        "v": 1,
        "node": "bench",
        "request_id": uuid.uuid4().hex,
        "start_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "method": "POST",
        "path": "/v1/chat/completions",
        "tenant_id": "bench",
        "key_id": "k1",
        "reserved": "1",
        "model_requested": "bench",
        "model": "bench",
        "backend": "127.0.0.1:8000",
        "status": 200,
        "flags": "-",
        "prompt_tokens": "12",
        "completion_tokens": "20",
        "content_type": "application/json",
        "duration_ms": 2,
        "ttfb_ms": 1,
        "bytes_received": 120,
        "bytes_sent": 300,
    }
    return json.dumps(doc, separators=(",", ":"))  # Envoy's compact JSON


async def measure(url: str, log: Path, lines: int, batch: int) -> float:
    engine = make_engine(url)
    settler = Settler("127.0.0.1:1")  # never run: offer() queues, which is the meter's cost
    meter = Meter(make_sessionmaker(engine), log, "bench", settler=settler)
    with log.open("a") as f:  # warm up: compiled statements, the first checkpoint
        f.write("\n".join(envoy_line() for _ in range(200)) + "\n")
    await meter.ingest_available()
    cpu = 0.0
    for _ in range(lines // batch):
        block = "\n".join(envoy_line() for _ in range(batch)) + "\n"
        with log.open("a") as f:
            f.write(block)
        start = time.process_time()
        for _ in range(SETTLE_PASSES):
            await meter.settle_available()
        await meter.ingest_available()
        cpu += time.process_time() - start
    await engine.dispose()
    return cpu / (lines // batch * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.meter_cost")
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000, help="lines per ledger pass (2,000 req/s x 0.5 s)")
    parser.add_argument("--db", default="", help="a database URL (default: a temp SQLite file)")
    args = parser.parse_args()
    with Path(os.devnull).open("w") as quiet:
        configure_logging(LogSettings(), service="meter", stream=quiet)  # INFO, as served
        with tempfile.TemporaryDirectory() as tmp:
            url = args.db or f"sqlite+aiosqlite:///{tmp}/meter.db"
            upgrade(url)
            us = asyncio.run(measure(url, Path(tmp) / "usage.log", args.lines, args.batch))
    print(f"meter: {us:.1f} us CPU per usage line ({args.lines} lines, ledger batches of {args.batch})")


if __name__ == "__main__":
    main()
