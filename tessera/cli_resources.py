"""``tessera apply``, ``tessera diff`` and ``tessera get``: declarative resources from the CLI.

Files are sent as they are to ``ResourceService.ApplyResources``, which parses, validates and
applies them in one transaction on the server (the same code as the config directory and the
Kubernetes controller). ``diff`` is a dry run: exit 0 when the store matches, 1 when it differs,
2 on an error (as ``kubectl diff``). ``get`` prints ``ExportResources``' documents, which apply
back unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUFFIXES = (".yaml", ".yml", ".json")
EXIT_DIFFERENT = 1
EXIT_ERROR = 2
RPCS = ("ApplyResources", "ExportResources")  # what apply/diff and get call (no admin command)


def add_resource_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="PATH",
        help="a file of documents, a directory of *.yaml/*.yml/*.json files (not recursive), or - "
        "for stdin; repeatable",
    )
    files.add_argument(
        "--prune",
        action="store_true",
        help="also delete resources this manager applied, of the kinds in the files, that the "
        "files no longer declare (never ones created imperatively)",
    )
    files.add_argument(
        "--manager",
        default="",
        help="who applies (default tessera-apply): prune deletes only this manager's resources",
    )
    apply = sub.add_parser(
        "apply",
        parents=[common, files],
        help="create or update the resources the files declare, in one transaction",
        description="Make the store match Plan, Tenant, Model, Limit and Principal documents "
        "(apiVersion tessera.dev/v1alpha1). An invalid document applies nothing.",
    )
    apply.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    sub.add_parser(
        "diff",
        parents=[common, files],
        help="what apply would change; exit 0 when nothing, 1 when something, 2 on an error",
        description="A dry run of apply: lists each resource that would be created, updated "
        "(with its fields) or deleted.",
    )
    get = sub.add_parser(
        "get",
        parents=[common],
        help="print resources as documents (-o yaml, the default for get, applies back unchanged)",
    )
    get.add_argument("kind", help="plans, tenants, models, limits, principals (or all)")
    get.add_argument("name", nargs="?", default="", help="one resource (default every one of the kind)")


def _read(paths: list[str]) -> Iterator[tuple[str, str]]:
    for raw in paths:
        if raw == "-":
            yield "stdin", sys.stdin.read()
            continue
        path = Path(raw)
        if path.is_dir():
            for p in sorted(x for x in path.iterdir() if x.suffix in SUFFIXES and x.is_file()):
                yield str(p), p.read_text()
        else:
            yield str(path), path.read_text()


def _print(response: Any, output: str) -> None:
    from google.protobuf import json_format  # noqa: PLC0415

    data = json_format.MessageToDict(response, preserving_proto_field_name=True)
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(data, sort_keys=False), end="")


def run_resources(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    from tessera.admin.v1 import admin_pb2 as pb  # noqa: PLC0415
    from tessera.admin_client import AdminClient, AdminConfigError, describe_error, resolve_target  # noqa: PLC0415
    from tessera.datadir import resolve_data_dir  # noqa: PLC0415

    try:
        target = resolve_target(resolve_data_dir(args.data_dir), args.admin_url, args.token)
    except AdminConfigError as exc:
        print(f"tessera: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.command == "get":
            request: Any = pb.ExportResourcesRequest(
                kind="" if args.kind == "all" else args.kind, name=args.name
            )
            method = "ExportResources"
        else:
            files = [pb.SourceFile(name=n, content=c) for n, c in _read(args.filename)]
            request = pb.ApplyResourcesRequest(
                files=files,
                dry_run=args.command == "diff" or args.dry_run,
                prune=args.prune,
                manager=args.manager,
            )
            method = "ApplyResources"
    except OSError as exc:
        print(f"tessera: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with AdminClient(target, timeout=60.0) as client:
            response = client.call(method, request)
    except grpc.RpcError as exc:
        print(f"tessera: {describe_error(exc, target)}", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "get":
        return _show_get(response, args.output)
    return _show_changes(response, args.command, args.output, dry_run=request.dry_run)


def _show_get(response: Any, output: str) -> int:
    if output == "json":
        import yaml  # noqa: PLC0415

        print(json.dumps(list(yaml.safe_load_all(response.yaml)), indent=2))
    elif output in {"yaml", "table"}:
        print(response.yaml, end="")
    else:
        print("tessera: get prints yaml or json", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _show_changes(response: Any, command: str, output: str, *, dry_run: bool) -> int:
    different = any(c.action != "unchanged" for c in response.changes)
    for warning in response.warnings:
        print(f"tessera: warning: {warning}", file=sys.stderr)
    if output in {"json", "yaml"}:
        _print(response, output)
    else:
        suffix = " (dry run)" if dry_run and command == "apply" else ""
        for c in response.changes:
            if command == "diff" and c.action == "unchanged":
                continue
            fields = f" ({', '.join(c.fields)})" if c.fields else ""
            print(f"{c.kind.lower()}.tessera.dev/{c.name} {c.action}{fields}{suffix}")
            if c.key:
                print(f"  admin key of {c.name} (shown once): {c.key}")
    if command == "diff":
        return EXIT_DIFFERENT if different else 0
    return 0
