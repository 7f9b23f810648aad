"""The request paths under test, each started once and left running for the whole bench.

(a) upstream   - the upstream Envoy itself (``direct_response``), hit directly
(b) plain      - static Envoy proxy -> (a)
(c1-grpc) / (c1-grpc-sync) / (c1-http) - static Envoy + ONE no-op Python ext_authz (grpc.aio /
    grpcio's sync server / asyncio.Protocol + httptools on uvloop) -> (a): the one-callout floor on
    each transport and gRPC server mode
(d) tessera    - ``tessera up`` with an API key; model ``bench`` routed to (a)
(d-http) - the same over ``tessera up --authz-transport http`` (when that option exists)
(e) tessera-jwt - the same stack as (d), the bearer a JWT from ``POST /oauth/token``
(f) tessera-redis - a second ``tessera up`` with ``--redis``: request and token limits whose
    counters live in Redis (reserved at admission, settled by the meter off the request path)
(g) one core   - ``taskset -c 0 tessera up`` (every process of the stack on one core), request
    and token limits on memory://; the load generator pinned to the other core

Every path answers the same ``POST /v1/chat/completions``. ``Target.pids`` names every
process whose CPU the path costs (the upstream included), for per-request CPU accounting.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import envoy_configs
from bench.load import REQUEST_BODY, REQUEST_PATH
from bench.procs import HOST, free_port, spawn, stop, until, wait_http

BIN = Path(sys.executable).parent
ENVOY = str(BIN / "envoy")
TESSERA = str(BIN / "tessera")
ENVOY_CONCURRENCY = 2  # what `tessera up` gives its Envoy
# The Python processes whose CPU per request has a target (ARCHITECTURE §6).
PYTHON_SERVICES = ("ext_authz", "ratelimit", "control_plane", "meter")


def kind(name: str) -> str:
    """A process's kind: ``ext_authz#1`` (a second replica or worker tree) is an ``ext_authz``."""
    return name.split("#", 1)[0]


@dataclass
class Target:
    name: str
    title: str
    base_url: str
    pids: dict[str, int]
    key: str | None = None
    key_id: str = ""
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cli: Callable[..., Any] | None = None  # a Tessera path: its admin CLI
    floor: str = ""  # the (c1) path this one is compared with ("vs (c1)")
    envoy_admin: str = ""  # a Tessera path: its Envoy's admin URL (callouts counted from /stats)
    client_prefix: list[str] = field(default_factory=list)  # e.g. taskset for the load generator

    def stop(self) -> None:
        for fn in reversed(self.stoppers):
            fn()


def _envoy(name: str, config: dict[str, object], workdir: Path, base_id: int) -> subprocess.Popen[bytes]:
    path = envoy_configs.write(config, workdir / f"{name}.json")
    argv = [ENVOY, "-c", str(path), "--concurrency", str(ENVOY_CONCURRENCY), "--disable-hot-restart"]
    argv += ["--log-level", "warning", "--base-id", str(base_id)]
    return spawn(argv, workdir / f"{name}.log")


def _ready(url: str) -> None:
    """Until the path answers 200 (a 503 while the services behind it start is retried)."""

    def ok() -> None:
        status = wait_http(url + REQUEST_PATH, method="POST")
        if status != 200:
            msg = f"{url} answered {status} to the bench request"
            raise RuntimeError(msg)

    until(ok, timeout=30)


def start_upstream(workdir: Path) -> Target:
    port = free_port()
    proc = _envoy("upstream", envoy_configs.upstream(port), workdir, base_id=9101)
    target = Target("a", "(a) upstream direct", f"http://{HOST}:{port}", {"upstream": proc.pid})
    target.stoppers.append(lambda: stop(proc))
    _ready(target.base_url)
    return target


def start_plain(workdir: Path, upstream: Target) -> Target:
    port = free_port()
    upstream_port = int(upstream.base_url.rsplit(":", 1)[1])
    proc = _envoy("plain", envoy_configs.plain_proxy(port, upstream_port), workdir, base_id=9102)
    pids = {"envoy": proc.pid, "upstream": upstream.pids["upstream"]}
    target = Target("b", "(b) plain Envoy", f"http://{HOST}:{port}", pids)
    target.stoppers.append(lambda: stop(proc))
    _ready(target.base_url)
    return target


_FLOORS = {  # transport -> (no-op service, Envoy's ext_authz protocol, path name, Envoy base id)
    "grpc": ("authz", "grpc", "c1g", 9103),
    "grpc-sync": ("authz-sync", "grpc", "c1s", 9105),
    "http": ("authz-http", "http", "c1h", 9104),
}


