"""The ``tessera`` command: the embedded stack, the admin CLI and the service entry points.

Admin commands must start fast (ARCHITECTURE §10: <= 0.3 s), so this module imports
nothing heavy at the top: services are loaded through the ``tessera.commands``
entry points only when asked for. With ``--output json`` stdout holds exactly one
JSON document (the RPC response in proto3 JSON with proto field names); logs and
errors go to stderr. Global flags work before or after the subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

SERVICE_COMMANDS = ("control-plane", "ext-authz", "ratelimit")
LIMIT_WINDOWS = ("second", "minute", "hour", "day")
LIMIT_KINDS = ("requests",)


def _global_flags(defaults: bool) -> argparse.ArgumentParser:
    """Flags valid anywhere; on subparsers they default to SUPPRESS so they don't clobber."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda v: v) if defaults else (lambda _v: argparse.SUPPRESS)
    p.add_argument(
        "--data-dir", default=d(None), help="data dir (default $TESSERA_DATA_DIR or ~/.local/share/tessera)"
    )
    p.add_argument("--admin-url", default=d(None), help="admin API host:port (default from admin.json)")
    p.add_argument("--token", default=d(None), help="admin bearer token (default from admin.json)")
    p.add_argument("--output", "-o", choices=("table", "json"), default=d("table"))
    return p


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tessera", parents=[_global_flags(defaults=True)])
    g = _global_flags(defaults=False)
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", parents=[g], help="run the whole stack (Envoy + services) under one supervisor")
    up.add_argument("--db", help="database URL (default: SQLite in the data dir)")
    up.add_argument(
        "--redis", default="memory://", help="rate-limit counters: memory:// or redis://host:port/db"
    )
    up.add_argument(
        "--demo-upstream", action="store_true", help="run the demo upstream and register model 'demo'"
    )
    up.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    up.add_argument("--admin-port", type=int, default=50051, help="admin gRPC port (default 50051)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")

    bs = sub.add_parser("envoy-bootstrap", help="render envoy/bootstrap.yaml with concrete addresses")
    bs.add_argument("--node-id", default="tessera-gateway")
    bs.add_argument("--admin", default="127.0.0.1:9901", help="Envoy admin host:port")
    bs.add_argument("--xds", default="127.0.0.1:50052", help="control plane xDS host:port")
    bs.add_argument("--ext-authz", default="127.0.0.1:50061", help="ext_authz host:port")
    bs.add_argument("--ratelimit", default="127.0.0.1:50071", help="ratelimit host:port")
    bs.add_argument("--template", default=None, help="bootstrap template (default: envoy/bootstrap.yaml)")
    bs.add_argument("--out", default="-", help="file to write (default stdout)")

    _add_admin_commands(sub, g)
    for name in SERVICE_COMMANDS:
        sub.add_parser(name, add_help=False, help=f"run the {name} service")
    sub.add_parser("demo-upstream", add_help=False, help="run the demo upstream (a vLLM stand-in)")
    return top


def _add_admin_commands(sub: Any, g: argparse.ArgumentParser) -> None:
    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    t = tenants.add_parser("create", parents=[g])
    t.add_argument("name")
    t.add_argument("--allow-model", action="append", default=[], dest="allowed_models")
    tenants.add_parser("list", parents=[g])
    t = tenants.add_parser("get", parents=[g])
    t.add_argument("tenant")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", parents=[g])
    k.add_argument("--tenant", required=True, help="tenant id or name")
    k.add_argument("--name", default="")
    k.add_argument("--ttl", default="", help="Go-style duration, e.g. 24h")
    k.add_argument("--allow-model", action="append", default=[], dest="allowed_models")
    k = keys.add_parser("list", parents=[g])
    k.add_argument("--tenant", default="")

    models = sub.add_parser("models", help="manage the model registry").add_subparsers(
        dest="action", required=True
    )
    m = models.add_parser("add", parents=[g])
    m.add_argument("name")
    m.add_argument("--backend", required=True, help="scheme://host:port")
    m.add_argument("--kind", default="openai-compatible")
    m.add_argument("--weight", type=int, default=1)
    m.add_argument("--priority", type=int, default=0)
    m.add_argument("--visibility", choices=("public", "restricted"), default="public")
    m.add_argument("--replace", action="store_true", help="replace the model's backends with this one")
    models.add_parser("list", parents=[g])

    limits = sub.add_parser("limits", help="manage rate limits").add_subparsers(dest="action", required=True)
    lim = limits.add_parser("create", parents=[g])
    lim.add_argument("--tenant", required=True)
    lim.add_argument("--key", default="", help="logical key id (default: the whole tenant)")
    lim.add_argument("--model", default="")
    lim.add_argument("--kind", choices=LIMIT_KINDS, required=True)
    lim.add_argument("--window", choices=LIMIT_WINDOWS, required=True)
    lim.add_argument("--limit", type=int, required=True)
    lim.add_argument("--shadow", action="store_true")
    lim.add_argument("--fail", choices=("open", "closed"), default="open")
    lim = limits.add_parser("list", parents=[g])
    lim.add_argument("--tenant", default="")


# --- admin commands ---------------------------------------------------------------------------


