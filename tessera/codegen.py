"""Regenerate (or, with --check, verify) the protobuf code in tessera/<api>/v1/, and the admin
REST API's OpenAPI document (tessera/openapi.py) beside the admin descriptor set.

Dev-only: needs grpcio-tools and mypy-protobuf from the dev dependency group.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from tessera import openapi

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DESCRIPTOR_SET = Path("tessera/admin/v1/admin_descriptor.pb")
OPENAPI = Path("tessera/admin/v1/openapi.json")


def _generate(out: Path) -> None:
    from grpc_tools import protoc  # noqa: PLC0415 - dev-only dependency

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # google/api/{annotations,http}.proto ship with googleapis-common-protos (dev group).
    import google.api.annotations_pb2 as annotations  # noqa: PLC0415

    googleapis = Path(annotations.__file__).resolve().parents[2]
    if not (googleapis / "google" / "api" / "annotations.proto").exists():
        msg = "google/api/annotations.proto not found: install the dev group (googleapis-common-protos)"
        raise SystemExit(msg)
    bindir = Path(sys.executable).parent
    admin = [p for p in protos if p.startswith("tessera/admin/")]
    args = [
        "protoc",
        f"-I{googleapis}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        msg = "protoc failed"
        raise SystemExit(msg)
    # The admin API's descriptor set (with imports), for Envoy's grpc_json_transcoder, and the
    # same with the protos' comments, for the OpenAPI document's descriptions (Envoy needs none).
    includes = [f"-I{PROTO_ROOT}", f"-I{include}", f"-I{googleapis}"]
    commented = out / "admin_commented.pb"
    for dest, extra in ((out / DESCRIPTOR_SET, []), (commented, ["--include_source_info"])):
        sets = ["protoc", *includes, "--include_imports", *extra, f"--descriptor_set_out={dest}", *admin]
        if protoc.main(sets) != 0:
            msg = "protoc failed (descriptor set)"
            raise SystemExit(msg)
    (out / OPENAPI).write_text(openapi.render(commented.read_bytes()), encoding="utf-8")
    for proto in protos:
        pkg = out / Path(proto).parent
        while pkg != out:
            (pkg / "__init__.py").touch()
            pkg = pkg.parent


def _generated(base: Path) -> list[Path]:
    return sorted(
        p.relative_to(base)
        for sub in ("admin", "admission", "policy")
        for p in (base / "tessera" / sub).rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi", ".pb", ".json"}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.codegen")
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _generate(out)
        fresh = _generated(out)
        if args.check:
            stale = [
                p
                for p in fresh
                if not (ROOT / p).exists() or not filecmp.cmp(out / p, ROOT / p, shallow=False)
            ]
            extra = sorted(set(_generated(ROOT)) - set(fresh))
            for p in stale + extra:
                print(f"stale generated file: {p}", file=sys.stderr)
            return 1 if stale or extra else 0
        for p in fresh:
            (ROOT / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / p, ROOT / p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