def start_authz_floor(workdir: Path, upstream: Target, transport: str) -> Target:
    """Path (c1-<transport>): static Envoy + one no-op Python ext_authz callout; ``grpc`` on
    grpc.aio, ``grpc-sync`` on grpcio's sync server, ``http`` on asyncio + httptools."""
    port, authz_port, admin_port = free_port(), free_port(), free_port()
    upstream_port = int(upstream.base_url.rsplit(":", 1)[1])
    service, protocol, name, base_id = _FLOORS[transport]
    authz = spawn(
        [sys.executable, "-m", "bench.noop_services", service, "--port", str(authz_port)],
        workdir / f"noop-{service}.log",
    )
    config = envoy_configs.authz_proxy(port, upstream_port, authz_port, protocol, admin_port)
    proc = _envoy(f"floor-{transport}", config, workdir, base_id=base_id)
    pids = {"envoy": proc.pid, "ext_authz": authz.pid, "upstream": upstream.pids["upstream"]}
    title = f"(c1-{transport}) one-callout floor"
    target = Target(name, title, f"http://{HOST}:{port}", pids)
    target.envoy_admin = f"http://{HOST}:{admin_port}"
    target.stoppers += [lambda: stop(authz), lambda: stop(proc)]
    _ready(target.base_url)  # 200 only once the no-op service answers (fails closed)
    return target


def tessera_has_http_authz() -> bool:
    """Whether this tree's ``tessera up`` has ``--authz-transport`` (ext_authz over HTTP)."""
    out = subprocess.run([TESSERA, "up", "--help"], capture_output=True, text=True, timeout=60, check=False)
    return "--authz-transport" in out.stdout


class TesseraStack:
    """``tessera up`` in a temp data dir, driven with the CLI like an operator would."""

    def __init__(self, workdir: Path, name: str = "tessera") -> None:
        self.root = workdir / name
        self.port, self.admin_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> Any:
        argv = [TESSERA, *args, "--data-dir", str(self.root), "--output", "json"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            msg = f"tessera {' '.join(args)} failed: {out.stderr.strip()}"
            raise RuntimeError(msg)
        return json.loads(out.stdout) if out.stdout.strip() else None

    def start(self, per_ip_rps: int, *extra: str, prefix: tuple[str, ...] = ()) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env["TESSERA_GATEWAY__PER_IP_REQUESTS_PER_SECOND"] = str(per_ip_rps)
        env["TESSERA_GATEWAY__PER_IP_BURST"] = str(per_ip_rps)
        log = self.root.parent / f"{self.root.name}-up.log"
        argv = [*prefix, TESSERA, "up", "--port", str(self.port), "--admin-port", str(self.admin_port)]
        argv += ["--data-dir", str(self.root), *extra]
        self.proc = spawn(argv, log, env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"tessera up exited ({self.proc.returncode}); see {log}"
                raise RuntimeError(msg)
            if "Ctrl-C stops everything" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        msg = f"tessera up not ready after 120s; see {log}"
        raise RuntimeError(msg)

    def endpoints(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / "endpoints.json").read_text())
        return data

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace=30)


