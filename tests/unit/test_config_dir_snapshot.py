"""The config directory's snapshot (control_plane/resources/config_dir.py) against a directory
kubelet-style writers really change: one snapshot never mixes two versions of the files."""

from __future__ import annotations

import threading

from control_plane.resources.config_dir import SwappedError, snapshot
from tests.configmap import kubelet_update


def test_a_snapshot_reads_one_version_of_the_directory(tmp_path):
    kubelet_update(tmp_path, {"a.yaml": "one", "b.yaml": "one"})
    first = (tmp_path / "..data").readlink()
    kubelet_update(tmp_path, {"a.yaml": "two", "c.yaml": "two"})
    assert snapshot(tmp_path) == [("a.yaml", "two"), ("c.yaml", "two")]
    assert not (tmp_path / first).exists()
    # a plain directory (no ..data) works too; hidden and other files are not documents
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.yml").write_text("x")
    (plain / ".hidden.yaml").write_text("h")
    (plain / "README.md").write_text("r")
    assert snapshot(plain) == [("x.yml", "x")]


def test_snapshots_taken_while_kubelet_swaps_never_mix_versions(tmp_path):
    names = [f"{c}.yaml" for c in "abcdefgh"]
    kubelet_update(tmp_path, dict.fromkeys(names, "v0"))
    stop = threading.Event()

    def kubelet() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            kubelet_update(tmp_path, dict.fromkeys(names, f"v{version}"))

    writer = threading.Thread(target=kubelet)
    writer.start()
    whole = 0
    try:
        for _ in range(300):
            try:
                files = snapshot(tmp_path)
            except (SwappedError, FileNotFoundError):
                continue  # a read that overlapped a swap: retried at the next poll
            assert [n for n, _ in files] == names, "a snapshot missed files"
            assert len({c for _, c in files}) == 1, f"a snapshot mixed versions: {files}"
            whole += 1
    finally:
        stop.set()
        writer.join()
    assert whole > 0
