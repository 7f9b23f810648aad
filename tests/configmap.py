"""Declarative resources for tests: the example documents, and a directory updated the way
kubelet updates a ConfigMap volume."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "resources"


def example_texts(**replace: str) -> dict[str, str]:
    """File name → content of docs/examples/resources, with each ``old=new`` replaced."""
    out = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        text = path.read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        out[path.name] = text
    return out


def kubelet_update(directory: Path, files: dict[str, str]) -> None:
    """What kubelet's AtomicWriter does: write a new ``..<timestamp>`` version, swap the ``..data``
    symlink to it in one rename, link each file name through ``..data``, drop the old version."""
    data = directory / "..data"
    old = data.readlink() if data.is_symlink() else None
    version = directory / f"..{time.time_ns()}"
    version.mkdir()
    for name, content in files.items():
        (version / name).write_text(content)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    tmp.replace(data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for entry in directory.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old is not None:
        shutil.rmtree(directory / old)
