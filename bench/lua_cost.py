"""The Lua filter's own cost: Envoy CPU per request with and without ``usage.lua``.

``python -m bench.lua_cost [--seconds 10] [--rounds 3] [--body NAME ...] [--lua NAME=PATH ...]``;
before/after a change: ``--lua before=git:HEAD --lua after=control_plane/xds/usage.lua``.

One direct-response upstream Envoy (``envoy_configs.upstream``, plus a route answering an
OpenAI-like SSE stream, usage chunk included, to requests carrying ``x-bench-sse``), and front
Envoys side by side, ``--concurrency 1`` each, in front of it:

* ``plain``: the router only (``envoy_configs``' proxy route);
* one per ``--lua`` (default: ``control_plane/xds/usage.lua``): the same plus the Lua filter
  with that source inline, as ``control_plane/xds/listener.py`` configures it, and the route
  metadata the gateway gives a model route (``model``, ``default_max_tokens``).

Bodies (all ``POST /v1/chat/completions``, ``content-type: application/json``, model ``bench``):
``chat`` is the bench's standard request (no max_tokens: the Lua writes the default in);
``stream`` adds ``"stream":true`` (stream_options injected) and is answered with SSE (the usage
event stripped on the way back); ``chat-8k`` carries ~8 KB of messages (the scanner is O(body)).

Each (front, body) runs ``wrk -t2 -c16`` for ``--seconds``; the rounds alternate the fronts'
order and the median is reported. CPU per request = utime+stime of the front Envoy's process
tree (``procs.CpuMeter``) / responses. Note: the real gateway buffers the body anyway
(json_to_metadata runs first); here the Lua's ``body()`` buffers it, so the delta includes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench import envoy_configs
from bench.load import _WRK_LUA, REQUEST_BODY, REQUEST_PATH, LoadResult, run_wrk
from bench.paths import ENVOY, _ready
from bench.procs import HOST, CpuMeter, free_port, spawn, stop
from tessera.usage_line import token_terms

ROOT = Path(__file__).resolve().parents[1]
USAGE_LUA = ROOT / "control_plane" / "xds" / "usage.lua"
LUA_FILTER = "envoy.filters.http.lua"
SSE_HEADER = "x-bench-sse"
WARMUP_SECONDS = 2


def _sse_answer() -> str:
    """An OpenAI-like stream: content chunks, the finish chunk, the usage chunk, [DONE]."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench",
    }
    events = [
        {**base, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
        for i in range(4)
    ]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append(
        {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}
    )
    lines = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events]
    return "".join(lines) + "data: [DONE]\n\n"


SSE_ANSWER = _sse_answer()


def _large_body(size: int = 8192) -> str:
    """A chat body of about ``size`` bytes: a conversation with quotes and line breaks in it."""
    text = (
        'The user said "summarise this" and pasted a paragraph.\nIt has line breaks, '
        "punctuation {like braces}, [brackets], commas, colons: and a path C:\\tmp\\x. "
    )
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
    while len(json.dumps({"model": "bench", "messages": messages}, separators=(",", ":"))) < size:
        role = "user" if len(messages) % 2 else "assistant"
        messages.append({"role": role, "content": text * 3})
    return json.dumps({"model": "bench", "messages": messages}, separators=(",", ":"))


@dataclass(frozen=True)
class Body:
    name: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)


BODIES = (
    Body("chat", REQUEST_BODY),
    Body(
        "stream",
        json.dumps({**json.loads(REQUEST_BODY), "stream": True}, separators=(",", ":")),
        {SSE_HEADER: "1"},
    ),
    Body("chat-8k", _large_body()),
)