def _wait_allowed(url: str, key: str, timeout: float = 30.0) -> None:
    """Poll until the key is accepted and the model routed (policy + xDS have propagated)."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(  # noqa: S310 - loopback
            url + REQUEST_PATH,
            data=REQUEST_BODY.encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    msg = f"the bench key was not accepted within {timeout:.0f}s: {last}"
    raise RuntimeError(msg)


def start_tessera(workdir: Path, upstream: Target, *, request_limit: int, transport: str = "grpc") -> Target:
    """Path (d): the embedded stack (memory:// counters) with one request limit; ``transport``
    ``http`` is path (d-http), ``tessera up --authz-transport http``."""
    extra: tuple[str, ...] = ()
    if transport == "grpc":
        target = Target("d", "(d) Tessera, API key", "", {}, floor="c1g")
        stack = TesseraStack(workdir)
    else:
        target = Target("dh", "(d-http) Tessera, API key", "", {}, floor="c1h")
        stack, extra = TesseraStack(workdir, "tessera-http"), ("--authz-transport", transport)
    limits = []
    if request_limit:
        # A limit that never trips, so admission really counts every request.
        limits.append(["--kind", "requests", "--window", "minute", "--limit", str(request_limit)])
        target.notes.append(f"request limit {request_limit}/minute on the tenant (never trips)")
    return _tessera_path(target, stack, upstream, limits, *extra)


def start_tessera_one_core(workdir: Path, upstream: Target, *, limit: int, core: int = 0) -> Target:
    """Path (g): the whole stack pinned to one core (``taskset``; children inherit it), request and
    token limits on memory://; the load generator is pinned to another core."""
    target = Target("g", "(g) Tessera, one core", "", {}, floor="c1g")
    others = sorted(os.sched_getaffinity(0) - {core}) or [core]
    target.client_prefix = ["taskset", "-c", ",".join(map(str, others))]
    limits = [
        ["--kind", "requests", "--window", "minute", "--limit", str(limit)],
        ["--kind", "tokens", "--window", "minute", "--limit", str(limit)],
    ]
    target.notes.append(
        f"(g): `taskset -c {core} tessera up`, request and token limits of {limit}/minute, "
        f"load generator on cores {target.client_prefix[-1]}"
    )
    stack = TesseraStack(workdir, "tessera-1core")
    return _tessera_path(target, stack, upstream, limits, prefix=("taskset", "-c", str(core)))


def start_tessera_redis(
    workdir: Path,
    upstream: Target,
    *,
    redis_url: str,
    limit: int,
    extra: tuple[str, ...] = (),
    name: str = "tessera-redis",
) -> Target:
    """Path (f): a second stack with its counters in Redis and the tenant under a request
    limit and a token limit, both reserved at request time and the tokens settled at stream end."""
    target = Target("f", "(f) Tessera, limits on redis://", "", {}, floor="c1g")
    limits = [
        ["--kind", "requests", "--window", "minute", "--limit", str(limit)],
        ["--kind", "tokens", "--window", "minute", "--limit", str(limit)],
    ]
    target.notes.append(f"request and token limits of {limit}/minute (never trip), counters in {redis_url}")
    return _tessera_path(target, TesseraStack(workdir, name), upstream, limits, "--redis", redis_url, *extra)


def _tessera_path(
    target: Target,
    stack: TesseraStack,
    upstream: Target,
    limits: list[list[str]],
    *extra: str,
    prefix: tuple[str, ...] = (),
) -> Target:
    target.base_url = f"http://{HOST}:{stack.port}"
    target.stoppers.append(stack.stop)
    target.cli = stack.cli
    try:
        stack.start(1_000_000, *extra, prefix=prefix)
        stack.cli("tenants", "create", "bench")
        created = stack.cli("keys", "create", "--tenant", "bench", "--name", "bench")
        target.key = str(created["key"])
        target.key_id = str(created["id"])
        stack.cli("models", "add", "bench", "--backend", upstream.base_url)
        for args in limits:
            stack.cli("limits", "create", "--tenant", "bench", *args)
        _wait_allowed(target.base_url, target.key)
    except BaseException:
        target.stop()
        raise
    ep = stack.endpoints()
    pids = ep["pids"]
    # Every child of the supervisor, by kind: envoy, ext_authz (every replica), ratelimit,
    # control_plane, meter (it ingests every usage line and settles reservations, same machine).
    target.pids = {}
    for theirs, pid in sorted(pids.items()):
        ours = theirs.replace("-", "_")
        base = next(
            (k for k in ("ext_authz", "ratelimit", "control_plane", "meter", "envoy") if ours.startswith(k)),
            ours,
        )
        name = (
            base if base not in target.pids else f"{base}#{sum(k.split('#')[0] == base for k in target.pids)}"
        )
        target.pids[name] = int(pid)
    target.envoy_admin = str(ep["envoy_admin"])
    target.pids["supervisor"] = int(ep["supervisor_pid"])
    target.pids["upstream"] = upstream.pids["upstream"]
    return target


def start_tessera_jwt(tessera: Target) -> Target:
    """Path (e): the stack of (d), called with a JWT (client credentials on the API key)."""
    import urllib.parse  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    if tessera.key is None or not tessera.key_id:
        msg = "start_tessera must have minted a key first"
        raise RuntimeError(msg)
    form = {"grant_type": "client_credentials", "client_id": tessera.key_id, "client_secret": tessera.key}
    req = urllib.request.Request(  # noqa: S310 - loopback
        tessera.base_url + "/oauth/token",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        token = str(json.loads(resp.read())["access_token"])
    _wait_allowed(tessera.base_url, token)
    target = Target("e", "(e) Tessera, JWT", tessera.base_url, dict(tessera.pids), key=token, floor="c1g")
    target.envoy_admin = tessera.envoy_admin
    target.notes.append("same stack as (d); bearer = JWT (ES256, jwt_authn + ext_authz key-id lookup)")
    return target


def key_suffix(key: str | None) -> str:
    """A log-safe form of a key: never print the secret."""
    return re.sub(r"_[A-Za-z0-9_-]{43}$", "_…", key) if key else "-"
