"""``tessera up``: the whole stack on one machine under one long-lived supervisor.

Start order: migrate → control plane (serving) → ext_authz (gRPC or, with
``--authz-transport http``, HTTP/1.1) + ratelimit (serving, i.e. holding a policy
snapshot) → demo upstream (optional; model ``demo`` registered) → Envoy (its bootstrap
rendered from ``envoy/``; everything else arrives over xDS). ``endpoints.json`` and
``admin.json`` are written before Envoy starts. A child that dies is restarted with
backoff (Envoy only once the control plane serves again). SIGINT/SIGTERM stop every
child; children also get SIGTERM from the kernel if the supervisor itself dies
(PR_SET_PDEATHSIG), so no orphans.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import secrets
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from tessera import llm, ports, usage_line
from tessera.bootstrap import BootstrapParams, render_bootstrap
from tessera.datadir import DataDir, resolve_data_dir, write_json
from tessera.demo_upstream.schema import DEFAULT_MAX_TOKENS as DEMO_DEFAULT_MAX_TOKENS
from tessera.envoy_tls import inline_certificate, write_inline_identity
from tessera.identity import Authority, spiffe_id
from tessera.keys import ensure_pepper
from tessera.probe import active_requests, grpc_serving, http_post, http_status, unix_url
from tessera.settings import IdentitySettings, TracingSettings
from tessera.tls import client_context
from tessera.workers import die_with_parent

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
DRAIN_SECONDS = 2  # listeners drain this long on SIGHUP
RESTART_STREAM_GRACE = 60.0  # then streams in flight get this long to end
METER_STOP_GRACE = 30.0  # the meter reads the log to its end before it exits


USAGE_FLUSH_MSEC = 200


def _say(msg: str) -> None:
    print(f"tessera up: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    return ports.free_port(HOST)


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Any  # async () -> bool
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0

    async def start(self) -> None:
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a lost log volume
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            preexec_fn=die_with_parent,
        )
        log.close()
        self.started_at = time.monotonic()

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                msg = (
                    f"{self.name} exited with code {self.proc.returncode} during startup; see {self.log_path}"
                )
                raise StartupError(msg)
            if await self.ready():
                return
            await asyncio.sleep(0.1)
        msg = f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}"
        raise StartupError(msg)

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace``; its exit code (None: it never started)."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode  # it had exited by itself
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            return await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            _say(f"{self.name} did not stop within {grace:.0f}s of SIGTERM: killed")
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return await self.proc.wait()


# Every internal surface is mutual TLS; each component holds its own identity. "operator" is
# the admin CLI's (admin.json names its files), "envoy" is Envoy's (its node in the SPIFFE ID).
MTLS_COMPONENTS = ("ext-authz", "ratelimit", "meter", "supervisor", "control-plane", "operator")
IDENTITY_CHECK_SECONDS = 600.0  # certificates live 24 h and are renewed past half of it


class StartupError(Exception):
    pass


@dataclass
class Ports:
    gateway: int
    admin: int
    xds: int = field(default_factory=free_port)
    cp_http: int = field(default_factory=free_port)
    cp_metrics: int = field(default_factory=free_port)
    ext_authz: list[int] = field(default_factory=list)  # one port per replica
    ext_authz_metrics: list[int] = field(default_factory=list)
    ratelimit: int = field(default_factory=free_port)
    ratelimit_admission: int = field(default_factory=free_port)  # ext_authz's admission streams
    ratelimit_metrics: int = field(default_factory=free_port)
    envoy_stats: int = field(default_factory=free_port)  # Envoy's /stats/prometheus and /ready
    admin_rest: int = field(default_factory=free_port)  # --admin-rest internal: its listener
    policy: int = field(default_factory=free_port)  # the control plane's policy stream
    demo: int = field(default_factory=free_port)
    meter_metrics: int = field(default_factory=free_port)
    llm: int = field(default_factory=free_port)


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dd = DataDir(resolve_data_dir(args.data_dir))
        ports.reserve(args.port, args.admin_port)  # chosen by the caller: never picked for another
        self.ports = Ports(gateway=args.port, admin=args.admin_port)
        self.authz_replicas = max(1, args.ext_authz_replicas)
        self.authz_workers = max(1, args.ext_authz_workers)
        self.authz_transport: str = getattr(args, "authz_transport", "grpc")
        self.ports.ext_authz = [free_port() for _ in range(self.authz_replicas)]
        self.ports.ext_authz_metrics = [free_port() for _ in range(self.authz_replicas)]
        self.db_url = args.db or f"sqlite+aiosqlite:///{self.dd.database}"
        self.authority: Authority | None = None
        self.identities: dict[str, IdentitySettings] = {}
        self.identities_checked = 0.0
        self.token = "tadm_" + secrets.token_urlsafe(32)
        self.children: dict[str, Child] = {}
        self.stopping = asyncio.Event()
        bindir = Path(sys.executable).parent
        self.python = sys.executable
        self.envoy = str(bindir / "envoy")
        self.node_id = f"tessera-{socket.gethostname()}"
        self.usage_log = self.dd.logs / "access.log"  # Envoy's usage lines (tessera/usage_line.py)
        # Envoy admin: a unix socket only this user can open (mode 0600, in the 0700 data dir)
        self.envoy_admin = self.dd.run / "envoy-admin.sock"
        self.envoy_identity = self.dd.root / "identity" / "envoy-sds.json"  # Envoy's certificate
        self.admin_rest: str = getattr(args, "admin_rest", "public")
        self.gateway_tls: tuple[Path, Path] | None = None  # (certificate, key) with --tls
        self.reloading = False
        self.rotate_now = False  # SIGUSR1: issue every certificate again now

    # --- environment -------------------------------------------------------------------------

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        # Log levels, gateway knobs (e.g. the per-IP guard), JWT settings, ext_authz's gRPC
        # server mode (TESSERA_GRPC_SERVER, _THREADS; the other services ignore it) and the
        # usage backstop's timing (ratelimit's TESSERA_BACKSTOP_*, the meter's poll) pass through.
        passthrough = (
            "TESSERA_LOG__",
            "TESSERA_GATEWAY__",
            "TESSERA_JWT__",
            "TESSERA_BILLING__",
            "TESSERA_GRPC_SERVER",
            "TESSERA_ADMISSION__TIMEOUT_SECONDS",
            "TESSERA_BACKSTOP_",
            "TESSERA_METER__BACKSTOP_POLL_SECONDS",
        )
        keep = {k: v for k, v in os.environ.items() if k.startswith(passthrough)}
        tracing = {
            "TESSERA_TRACING__OTLP_ENDPOINT": self.args.otlp_endpoint,
            "TESSERA_TRACING__SAMPLING_PERCENT": str(self.args.trace_sampling),
        }
        return {**env, **keep, "TESSERA_LOG__FORMAT": "json", **tracing, **extra}

    def _cp_env(self) -> dict[str, str]:
        p = self.ports
        return self._env(
            {
                "TESSERA_DATABASE__URL": self.db_url,
                "TESSERA_PEPPER__FILE": str(self.dd.pepper),
                "TESSERA_ADMIN_TOKEN": self.token,
                "TESSERA_ADMIN__PORT": str(p.admin),
                "TESSERA_XDS__PORT": str(p.xds),
                "TESSERA_POLICY_SERVER__PORT": str(p.policy),
                "TESSERA_HTTP__PORT": str(p.cp_http),
                "TESSERA_METRICS__PORT": str(p.cp_metrics),
                "TESSERA_GATEWAY__HOST": self.args.host,
                "TESSERA_GATEWAY__PORT": str(p.gateway),
                "TESSERA_GATEWAY__ACCESS_LOG_PATH": str(self.usage_log),
                # The listener's ext_authz speaks what the ext_authz children serve.
                "TESSERA_GATEWAY__AUTHZ_TRANSPORT": self.authz_transport,
                "TESSERA_GATEWAY__ADMIN_REST": self.admin_rest,
                "TESSERA_GATEWAY__ADMIN_REST_PORT": str(p.admin_rest),
                "TESSERA_GATEWAY__ENVOY_IDENTITY_SDS": str(self.envoy_identity),
                "TESSERA_GATEWAY__ENVOY_CA_FILE": str(self.identities["control-plane"].ca_file),
                **self._gateway_tls_env(),
                **self._identity_env("control-plane"),
                **(
                    {"TESSERA_CONFIG_DIR": str(Path(self.args.config_dir).resolve())}
                    if getattr(self.args, "config_dir", None)
                    else {}
                ),
            }
        )

    def _gateway_ca(self) -> str | None:
        """The CA a client of the gateway trusts (--tls), else None."""
        if self.gateway_tls is None:
            return None
        own = self.dd.root / "gateway-tls" / "ca.pem"
        return str(own) if own.exists() and not getattr(self.args, "tls_cert", None) else None

    def _gateway_probe_tls(self) -> ssl.SSLContext | None:
        """How the readiness probe speaks TLS to its own Envoy on loopback: checking our own CA
        (--tls); with --tls-cert the chain may end at a CA this machine does not know, and the
        probe asks only whether the listener answers, so it does not verify."""
        if self.gateway_tls is None:
            return None
        if (ca := self._gateway_ca()) is not None:
            return ssl.create_default_context(cafile=ca)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def _gateway_tls_env(self) -> dict[str, str]:
        if self.gateway_tls is None:
            return {}
        cert, key = self.gateway_tls
        return {"TESSERA_GATEWAY__TLS_CERT_FILE": str(cert), "TESSERA_GATEWAY__TLS_KEY_FILE": str(key)}

    def endpoints(self) -> dict[str, Any]:
        p = self.ports
        scheme = "https" if self.gateway_tls else "http"
        out: dict[str, Any] = {
            "gateway": f"{scheme}://{self.args.host}:{p.gateway}",
            "admin": f"{HOST}:{p.admin}",
            "xds": f"{HOST}:{p.xds}",
            "policy": f"{HOST}:{p.policy}",  # mutual TLS
            "control_plane_http": f"https://{HOST}:{p.cp_http}",  # mutual TLS: Envoy only
            "envoy_node": self.node_id,
            "ext_authz": f"{HOST}:{p.ext_authz[0]}",
            "ext_authz_transport": self.authz_transport,
            "ext_authz_replicas": [f"{HOST}:{port}" for port in p.ext_authz],
            "ratelimit": f"{HOST}:{p.ratelimit}",
            "ratelimit_admission_stream": f"{HOST}:{p.ratelimit_admission}",  # mutual TLS
            "envoy_admin": unix_url(str(self.envoy_admin)),  # an http+unix URL (tessera.probe)
            "metrics": {
                "control_plane": f"http://{HOST}:{p.cp_metrics}/metrics",
                "ext_authz": f"http://{HOST}:{p.ext_authz_metrics[0]}/metrics",
                "ratelimit": f"http://{HOST}:{p.ratelimit_metrics}/metrics",
                "meter": f"http://{HOST}:{p.meter_metrics}/metrics",
                "envoy": f"http://{HOST}:{p.envoy_stats}/stats/prometheus",
            },
            # mutual TLS on every internal port: the CA their certificates chain to
            "internal_ca": str(self.identities["control-plane"].ca_file),
            "pids": {name: c.proc.pid for name, c in self.children.items() if c.proc},
            "supervisor_pid": os.getpid(),
        }
        if (ca := self._gateway_ca()) is not None:
            out["gateway_ca"] = ca
        if self.admin_rest == "internal":
            out["admin_rest"] = f"{scheme}://{HOST}:{p.admin_rest}"
        if self.args.demo_upstream:
            out["demo_upstream"] = f"http://{HOST}:{p.demo}"
            out["metrics"]["demo_upstream"] = f"http://{HOST}:{p.demo}/metrics"
        if self.args.real_model:
            out["llama_server"] = f"http://{HOST}:{p.llm}"
            out["metrics"]["llama_server"] = f"http://{HOST}:{p.llm}/metrics"
        return out

    def _scrape_targets(self) -> dict[str, list[str]]:
        """Every process's metrics URL by name; each ext_authz replica (one worker each: with
        more, a worker's port is its own ephemeral one and not listed)."""
        targets = {name: [url] for name, url in self.endpoints()["metrics"].items()}
        if self.authz_workers == 1:
            targets["ext_authz"] = [f"http://{HOST}:{port}/metrics" for port in self.ports.ext_authz_metrics]
        return targets

    # --- children ----------------------------------------------------------------------------

    def _child(self, name: str, argv: list[str], env: dict[str, str], ready: Any) -> Child:
        child = Child(name, argv, env, self.dd.logs / f"{name}.log", ready)
        self.children[name] = child
        return child

    def _authz_ready(self, port: int) -> Any:
        """Serving once it holds a policy snapshot: gRPC health, or ``GET /healthz`` (200)."""
        me = self.identities["supervisor"]
        if self.authz_transport == "http":  # mutual TLS: any identity from the CA may read /healthz
            url = f"https://{HOST}:{port}/healthz"
            return functools.partial(http_status, url, expect=200, context=client_context(me))
        return functools.partial(grpc_serving, f"{HOST}:{port}", identity=me, peer="ext-authz")

    def _define_children(self) -> None:
        p = self.ports
        policy_url = f"{HOST}:{p.policy}"
        self._child(
            "control-plane",
            [self.python, "-m", "control_plane", "serve"],
            self._cp_env(),
            lambda: grpc_serving(
                f"{HOST}:{p.admin}", identity=self.identities["supervisor"], peer="control-plane"
            ),
        )

        # ext_authz admits by ratelimit's counters over one stream; the meter settles there.
        admission_url = f"{HOST}:{p.ratelimit}"
        for i, (port, metrics) in enumerate(zip(p.ext_authz, p.ext_authz_metrics, strict=True)):
            # Replica 0 is "ext-authz"; each replica may run several workers on its port.
            self._child(
                "ext-authz" if i == 0 else f"ext-authz-{i + 1}",
                [self.python, "-m", "ext_authz", "serve", "--workers", str(self.authz_workers)],
                self._env(
                    {
                        "TESSERA_TRANSPORT": self.authz_transport,
                        "TESSERA_GRPC__PORT": str(port),
                        # Worker i serves metrics on base + i; only the base is listed.
                        "TESSERA_METRICS__PORT": str(metrics if self.authz_workers == 1 else 0),
                        "TESSERA_POLICY__URL": policy_url,
                        "TESSERA_PEPPER__FILE": str(self.dd.pepper),
                        "TESSERA_ADMISSION__URL": admission_url,
                        "TESSERA_ADMISSION__STREAM_URL": f"{HOST}:{p.ratelimit_admission}",
                        **self._identity_env("ext-authz"),
                    }
                ),
                self._authz_ready(port),
            )
        self._child(
            "ratelimit",
            [self.python, "-m", "ratelimit", "serve"],
            self._env(
                {
                    "TESSERA_GRPC__PORT": str(p.ratelimit),
                    "TESSERA_METRICS__PORT": str(p.ratelimit_metrics),
                    "TESSERA_ADMISSION_STREAM__PORT": str(p.ratelimit_admission),
                    "TESSERA_POLICY__URL": policy_url,
                    "TESSERA_REDIS__URL": self.args.redis,
                    **self._identity_env("ratelimit"),
                }
            ),
            lambda: grpc_serving(
                f"{HOST}:{p.ratelimit}", identity=self.identities["supervisor"], peer="ratelimit"
            ),
        )
        if self.args.demo_upstream:
            self._child(
                "demo-upstream",
                [self.python, "-m", "tessera.demo_upstream", "--port", str(p.demo), "--model", "demo"],
                self._env({}),
                lambda: http_status(f"http://{HOST}:{p.demo}/health", expect=200),
            )
        if self.args.real_model:
            self._child(
                "llama-server",
                llm.server_argv(llm.binary_path(), llm.model_path(), HOST, p.llm),
                self._env({}),
                lambda: http_status(f"http://{HOST}:{p.llm}/health", expect=200),
            )
        self._child(
            "meter",
            [self.python, "-m", "control_plane.usage", "--log", str(self.usage_log), "--node", self.node_id],
            self._env(
                {
                    "TESSERA_DATABASE__URL": self.db_url,
                    "TESSERA_METRICS__PORT": str(p.meter_metrics),
                    "TESSERA_METER__ENVOY_ADMIN": f"unix:{self.envoy_admin}",
                    "TESSERA_ADMISSION__URL": admission_url,
                    **self._identity_env("meter"),
                }
            ),
            lambda: http_status(f"http://{HOST}:{p.meter_metrics}/metrics", expect=200),
        )
        bootstrap = self.dd.run / "envoy.yaml"
        self._child(
            "envoy",
            [
                self.envoy,
                "-c",
                str(bootstrap),
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "--log-level",
                "warning",
                # The usage log reaches the meter (and so settles slots and reservations) within
                # a fraction of a second (Envoy's default is 10 s).
                "--file-flush-interval-msec",
                str(USAGE_FLUSH_MSEC),
                # A SIGHUP drains the listeners for this long before the restart (the default 600).
                "--drain-time-s",
                str(DRAIN_SECONDS),
            ],
            self._env({usage_line.NODE_ENV: self.node_id}),
            # 401 means: listener up, routes loaded, ext_authz answering.
            lambda: http_status(
                self.endpoints()["gateway"] + "/v1/models", expect=401, context=self._gateway_probe_tls()
            ),
        )

    def _write_bootstrap(self) -> None:
        p = self.ports
        text = render_bootstrap(
            BootstrapParams(
                node_id=self.node_id,
                admin_socket=str(self.envoy_admin),
                stats_host=HOST,
                stats_port=p.envoy_stats,
                xds_host=HOST,
                xds_port=p.xds,
                ext_authz=tuple((HOST, port) for port in p.ext_authz),
                identity_sds=str(self.envoy_identity),
                ca_file=str(self.identities["control-plane"].ca_file),
            )
        )
        (self.dd.run / "envoy.yaml").write_text(text)

    async def _migrate(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "control_plane",
            "migrate",
            env=self._cp_env(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            msg = f"database migration failed: {err.decode(errors='replace').strip()[-2000:]}"
            raise StartupError(msg)

    async def _seed_demo(self) -> dict[str, str]:
        """Register model ``demo`` (and ``gemma-3-270m`` on the real server) and mint a demo key
        (printed once for the curl line)."""
        from tessera.admin.v1 import admin_pb2 as pb  # noqa: PLC0415
        from tessera.admin_client import AdminClient  # noqa: PLC0415

        def seed() -> dict[str, str]:
            import grpc  # noqa: PLC0415

            with AdminClient(self._admin_target()) as c:
                if self.args.demo_upstream:
                    backend = pb.Backend(url=f"http://{HOST}:{self.ports.demo}", kind="vllm")
                    c.call(
                        "AddModel", pb.AddModelRequest(name="demo", backend=backend, replace_backends=True)
                    )
                    # The gateway writes a model's default into bodies that name none: the demo
                    # upstream's own (like vLLM's default from the model's generation config).
                    demo_defaults = pb.UpdateModelRequest(
                        name="demo",
                        update_mask=["default_max_tokens"],
                        default_max_tokens=DEMO_DEFAULT_MAX_TOKENS,
                    )
                    c.call("UpdateModel", demo_defaults)
                if self.args.real_model:
                    real = pb.Backend(url=f"http://{HOST}:{self.ports.llm}", kind="llamacpp")
                    c.call(
                        "AddModel",
                        pb.AddModelRequest(name=llm.MODEL_NAME, backend=real, replace_backends=True),
                    )
                    # Always a max_tokens: without one the base model writes until its context is full.
                    defaults = pb.UpdateModelRequest(
                        name=llm.MODEL_NAME,
                        update_mask=["default_max_tokens", "max_max_tokens"],
                        default_max_tokens=llm.DEFAULT_MAX_TOKENS,
                        max_max_tokens=llm.MAX_MAX_TOKENS,
                    )
                    c.call("UpdateModel", defaults)
                try:
                    c.call("CreateTenant", pb.CreateTenantRequest(name="demo"))
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                key = c.call("CreateApiKey", pb.CreateApiKeyRequest(tenant="demo", name="make-run"))
                return {"id": key.id, "key": key.key}

        return await asyncio.to_thread(seed)

    # --- lifecycle ---------------------------------------------------------------------------

    def preflight(self) -> None:
        for what, port, host, flag in (
            ("gateway", self.ports.gateway, self.args.host, "--port"),
            ("admin", self.ports.admin, HOST, "--admin-port"),
        ):
            if port_taken(host, port):
                msg = f"the {what} port {host}:{port} is already in use (choose another with {flag})"
                raise StartupError(msg)
        if not Path(self.envoy).exists():
            msg = f"no Envoy binary at {self.envoy}: run `make install`"
            raise StartupError(msg)
        if self.args.real_model and not llm.available():
            msg = f"no llama-server and Gemma 3 270M in {llm.cache_dir()}: run `make llm` (once, ~4 min)"
            raise StartupError(msg)

    async def start(self) -> dict[str, str] | None:
        self.dd.ensure()
        ensure_pepper(self.dd.pepper)
        self._renew_identities()
        self._gateway_certificate()
        operator = self.identities["operator"]
        write_json(
            self.dd.admin,
            {
                "admin_url": f"{HOST}:{self.ports.admin}",
                "token": self.token,
                # the admin API is mutual TLS: the CLI presents the operator's identity
                "cert_file": str(operator.cert_file),
                "key_file": str(operator.key_file),
                "ca_file": str(operator.ca_file),
            },
            private=True,
        )
        await self._migrate()
        self._define_children()
        for name in ("control-plane",):
            await self.children[name].start()
            await self.children[name].wait_ready()
        services = [c for n, c in self.children.items() if n not in {"control-plane", "envoy"}]
        for c in services:
            await c.start()
        for c in services:
            await c.wait_ready()
        demo_key = await self._seed_demo() if self.args.demo_upstream or self.args.real_model else None
        self._write_bootstrap()
        write_json(self.dd.endpoints, self.endpoints())
        await self.children["envoy"].start()
        await self.children["envoy"].wait_ready()
        write_json(self.dd.endpoints, self.endpoints())
        write_json(self.dd.prometheus, prometheus_config(self._scrape_targets()))  # JSON is YAML
        return demo_key

    def _admin_target(self) -> Any:
        from tessera.admin_client import AdminTarget  # noqa: PLC0415

        return AdminTarget(f"{HOST}:{self.ports.admin}", self.token, *self.identities["operator"].files)

    def _renew_identities(self, *, force: bool = False) -> None:
        """Issue each internal identity on first start, and again past half its life or when
        ``force``d (the services and Envoy reload renewed files without a restart)."""
        self.authority = self.authority or Authority(self.dd.root / "identity")
        for name in MTLS_COMPONENTS:
            self.identities[name] = self.authority.ensure(name, spiffe_id(name), force=force)
        envoy = self.authority.ensure("envoy", spiffe_id("envoy", node=self.node_id), force=force)
        self.identities["envoy"] = envoy
        cert, key = (path.read_bytes() for path in envoy.files[:2])
        if inline_certificate(self.envoy_identity) != cert:
            write_inline_identity(self.envoy_identity, cert, key)  # Envoy watches the file
        self.identities_checked = time.monotonic()

    def _gateway_certificate(self, *, force: bool = False) -> None:
        """``--tls``: the files given, or a certificate for the gateway's host from a CA of its
        own in ``<data-dir>/gateway-tls/`` (clients trust its ca.pem; never the internal CA)."""
        args = self.args
        if getattr(args, "tls_cert", None) and getattr(args, "tls_key", None):
            self.gateway_tls = (Path(args.tls_cert), Path(args.tls_key))
        elif getattr(args, "tls", False):
            authority = Authority(self.dd.root / "gateway-tls")
            names = tuple(dict.fromkeys(("localhost", args.host)))
            files = authority.ensure("gateway", spiffe_id("gateway"), hosts=names, force=force)
            self.gateway_tls = files.files[:2]

    def _identity_env(self, name: str) -> dict[str, str]:
        files = self.identities[name]
        return {
            "TESSERA_IDENTITY__CERT_FILE": str(files.cert_file),
            "TESSERA_IDENTITY__KEY_FILE": str(files.key_file),
            "TESSERA_IDENTITY__CA_FILE": str(files.ca_file),
        }

    async def supervise(self) -> None:
        """Restart crashed children with backoff until asked to stop; renew identities."""
        while not self.stopping.is_set():
            if time.monotonic() - self.identities_checked > IDENTITY_CHECK_SECONDS or self.rotate_now:
                force, self.rotate_now = self.rotate_now, False
                try:
                    self._renew_identities(force=force)
                    self._gateway_certificate(force=force)
                    if force:
                        _say("SIGUSR1: every certificate issued again")
                except (OSError, ValueError) as exc:  # the current ones stay valid for hours
                    self.identities_checked = time.monotonic() - IDENTITY_CHECK_SECONDS + 30
                    _say(f"error: renewing the workload certificates failed ({exc}); retrying in 30 s")
            for child in self.children.values():
                proc = child.proc
                if proc is None or proc.returncode is None or self.stopping.is_set():
                    continue
                if child.name == "envoy" and self.reloading:
                    continue  # restart_envoy is at work
                await self._restart(child, proc.returncode)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.2)

    async def _restart(self, child: Child, code: int) -> None:
        ran = time.monotonic() - child.started_at
        if ran > 30:  # noqa: PLR2004 - a child that ran a while starts with a fresh backoff
            child.restarts = 0
        delay = min(0.2 * (2**child.restarts), 10.0)
        child.restarts += 1
        _say(f"{child.name} exited (code {code}); restarting in {delay:.1f}s (restart #{child.restarts})")
        await asyncio.sleep(delay)
        if child.name == "envoy":
            # Envoy keeps xDS config in memory only: start it once the control plane serves.
            try:
                await self.children["control-plane"].wait_ready(timeout=delay + 5)
            except StartupError as exc:
                _say(f"envoy waits for the control plane: {exc}")
                return  # still exited: the next round tries again with a longer backoff
        await child.start()
        write_json(self.dd.endpoints, self.endpoints())

    async def restart_envoy(self) -> None:
        """SIGHUP: drain Envoy's listeners (connections are asked to close, streams in flight run
        to their end), stop it once nothing is in flight, start a fresh one. Its usage lines are
        all in the log before it exits; the meter reads on."""
        if self.reloading or "envoy" not in self.children:
            return
        self.reloading = True
        envoy = self.children["envoy"]
        try:
            _say("SIGHUP: draining Envoy's listeners, then restarting Envoy")
            await self._drain_envoy()
            await envoy.stop(grace=10.0)
            await envoy.start()
            await envoy.wait_ready()
            write_json(self.dd.endpoints, self.endpoints())
            _say("Envoy restarted")
        except StartupError as exc:
            _say(f"Envoy restart: {exc}")  # the supervisor keeps trying
        finally:
            self.reloading = False

    async def _drain_envoy(self, listeners_seconds: float = DRAIN_SECONDS) -> None:
        """Ask Envoy's connections to close, give its listeners ``listeners_seconds``, then wait
        (bounded) for the requests in flight."""
        admin = unix_url(str(self.envoy_admin))
        await http_post(f"{admin}/drain_listeners?graceful")
        deadline = time.monotonic() + listeners_seconds + RESTART_STREAM_GRACE
        await asyncio.sleep(listeners_seconds)
        while time.monotonic() < deadline:
            if await active_requests(admin) == 0:
                break
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Envoy first, drained (requests in flight end, their usage lines written); then the
        meter, which reads the log to its end before it exits; the services; the control plane."""
        self.stopping.set()
        envoy = self.children.get("envoy")
        if envoy is not None and envoy.proc is not None and envoy.proc.returncode is None:
            with contextlib.suppress(Exception):  # not answering (or garbled): stopped as it is
                await self._drain_envoy(listeners_seconds=0)  # stopping: no new requests anyway
        middle = [n for n in reversed(self.children) if n not in {"envoy", "meter", "control-plane"}]
        codes = {}
        for name in ["envoy", "meter", *middle, "control-plane"]:
            if name in self.children:
                codes[name] = await self.children[name].stop(
                    grace=METER_STOP_GRACE if name == "meter" else 5.0
                )
        _say("stopped: " + " ".join(f"{name}={code}" for name, code in codes.items()))


def _banner(stack: Stack, demo_key: dict[str, str] | None) -> None:
    ep = stack.endpoints()
    print(f"Tessera is up. Gateway: {ep['gateway']}")
    print(f"  admin API (gRPC, mutual TLS): {ep['admin']}   data dir: {stack.dd.root}")
    print(f"  Envoy admin: unix socket {stack.envoy_admin}   logs: {stack.dd.logs}")
    if "gateway_ca" in ep:
        print(f"  gateway CA (clients trust it): {ep['gateway_ca']}")
    for name, url in ep["metrics"].items():
        print(f"  metrics {name}: {url}")
    if demo_key:
        ca = f"--cacert {ep['gateway_ca']} " if "gateway_ca" in ep else ""
        print(f"\nDemo key (shown once): {demo_key['key']}")
        print("Try it:\n")
        print(
            f"curl -s {ca}{ep['gateway']}/v1/chat/completions -H 'Authorization: Bearer {demo_key['key']}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model": "demo", "messages": [{"role": "user", "content": "Hello Tessera"}]}\''
        )
    print("\nCtrl-C stops everything.", flush=True)


async def _main(args: argparse.Namespace) -> int:
    stack = Stack(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stack.stopping.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.create_task(stack.restart_envoy())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    def on_sigusr1() -> None:
        stack.rotate_now = True

    loop.add_signal_handler(signal.SIGUSR1, on_sigusr1)
    try:
        stack.preflight()
        starting = asyncio.create_task(stack.start())
        stop_wait = asyncio.create_task(stack.stopping.wait())
        done, _ = await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting not in done:
            starting.cancel()
            await stack.stop()
            return 130
        stop_wait.cancel()
        demo_key = starting.result()
        _banner(stack, demo_key)
        await stack.supervise()
    except StartupError as exc:
        _say(f"error: {exc}")
        await stack.stop()
        return 2
    await stack.stop()
    _say("stopped")
    return 0


DB_URL_ENV = "TESSERA_DB_URL"
REDIS_URL_ENV = "TESSERA_REDIS_URL"


def _store_url(flag: str, value: str | None, file: Path | None, env: str) -> str | None:
    """A store's URL from the flag, else its file, else the environment. A password is never
    taken from argv: every local user can read a process's command line."""
    if value and urlsplit(value).password:
        msg = (
            f"{flag} carries a password, which every local user could read in /proc/<pid>/cmdline: "
            f"give the URL in a file ({flag}-file) or in ${env}"
        )
        raise StartupError(msg)
    if value:
        return value
    if file is not None:
        try:
            text = file.read_text().strip()
        except OSError as exc:
            msg = f"{flag}-file {file}: {exc.strerror}"
            raise StartupError(msg) from None
        if not text:
            msg = f"{flag}-file {file} is empty"
            raise StartupError(msg)
        return text
    return os.environ.get(env) or None


def metrics_job(name: str) -> str:
    """The Prometheus job of a process (``ext_authz``), as its PodMonitor names it in Kubernetes
    (k8s/components/observability): dashboards and alert rules select by it."""
    return "tessera-" + name.replace("_", "-")


def prometheus_config(targets: dict[str, list[str]]) -> dict[str, Any]:
    """Scrape every process of the stack (by name, its metrics URLs) every 5 s."""
    jobs = []
    for name, urls in sorted(targets.items()):
        parts = [urlsplit(url) for url in urls]
        static = [{"targets": [p.netloc for p in parts]}]
        jobs.append({"job_name": metrics_job(name), "metrics_path": parts[0].path, "static_configs": static})
    return {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"}, "scrape_configs": jobs}


def run_up(args: argparse.Namespace) -> int:
    try:
        args.db = _store_url("--db", args.db, getattr(args, "db_file", None), DB_URL_ENV)
        args.redis = _store_url("--redis", args.redis, getattr(args, "redis_file", None), REDIS_URL_ENV)
    except StartupError as exc:
        _say(f"error: {exc}")
        return 2
    args.redis = args.redis or "memory://"
    if (getattr(args, "tls_cert", None) is None) != (getattr(args, "tls_key", None) is None):
        _say("error: --tls-cert and --tls-key go together")
        return 2
    try:
        TracingSettings(otlp_endpoint=args.otlp_endpoint, sampling_percent=args.trace_sampling)
    except ValidationError as exc:
        _say(f"error: --otlp-endpoint/--trace-sampling: {exc.errors()[0]['msg']}")
        return 2
    return asyncio.run(_main(args))