def _admin_request(args: argparse.Namespace) -> tuple[str, Any, Callable[[Any], list[list[str]]]]:  # noqa: C901, PLR0911 - one dispatch table
    """(RPC name, request message, table renderer) for an admin subcommand."""
    from tessera.admin.v1 import admin_pb2 as pb  # noqa: PLC0415 - keep `tessera up` light

    def tenant_rows(items: Sequence[Any]) -> list[list[str]]:
        return [["ID", "NAME", "STATUS"], *[[t.id, t.name, t.status] for t in items]]

    def key_rows(items: Sequence[Any]) -> list[list[str]]:
        return [["ID", "TENANT", "PREFIX", "STATUS", "EXPIRES"]] + [
            [k.id, k.tenant_id, k.prefix, k.status, k.expire_time or "never"] for k in items
        ]

    def model_rows(items: Sequence[Any]) -> list[list[str]]:
        return [["NAME", "VISIBILITY", "BACKENDS"]] + [
            [m.name, m.visibility, ", ".join(b.url for b in m.backends)] for m in items
        ]

    def limit_rows(items: Sequence[Any]) -> list[list[str]]:
        return [["ID", "TENANT", "KEY", "MODEL", "KIND", "WINDOW", "LIMIT"]] + [
            [x.id, x.tenant_id, x.key_id or "*", x.model or "*", x.kind, x.window, str(x.limit)]
            for x in items
        ]

    req: Any
    match (args.command, args.action):
        case ("tenants", "create"):
            req = pb.CreateTenantRequest(name=args.name, allowed_models=args.allowed_models)
            return "CreateTenant", req, lambda r: tenant_rows([r.tenant])
        case ("tenants", "list"):
            return "ListTenants", pb.ListTenantsRequest(page_size=500), lambda r: tenant_rows(r.items)
        case ("tenants", "get"):
            return "GetTenant", pb.GetTenantRequest(tenant=args.tenant), lambda r: tenant_rows([r.tenant])
        case ("keys", "create"):
            req = pb.CreateApiKeyRequest(
                tenant=args.tenant, name=args.name, ttl=args.ttl, allowed_models=args.allowed_models
            )
            return "CreateApiKey", req, lambda r: [["ID", "KEY (shown once)"], [r.id, r.key]]
        case ("keys", "list"):
            return (
                "ListApiKeys",
                pb.ListApiKeysRequest(tenant=args.tenant, page_size=500),
                lambda r: key_rows(r.items),
            )
        case ("models", "add"):
            backend = pb.Backend(url=args.backend, kind=args.kind, weight=args.weight, priority=args.priority)
            req = pb.AddModelRequest(
                name=args.name, backend=backend, visibility=args.visibility, replace_backends=args.replace
            )
            return "AddModel", req, lambda r: model_rows([r.model])
        case ("models", "list"):
            return "ListModels", pb.ListModelsRequest(page_size=500), lambda r: model_rows(r.items)
        case ("limits", "create"):
            req = pb.CreateLimitRequest(
                tenant=args.tenant,
                key_id=args.key,
                model=args.model,
                kind=args.kind,
                window=args.window,
                limit=args.limit,
                shadow=args.shadow,
                fail_mode=args.fail,
            )
            return "CreateLimit", req, lambda r: limit_rows([r.limit])
        case ("limits", "list"):
            return (
                "ListLimits",
                pb.ListLimitsRequest(tenant=args.tenant, page_size=500),
                lambda r: limit_rows(r.items),
            )
    msg = f"unknown command {args.command} {args.action}"
    raise SystemExit(msg)


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def run_admin(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415
    from google.protobuf import json_format  # noqa: PLC0415

    from tessera.admin_client import AdminClient, AdminConfigError, resolve_target  # noqa: PLC0415
    from tessera.datadir import resolve_data_dir  # noqa: PLC0415

    method, request, render = _admin_request(args)
    try:
        target = resolve_target(resolve_data_dir(args.data_dir), args.admin_url, args.token)
    except AdminConfigError as exc:
        print(f"tessera: {exc}", file=sys.stderr)
        return 2
    try:
        with AdminClient(target) as client:
            response = client.call(method, request)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            print(
                f"tessera: cannot reach the admin API at {target.url} (is `tessera up` running?)",
                file=sys.stderr,
            )
        else:
            print(f"tessera: {code.name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(
            json_format.MessageToJson(
                response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
    else:
        _print_table(render(response))
    return 0


# --- entry ------------------------------------------------------------------------------------


def _envoy_bootstrap(args: argparse.Namespace) -> int:
    from tessera.bootstrap import TEMPLATE, BootstrapParams, render_bootstrap  # noqa: PLC0415

    def split(value: str) -> tuple[str, int]:
        host, _, port = value.rpartition(":")
        return host, int(port)

    (ah, ap), (xh, xp), (eh, ep), (rh, rp) = (
        split(args.admin),
        split(args.xds),
        split(args.ext_authz),
        split(args.ratelimit),
    )
    template = Path(args.template) if args.template else TEMPLATE
    text = render_bootstrap(BootstrapParams(args.node_id, ah, ap, xh, xp, eh, ep, rh, rp), template)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


def _run_entry_point(name: str, argv: list[str]) -> int:
    if name == "demo-upstream":
        from tessera.demo_upstream.__main__ import main as demo_main  # noqa: PLC0415

        return demo_main(argv)
    (ep,) = entry_points(group="tessera.commands", name=name)
    main: Callable[[list[str]], int] = ep.load()
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Service commands own their flags: hand everything after the name to them.
    for i, word in enumerate(argv):
        if word in (*SERVICE_COMMANDS, "demo-upstream"):
            return _run_entry_point(word, argv[i + 1 :])
        if not word.startswith("-"):
            break
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return 2
    if args.command == "envoy-bootstrap":
        return _envoy_bootstrap(args)
    if args.command == "up":
        from tessera.up import run_up  # noqa: PLC0415

        return run_up(args)
    return run_admin(args)


if __name__ == "__main__":
    raise SystemExit(main())
