"""`tessera admin token`: the local platform-admin token `tessera up` wrote, on stdout only."""

from __future__ import annotations

import json

from tessera.cli import main
from tessera.datadir import write_json


def test_admin_token_prints_the_token_of_admin_json_and_nothing_else(tmp_path, capsys):
    write_json(tmp_path / "admin.json", {"admin_url": "127.0.0.1:1", "token": "tadm_local"}, private=True)
    assert main(["admin", "token", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr() == ("tadm_local\n", "")
    assert main(["--data-dir", str(tmp_path), "admin", "token", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"token": "tadm_local"}


def test_admin_token_without_a_stack_says_to_start_one(tmp_path, capsys):
    assert main(["admin", "token", "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "tessera up" in out.err