def upstream_config(port: int) -> dict[str, Any]:
    """``envoy_configs.upstream`` plus a first route answering SSE to ``x-bench-sse``."""
    config = envoy_configs.upstream(port)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    sse = {
        "match": {"prefix": "/", "headers": [{"name": SSE_HEADER, "present_match": True}]},
        "direct_response": {"status": 200, "body": {"inline_string": SSE_ANSWER}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "text/event-stream"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }
    routes.insert(0, sse)
    return config


def front_config(port: int, upstream_port: int, lua_source: str | None) -> dict[str, Any]:
    """The plain proxy (router only), or the same with the Lua filter before the router."""
    default_max_tokens = token_terms(0, 0)[0]  # a model with no default of its own
    route = envoy_configs._proxy_route()  # noqa: SLF001 - the plain proxy's own route
    route["metadata"] = {
        "filter_metadata": {LUA_FILTER: {"model": "bench", "default_max_tokens": default_max_tokens}}
    }
    filters = []
    if lua_source is not None:
        filters.append(
            {
                "name": LUA_FILTER,
                "typed_config": {
                    "@type": envoy_configs.T + "envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua_source},
                },
            }
        )
    clusters = [envoy_configs._cluster("upstream", upstream_port)]  # noqa: SLF001
    return envoy_configs._bootstrap(port, route, filters, clusters)  # noqa: SLF001


@dataclass
class Envoy:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_envoy(name: str, config: dict[str, Any], port: int, workdir: Path, base_id: int) -> Envoy:
    path = envoy_configs.write(config, workdir / f"{name}.json")
    argv = [ENVOY, "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
    argv += ["--log-level", "warning", "--base-id", str(base_id)]
    envoy = Envoy(name, port, spawn(argv, workdir / f"{name}.log"))
    try:
        _ready(envoy.url)
    except BaseException:
        stop(envoy.proc)
        raise
    return envoy


class Fleet:
    """Envoys started side by side in one temporary directory, all stopped on exit."""

    def __init__(self, prefix: str, base_id: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.workdir = Path(self._tmp.name)
        self._base_id = base_id
        self.envoys: list[Envoy] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        for envoy in reversed(self.envoys):
            stop(envoy.proc)
        self._tmp.cleanup()

    def start(self, name: str, config: Callable[[int], dict[str, Any]]) -> Envoy:
        """An Envoy named ``name`` on a free port, configured by ``config(port)``."""
        port = free_port()
        envoy = start_envoy(name, config(port), port, self.workdir, self._base_id + len(self.envoys))
        self.envoys.append(envoy)
        return envoy

    def measure(self, fronts: list[Envoy], bodies: list[Body], args: argparse.Namespace) -> Samples:
        """``measure`` with the bodies' wrk scripts and the command line's seconds, rounds, connections."""
        scripts = {b.name: wrk_body_script(self.workdir / f"wrk-{b.name}.lua", b) for b in bodies}
        return measure(
            fronts, bodies, scripts, rounds=args.rounds, seconds=args.seconds, conns=args.connections
        )


def _post(url: str, body: Body) -> tuple[int, bytes]:
    req = urllib.request.Request(  # noqa: S310 - loopback
        url + REQUEST_PATH,
        data=body.text.encode(),
        headers={"Content-Type": "application/json", **body.headers},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
        return int(resp.status), resp.read()


def check(front: Envoy, lua: bool) -> None:
    """Every body answers 200; behind the Lua (only) the stream's usage event is stripped,
    which it does only when it injected stream_options: the filter really ran."""
    for body in BODIES:
        status, answer = _post(front.url, body)
        if status != 200:
            msg = f"{front.name} answered {status} to {body.name}"
            raise RuntimeError(msg)
        if body.name == "stream" and (b'"choices":[]' in answer) == lua:
            msg = f"{front.name}: the usage event was {'not ' if lua else ''}stripped"
            raise RuntimeError(msg)


def load(front: Envoy, script: Path, seconds: int, connections: int) -> tuple[float, LoadResult]:
    """(front Envoy CPU µs per response, wrk's result)."""
    meter = CpuMeter({front.name: front.proc.pid})
    meter.start()
    result = run_wrk(front.url, script, connections=connections, seconds=seconds)
    cpu, _ = meter.stop()
    return cpu[front.name] / max(1, result.requests) * 1e6, result


def wrk_body_script(path: Path, body: Body) -> Path:
    headers = {"Content-Type": "application/json", **body.headers}
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    path.write_text(_WRK_LUA.format(path=REQUEST_PATH, body=body.text, headers=lines))
    return path


def _lua_sources(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` (or ``PATH``): a file; ``NAME=git:REV``: usage.lua as committed at REV."""
    out: dict[str, str] = {}
    for spec in specs or [f"usage.lua={USAGE_LUA}"]:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if path.startswith("git:"):
            rev = f"{path.removeprefix('git:')}:{USAGE_LUA.relative_to(ROOT)}"
            out[name] = subprocess.run(
                ["git", "show", rev], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        else:
            out[name] = Path(path).read_text()
    return out


Key = tuple[str, str]  # (front, body)


@dataclass
class Samples:
    us: dict[Key, list[float]] = field(default_factory=dict)
    rps: dict[Key, list[float]] = field(default_factory=dict)
    errors: dict[Key, int] = field(default_factory=dict)


def measure(
    fronts: list[Envoy],
    bodies: list[Body],
    scripts: dict[str, Path],
    *,
    rounds: int,
    seconds: int,
    conns: int,
) -> Samples:
    for body in bodies:
        for front in fronts:  # warm-up: connections, LuaJIT traces
            run_wrk(front.url, scripts[body.name], connections=conns, seconds=WARMUP_SECONDS)
    out = Samples()
    for r in range(rounds):
        for body in bodies:
            for front in fronts if r % 2 == 0 else fronts[::-1]:  # no front always first
                us, result = load(front, scripts[body.name], seconds, conns)
                key = (front.name, body.name)
                out.us.setdefault(key, []).append(us)
                out.rps.setdefault(key, []).append(result.rps)
                out.errors[key] = out.errors.get(key, 0) + result.errors
                print(
                    f"round {r + 1} {body.name:8} {front.name:12} {us:7.1f} µs/req {result.rps:8,.0f} req/s"
                )
    return out


def table(samples: Samples, fronts: list[str], bodies: list[Body]) -> list[str]:
    rows = [
        "| body | bytes | Envoy | µs/req | Lua Δ µs/req | req/s | errors |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for body in bodies:
        plain = statistics.median(samples.us[("plain", body.name)])
        for front in fronts:
            key = (front, body.name)
            us = statistics.median(samples.us[key])
            delta = "" if front == "plain" else f"{us - plain:+.1f}"
            rows.append(
                f"| {body.name} | {len(body.text):,} | {front} | {us:.1f} | {delta} "
                f"| {statistics.median(samples.rps[key]):,.0f} | {samples.errors[key]} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lua_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per (front, body) run")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--lua",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a Lua source to measure, NAME=PATH or NAME=git:REV (repeatable; default "
        "usage.lua=control_plane/xds/usage.lua)",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="for control scripts: skip the usage-stripped check"
    )
    parser.add_argument(
        "--body", action="append", choices=[b.name for b in BODIES], help="only these bodies (repeatable)"
    )
    args = parser.parse_args()
    sources = _lua_sources(args.lua)
    bodies = [b for b in BODIES if not args.body or b.name in args.body]
    with Fleet("tessera-lua-cost-", 9201) as fleet:
        upstream = fleet.start("upstream", upstream_config)
        fronts: list[Envoy] = []
        for name, source in [("plain", None), *sources.items()]:
            front = fleet.start(name, lambda port, src=source: front_config(port, upstream.port, src))
            if not args.no_check:
                check(front, lua=source is not None)
            fronts.append(front)
        samples = fleet.measure(fronts, bodies, args)
    print(
        f"\nFront Envoy CPU per request (utime+stime / responses), --concurrency 1, "
        f"wrk -t2 -c{args.connections} {args.seconds} s, median of {args.rounds}:\n"
    )
    print("\n".join(table(samples, [f.name for f in fronts], bodies)))


if __name__ == "__main__":
    main()
