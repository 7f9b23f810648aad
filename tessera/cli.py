"""The ``tessera`` command: the embedded stack, the admin CLI and the service entry points.

Admin commands must start fast (ARCHITECTURE §10: <= 0.3 s), so this module imports
nothing heavy at the top: services are loaded through the ``tessera.commands``
entry points only when asked for. With ``--output json`` stdout holds exactly one
JSON document (the RPC response in proto3 JSON with proto field names); logs and
errors go to stderr. Global flags work before or after the subcommand.

The admin commands (one per admin RPC) are declared in :mod:`tessera.cli_admin`, which
also documents how list commands page: every page is collected, ``audit list`` stops at
``--limit``, and JSON output is one ``{"items": [...], "next_page_token": ...}`` document.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from tessera.cli_admin import UsageError, add_admin_commands, build_request, fetch
from tessera.cli_resources import add_resource_commands, run_resources

# Commands served by the services' entry points (group ``tessera.commands``); ``admin``
# (``tessera admin bootstrap``) talks to the store directly, so it lives in the control plane.
SERVICE_COMMANDS = ("control-plane", "ext-authz", "ratelimit", "admin", "meter")
_GLOBAL_VALUE_FLAGS = frozenset({"--data-dir", "--admin-url", "--token", "--output", "-o"})


def _global_flags(defaults: bool) -> argparse.ArgumentParser:
    """Flags valid anywhere; on subparsers they default to SUPPRESS so they don't clobber."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda v: v) if defaults else (lambda _v: argparse.SUPPRESS)
    p.add_argument(
        "--data-dir", default=d(None), help="data dir (default $TESSERA_DATA_DIR or ~/.local/share/tessera)"
    )
    p.add_argument("--admin-url", default=d(None), help="admin API host:port (default from admin.json)")
    p.add_argument("--token", default=d(None), help="admin bearer token (default from admin.json)")
    p.add_argument(
        "--output",
        "-o",
        choices=("table", "json", "yaml", "csv"),
        default=d("table"),
        help="output format (default table; json or yaml: one document on stdout)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tessera", parents=[_global_flags(defaults=True)])
    top.add_argument("--version", action="version", version=f"tessera {_version()}")
    g = _global_flags(defaults=False)
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", parents=[g], help="run the whole stack (Envoy + services) under one supervisor")
    up.add_argument(
        "--db", help="database URL without a password (default: $TESSERA_DB_URL, else SQLite in the data dir)"
    )
    up.add_argument("--db-file", type=Path, help="a file holding the database URL (a password may be in it)")
    up.add_argument(
        "--redis",
        help="rate-limit counters: memory:// (default), redis://host:port/db, "
        "redis+cluster://host:port,host:port or redis+sentinel://host:port,host:port/master, "
        "without a password (default: $TESSERA_REDIS_URL)",
    )
    up.add_argument("--redis-file", type=Path, help="a file holding the Redis URL (a password may be in it)")
    up.add_argument(
        "--demo-upstream", action="store_true", help="run the demo upstream and register model 'demo'"
    )
    up.add_argument(
        "--real-model",
        action="store_true",
        help="run llama-server with Gemma 3 270M (built by `make llm`) as model 'gemma-3-270m'",
    )
    up.add_argument(
        "--config-dir",
        type=Path,
        help="a directory of resource documents (Plan, Tenant, Model, Limit, Principal) kept "
        "applied: each change of its files is applied, atomically, with prune",
    )
    up.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    up.add_argument("--admin-port", type=int, default=50051, help="admin gRPC port (default 50051)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument(
        "--tls",
        action="store_true",
        help="serve the gateway over HTTPS (HTTP/2 and HTTP/1.1) with a certificate from a local CA "
        "of its own (<data-dir>/gateway-tls/ca.pem is what clients trust)",
    )
    up.add_argument(
        "--tls-cert", type=Path, help="the gateway's certificate (PEM; with --tls-key, implies --tls)"
    )
    up.add_argument("--tls-key", type=Path, help="the gateway certificate's private key (PEM)")
    up.add_argument(
        "--admin-rest",
        choices=("public", "internal", "off"),
        default="public",
        help="the admin REST API (/admin/v1/...): on the gateway (default), on a listener of its "
        "own on 127.0.0.1, or nowhere (the gRPC admin API stays)",
    )
    up.add_argument("--ext-authz-replicas", type=int, default=1, help="ext_authz processes (Envoy balances)")
    up.add_argument("--ext-authz-workers", type=int, default=1, help="worker processes per ext_authz replica")
    up.add_argument(
        "--authz-transport",
        choices=("grpc", "http"),
        default="grpc",
        help="how Envoy calls ext_authz: gRPC Check or HTTP/1.1 (default grpc)",
    )
    up.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        default="",
        help="export traces (Envoy's and every service's spans) to this OTLP/gRPC collector",
    )
    up.add_argument(
        "--trace-sampling",
        metavar="PERCENT",
        type=float,
        default=100.0,
        help="requests whose trace is recorded, with --otlp-endpoint (default 100)",
    )

    bs = sub.add_parser("envoy-bootstrap", help="render envoy/bootstrap.yaml with concrete addresses")
    bs.add_argument("--node-id", default="gateway", help="Envoy's node id (its SPIFFE ID names it)")
    bs.add_argument("--namespace", default="default", help="the namespace the SPIFFE IDs name")
    bs.add_argument("--admin-socket", default="/var/run/envoy/admin.sock", help="Envoy admin unix socket")
    bs.add_argument("--stats", default="0.0.0.0:9902", help="host:port serving /stats/prometheus and /ready")
    bs.add_argument("--xds", default="127.0.0.1:50052", help="control plane xDS host:port")
    bs.add_argument("--ext-authz", default="127.0.0.1:50061", help="ext_authz host:port[,host:port...]")
    bs.add_argument(
        "--identity-dir",
        default="/etc/tessera/identity",
        help="Envoy's identity (tls.crt, tls.key, ca.crt: a mounted Secret, reloaded when it changes)",
    )
    bs.add_argument("--identity-sds", default=None, help="SDS file to write (default: beside --out)")
    bs.add_argument("--template", default=None, help="bootstrap template (default: envoy/bootstrap.yaml)")
    bs.add_argument("--out", default="-", help="file to write (default stdout)")

    ident = sub.add_parser("identity", parents=[g], help="workload identities for Kubernetes")
    ident_sub = ident.add_subparsers(dest="identity_command", required=True)
    k8s = ident_sub.add_parser(
        "k8s-secrets", help="a namespace's identities as kubernetes.io/tls Secrets (without cert-manager)"
    )
    k8s.add_argument("--namespace", required=True, help="the namespace the Secrets and SPIFFE IDs name")
    k8s.add_argument("--out", type=Path, required=True, help="the file to write (0600: it holds keys)")
    k8s.add_argument(
        "--hours", type=float, default=24.0, help="certificate lifetime (run again before half of it)"
    )

    add_admin_commands(sub, g)
    admin = sub.add_parser("admin", parents=[g], help="the first platform admin; the local admin token")
    admin_sub = admin.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    admin_sub.add_parser(
        "bootstrap",
        add_help=False,  # run by the control plane's entry point: `tessera admin bootstrap --help`
        help="create a deployment's first platform admin in the database and print its admin key once",
    )
    admin_sub.add_parser(
        "token",
        parents=[g],
        help="print the platform-admin token `tessera up` keeps in <data-dir>/admin.json "
        "(the admin REST API's bearer token; a new one each start)",
    )
    add_resource_commands(sub, g)
    for name in SERVICE_COMMANDS:
        if name != "admin":
            sub.add_parser(name, add_help=False, help=f"run the {name} service")
    sub.add_parser("demo-upstream", add_help=False, help="run the demo upstream (a vLLM stand-in)")
    return top


