"""`tessera apply/diff/get` without a server: which files are read, how changes print, and
diff's exit status (0 same, 1 different, 2 error: kubectl diff's)."""

from __future__ import annotations

import pytest

from tessera.admin.v1 import admin_pb2 as pb
from tessera.cli import main
from tessera.cli_resources import EXIT_DIFFERENT, EXIT_ERROR, _read, _show_changes


def test_a_directory_gives_its_yaml_and_json_files_in_order_not_recursively(tmp_path):
    for name in ("b.yaml", "a.yml", "c.json", "notes.md", ".hidden.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text("d")
    single = tmp_path / "sub" / "d.yaml"
    got = list(_read([str(tmp_path), str(single)]))
    assert [c for _, c in got] == ["a.yml", "b.yaml", "c.json", "d"]


def test_diff_exits_1_when_something_would_change_and_0_when_nothing(capsys):
    same = pb.ApplyResourcesResponse(changes=[pb.ResourceChange(kind="Plan", name="p", action="unchanged")])
    assert _show_changes(same, "diff", "table", dry_run=True) == 0
    assert capsys.readouterr().out == ""
    changed = pb.ApplyResourcesResponse(
        changes=[
            pb.ResourceChange(kind="Plan", name="p", action="unchanged"),
            pb.ResourceChange(kind="Limit", name="l", action="updated", fields=["limit", "shadow"]),
        ],
        warnings=["Tenant/t: declares API key 'ci', which it does not have"],
    )
    assert _show_changes(changed, "diff", "table", dry_run=True) == EXIT_DIFFERENT
    out = capsys.readouterr()
    assert out.out == "limit.tessera.dev/l updated (limit, shadow)\n"
    assert "warning: Tenant/t" in out.err


def test_apply_prints_every_resource_and_a_created_principals_key_once(capsys):
    resp = pb.ApplyResourcesResponse(
        changes=[
            pb.ResourceChange(kind="Plan", name="p", action="unchanged"),
            pb.ResourceChange(kind="Principal", name="ops", action="created", key="tadm_x_y"),
        ]
    )
    assert _show_changes(resp, "apply", "table", dry_run=False) == 0
    assert capsys.readouterr().out.splitlines() == [
        "plan.tessera.dev/p unchanged",
        "principal.tessera.dev/ops created",
        "  admin key of ops (shown once): tadm_x_y",
    ]
    assert _show_changes(resp, "apply", "table", dry_run=True) == 0
    assert "(dry run)" in capsys.readouterr().out


def test_a_missing_file_is_an_error_before_any_call(tmp_path, capsys):
    (tmp_path / "admin.json").write_text('{"admin_url": "127.0.0.1:1", "token": "t"}')
    code = main(["apply", "-f", str(tmp_path / "nope.yaml"), "--data-dir", str(tmp_path)])
    assert code == EXIT_ERROR
    assert "nope.yaml" in capsys.readouterr().err


def test_apply_needs_a_file(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["apply"])
    assert exc.value.code == 2
    assert "-f/--filename" in capsys.readouterr().err
