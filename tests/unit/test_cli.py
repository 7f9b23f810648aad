from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from tessera.cli import build_parser, main


def test_global_flags_work_before_and_after_the_subcommand():
    before = build_parser().parse_args(["--output", "json", "--data-dir", "/x", "tenants", "list"])
    after = build_parser().parse_args(["tenants", "list", "--output", "json", "--data-dir", "/x"])
    assert (before.output, before.data_dir) == (after.output, after.data_dir) == ("json", "/x")
    assert build_parser().parse_args(["tenants", "list"]).output == "table"


def test_limits_create_flags():
    args = build_parser().parse_args(
        ["limits", "create", "--tenant", "acme", "--kind", "requests", "--window", "second", "--limit", "5"]
    )
    assert (args.tenant, args.kind, args.window, args.limit, args.fail) == (
        "acme",
        "requests",
        "second",
        5,
        "open",
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["limits", "create", "--tenant", "a", "--kind", "requests", "--window", "week", "--limit", "1"]
        )


def test_admin_command_without_a_stack_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TESSERA_ADMIN_URL", raising=False)
    monkeypatch.delenv("TESSERA_ADMIN_TOKEN", raising=False)
    assert main(["tenants", "list", "--data-dir", str(tmp_path), "-o", "json"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing but JSON ever goes to stdout
    assert "tessera up" in out.err


def test_unreachable_admin_api_is_a_clear_error(tmp_path, capsys):
    code = main(
        ["tenants", "list", "--admin-url", "127.0.0.1:1", "--token", "t", "--data-dir", str(tmp_path)]
    )
    assert code == 1
    assert "cannot reach the admin API" in capsys.readouterr().err


def test_the_admin_cli_path_imports_no_service_code():
    """Admin commands must start fast: no service, SQLAlchemy or Envoy config code on their path."""
    probe = (
        "import sys, json\n"
        "from tessera.cli import main\n"
        "main(['tenants', 'list', '--admin-url', '127.0.0.1:1', '--token', 't'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    heavy = {
        m
        for m in loaded
        if m.split(".")[0]
        in {
            "control_plane",
            "ext_authz",
            "ratelimit",
            "sqlalchemy",
            "envoy_data_plane",
            "aiohttp",
            "structlog",
        }
    }
    assert heavy == set()


def test_envoy_bootstrap_renders_given_addresses(tmp_path):
    out = tmp_path / "envoy.yaml"
    assert (
        main(
            [
                "envoy-bootstrap",
                "--xds",
                "cp.svc:50052",
                "--ext-authz",
                "authz.svc:1",
                "--identity-dir",
                str(tmp_path / "identity"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert '"cp.svc", port_value: 50052' in text
    assert '"authz.svc", port_value: 1' in text
    assert "${" not in text
    # Envoy's certificate: the mounted Secret's files, reloaded when kubelet swaps them
    sds = json.loads((tmp_path / "identity-sds.json").read_text())
    (secret,) = sds["resources"]
    assert secret["tls_certificate"]["watched_directory"] == {"path": str(tmp_path / "identity")}
    assert str(tmp_path / "identity-sds.json") in text
    assert oct((tmp_path / "identity-sds.json").stat().st_mode & 0o777) == "0o600"


def test_version_names_the_installed_release(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"tessera {importlib.metadata.version('tessera')}"


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`tessera … | head`: the reader goes away; no traceback, the exit status a shell expects
    of a command its pipe closed (141, as if SIGPIPE had ended it)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tessera.cli",
                "envoy-bootstrap",
                "--out",
                "-",
                "--identity-sds",
                str(tmp_path / "sds.yaml"),
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141