def _print_table(rows: list[list[str]]) -> None:
    """Aligned columns; an empty row starts a new, separately aligned block."""
    blocks: list[list[list[str]]] = [[]]
    for row in rows:
        if row:
            blocks[-1].append(row)
        else:
            blocks.append([])
    for i, block in enumerate(b for b in blocks if b):
        if i:
            print()
        widths = [max(len(r[c]) for r in block) for c in range(len(block[0]))]
        for r in block:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def run_admin(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415
    from google.protobuf import json_format  # noqa: PLC0415

    from tessera.admin_client import AdminClient, AdminConfigError, describe_error, resolve_target  # noqa: PLC0415
    from tessera.datadir import resolve_data_dir  # noqa: PLC0415

    command = args.admin_command
    try:
        _, request = build_request(args)
    except UsageError as exc:
        args.command_parser.error(str(exc))  # exits 2
    try:
        target = resolve_target(resolve_data_dir(args.data_dir), args.admin_url, args.token)
    except AdminConfigError as exc:
        print(f"tessera: {exc}", file=sys.stderr)
        return 2
    try:
        with AdminClient(target) as client:
            response = fetch(client.call, command, request, getattr(args, "max_items", None))
    except grpc.RpcError as exc:
        print(f"tessera: {describe_error(exc, target)}", file=sys.stderr)
        return 1
    if args.output == "yaml":
        import yaml  # noqa: PLC0415

        data = json_format.MessageToDict(response, preserving_proto_field_name=True)
        print(yaml.safe_dump(data, sort_keys=False), end="")
    elif args.output == "json":
        print(
            json_format.MessageToJson(
                response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
    elif args.output == "csv":
        import csv  # noqa: PLC0415

        csv.writer(sys.stdout, lineterminator="\n").writerows(r for r in command.render(response) if r)
    else:
        _print_table(command.render(response))
    if command.note and (note := command.note(response)):
        print(f"tessera: {note}", file=sys.stderr)
    return 0


# --- entry ------------------------------------------------------------------------------------


def _envoy_bootstrap(args: argparse.Namespace) -> int:
    from tessera.bootstrap import TEMPLATE, BootstrapParams, render_bootstrap  # noqa: PLC0415
    from tessera.envoy_tls import write_file_identity  # noqa: PLC0415

    def split(value: str) -> tuple[str, int]:
        host, _, port = value.rpartition(":")
        return host, int(port)

    if args.identity_sds is None and args.out == "-":
        print("tessera: --identity-sds is needed when the bootstrap goes to stdout", file=sys.stderr)
        return 2
    sds = Path(args.identity_sds) if args.identity_sds else Path(args.out).with_name("identity-sds.json")
    identity = Path(args.identity_dir)
    (sh, sp), (xh, xp) = split(args.stats), split(args.xds)
    params = BootstrapParams(
        node_id=args.node_id,
        admin_socket=args.admin_socket,
        stats_host=sh,
        stats_port=sp,
        xds_host=xh,
        xds_port=xp,
        ext_authz=tuple(split(a) for a in args.ext_authz.split(",")),
        identity_sds=str(sds),
        ca_file=str(identity / "ca.crt"),
        namespace=args.namespace,
    )
    text = render_bootstrap(params, Path(args.template) if args.template else TEMPLATE)
    write_file_identity(sds, identity)
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


def _version() -> str:
    try:
        return importlib.metadata.version("tessera")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """``tessera``; output cut short by its reader (``tessera … | head``) ends it quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python's advice: point stdout at /dev/null so the interpreter's own flush at exit
        # does not raise again; 141 is what a command killed by SIGPIPE returns in a shell
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _admin_token(args: argparse.Namespace) -> int:
    """``tessera admin token``: the local platform-admin token, on stdout only (never in argv or
    a log); ``export TESSERA_ADMIN_TOKEN=$(tessera admin token)``."""
    from tessera.datadir import DataDir, read_json, resolve_data_dir  # noqa: PLC0415

    if args.admin_action != "token":  # `admin FLAGS bootstrap`: the entry point takes only its own
        print("tessera: flags of `tessera admin bootstrap` go after `bootstrap`", file=sys.stderr)
        return 2
    path = DataDir(resolve_data_dir(args.data_dir)).admin
    try:
        token = str(read_json(path).get("token") or "")
    except (OSError, ValueError):
        token = ""
    if not token:
        print(f"tessera: no admin token in {path}: start the stack with `tessera up`", file=sys.stderr)
        return 2
    if args.output == "json":
        import json  # noqa: PLC0415

        print(json.dumps({"token": token}))
    else:
        print(token)
    return 0


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Service commands own their flags: hand everything after the name to them (``admin``: its
    # ``bootstrap``; ``admin token`` and ``admin --help`` are this parser's). Global flags before
    # the name are skipped, with their values.
    value = False
    for i, word in enumerate(argv):
        if value:
            value = False
            continue
        if word in (*SERVICE_COMMANDS, "demo-upstream"):
            if word != "admin" or argv[i + 1 : i + 2] == ["bootstrap"]:
                return _run_entry_point(word, argv[i + 1 :])
            break
        if not word.startswith("-"):
            break
        value = word in _GLOBAL_VALUE_FLAGS
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return 2
    run = {"envoy-bootstrap": _envoy_bootstrap, "identity": _identity, "up": _up, "admin": _admin_token}
    run |= dict.fromkeys(("apply", "diff", "get"), run_resources)
    return run.get(args.command, run_admin)(args)


def _identity(args: argparse.Namespace) -> int:
    from tessera.datadir import resolve_data_dir  # noqa: PLC0415
    from tessera.k8s_secrets import write_secrets  # noqa: PLC0415

    write_secrets(resolve_data_dir(args.data_dir), args.namespace, args.out, args.hours)
    print(f"tessera: wrote {args.out}: apply it with kubectl apply -f {args.out}", file=sys.stderr)
    return 0


def _up(args: argparse.Namespace) -> int:
    from tessera.up import run_up  # noqa: PLC0415

    return run_up(args)


if __name__ == "__main__":
    raise SystemExit(main())
