"""Where ext_authz's time and memory go, in-process (not part of ``make bench``).

``python -m bench.inproc [N]`` (default 1,000,000 keys):

* Check cost without gRPC: ``CheckRequest`` parse from bytes, then ``ExtAuthzServicer.Check``
  (HMAC + index lookup + cached allow response), driven without an event loop;
* memory of a snapshot of N keys: the parsed protobuf messages (held only while a version is
  applied) and the compiled ``KeyIndex`` left once they are dropped.

Compare with ``make bench``'s no-op callout and Check latency to see the gRPC/asyncio share.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from bench.check_client import check_request
from bench.keygen import api_key
from bench.policy_server import build_snapshot
from bench.procs import memory_kb
from ext_authz.authorize import Authorizer
from ext_authz.key_index import key_index_from_policy
from ext_authz.servicer import ExtAuthzServicer
from tessera.clock import SYSTEM_CLOCK
from tessera.policy.v1 import policy_pb2
from tessera.policy_client import release_free_memory

PEPPER = b"p" * 32
CALLS = 20_000


def _rss_mb() -> float:
    gc.collect()
    return memory_kb(int(Path("/proc/self").resolve().name)).get("VmRSS", 0) / 1024


def _drive(coro: Any) -> Any:
    """Run a coroutine that never awaits anything pending (Check does no I/O)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    msg = "Check awaited something"
    raise RuntimeError(msg)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    base = _rss_mb()
    messages = build_snapshot(n, PEPPER)
    wire_mb = sum(len(m) for m in messages) / 1e6
    built = _rss_mb()
    upserts: list[policy_pb2.Resource] = []
    for raw in messages:
        upserts.extend(policy_pb2.StreamPolicyResponse.FromString(raw).upserts)
    del messages
    parsed = _rss_mb()
    t0 = time.perf_counter()
    index = key_index_from_policy(upserts, version="v")
    compile_s = time.perf_counter() - t0
    compiled = _rss_mb()
    del upserts
    release_free_memory()
    left = _rss_mb()
    print(f"{n:,} keys: wire {wire_mb:.0f} MB; RSS base {base:.0f} MB (+{built - base:.0f} building)")
    print(f"  parsed messages (transient): +{parsed - built:.0f} MB")
    print(f"  compile {compile_s:.2f} s: +{compiled - parsed:.0f} MB while building")
    print(f"  after dropping the messages: RSS {left:.0f} MB (KeyIndex and the process)")

    authorizer = Authorizer(PEPPER, SYSTEM_CLOCK, None)  # no admitter: no limits to admit by
    authorizer.swap_index(index)
    servicer = ExtAuthzServicer(authorizer, SYSTEM_CLOCK)
    raw_reqs = [check_request(api_key(i * (n // CALLS or 1) % n)).SerializeToString() for i in range(CALLS)]
    t0 = time.perf_counter()
    reqs = [external_auth_pb2.CheckRequest.FromString(r) for r in raw_reqs]
    parse_us = (time.perf_counter() - t0) / CALLS * 1e6
    t0 = time.perf_counter()
    allowed = sum(_drive(servicer.Check(r, None)).status.code == 0 for r in reqs)
    check_us = (time.perf_counter() - t0) / CALLS * 1e6
    print(f"  per Check in-process: parse {parse_us:.1f} µs, Check() {check_us:.1f} µs ({allowed:,} allowed)")


if __name__ == "__main__":
    main()
