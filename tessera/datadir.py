"""The data dir (ARCHITECTURE §10): SQLite file, pepper, endpoints.json, admin.json, logs.

The CLI finds it through ``--data-dir`` / ``TESSERA_DATA_DIR``; default
``~/.local/share/tessera``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("~/.local/share/tessera")


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    raw = explicit or os.environ.get("TESSERA_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(raw).expanduser().resolve()


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def pepper(self) -> Path:
        return self.root / "pepper"

    @property
    def database(self) -> Path:
        return self.root / "tessera.db"

    @property
    def endpoints(self) -> Path:
        return self.root / "endpoints.json"

    @property
    def prometheus(self) -> Path:
        """A Prometheus scrape config for this stack (``tessera up`` writes it)."""
        return self.root / "prometheus.yml"

    @property
    def admin(self) -> Path:
        return self.root / "admin.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def ensure(self) -> None:
        for d in (self.root, self.logs, self.run):
            d.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)


def write_json(path: Path, data: Any, *, private: bool = False) -> None:
    """Atomic write; ``private`` files are 0600 from the first byte."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
