"""A directory of documents (a mounted ConfigMap) kept applied: ``config_dir`` in the settings.

Each poll reads one snapshot of the directory; when its contents changed, the whole set is
applied with prune as manager ``config-dir`` (``Applier``, one transaction). kubelet updates a
ConfigMap volume by writing a new ``..<timestamp>`` folder and swapping the ``..data`` symlink
atomically; resolving ``..data`` once per poll means a poll never mixes old and new files.

A set that does not apply (a broken document, a conflict) changes nothing; it is logged with its
reason, counted, and not tried again until the files change. A store that is unavailable is
tried again at the next poll. Applied only on a change of the files (and at start), never
periodically: two replicas whose kubelets swap at different moments must not undo each other.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge

from control_plane.admin.auth import Caller
from control_plane.resources.apply import CONFIG_DIR, Applier
from control_plane.resources.documents import parse_files
from tessera.errors import StorageError, TesseraError
from tessera.resources import MAX_NAME

log = structlog.get_logger("control_plane.config_dir")
MANAGER = CONFIG_DIR
CALLER = Caller(MANAGER, MANAGER, platform_admin=True)
SUFFIXES = (".yaml", ".yml", ".json")
APPLIES = Counter(
    "tessera_config_dir_applies_total",
    "Changes of the config directory, by result (applied, rejected: nothing changed, failed: retried)",
    ["result"],
)
HEALTHY = Gauge("tessera_config_dir_in_sync", "1 when the config directory's current files are applied")


class SwappedError(OSError):
    """``..data`` moved while the files were read: read again at the next poll."""


def snapshot(directory: Path) -> list[tuple[str, str]]:
    """``(name, content)`` of the directory's documents, read from one version of it: under
    kubelet's layout ``..data`` is resolved before and checked after reading (kubelet removes
    the old version right after the swap, so a read that spans a swap may be incomplete)."""
    data = directory / "..data"
    version = data.readlink() if data.is_symlink() else None
    base = directory / version if version is not None else directory
    files = []
    for entry in sorted(base.iterdir()):
        if entry.name.startswith(".") or entry.suffix not in SUFFIXES or not entry.is_file():
            continue
        files.append((entry.name[:MAX_NAME], entry.read_text(encoding="utf-8", errors="replace")))
    if version is not None and (not data.is_symlink() or data.readlink() != version):
        raise SwappedError(f"{data} changed while it was read")
    return files


def digest(files: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, content in files:
        h.update(f"{len(name)}:{name}{len(content)}:".encode())
        h.update(content.encode())
    return h.hexdigest()


class ConfigDirSource:
    def __init__(self, directory: Path, applier: Applier, poll_seconds: float) -> None:
        self.directory = directory
        self.applier = applier
        self.poll_seconds = poll_seconds
        self.done: str | None = None  # digest of the last set applied or rejected
        self.seen: str | None = None  # digest of the previous poll's read

    async def sync(self) -> None:
        """Apply the directory if its files changed since the last try that was not transient."""
        try:
            files = await asyncio.to_thread(snapshot, self.directory)
        except OSError as exc:  # a swap in progress, or the mount not there yet: next poll
            log.warning("config_dir_unreadable", directory=str(self.directory), error=str(exc))
            return
        current, previous = digest(files), self.seen
        self.seen = current
        if current == self.done:
            return
        if not (self.directory / "..data").is_symlink() and current != previous:
            # A plain directory has no atomic swap: a file may be half written. Apply a version
            # only once two polls in a row read the same (prune must not see a cut-off file).
            return
        try:
            docs = await asyncio.to_thread(parse_files, files)  # CPU work, off the event loop
            response = await self.applier.apply(docs, None, caller=CALLER, prune=True, manager=MANAGER)
        except StorageError as exc:
            APPLIES.labels("failed").inc()
            HEALTHY.set(0)
            log.warning("config_dir_apply_failed", error=str(exc), retry=exc.transient)
            if exc.transient:
                return
        except Exception as exc:  # anything else: rejected, not retried until the files change
            APPLIES.labels("rejected").inc()
            HEALTHY.set(0)
            reason = str(exc) if isinstance(exc, TesseraError) else f"{type(exc).__name__} (nothing applied)"
            log.error(  # noqa: TRY400 - the reason is the message; a traceback could quote the files
                "config_dir_rejected", directory=str(self.directory), digest=current[:12], error=reason
            )
        else:
            APPLIES.labels("applied").inc()
            HEALTHY.set(1)
            changed = [f"{c.kind}/{c.name} {c.action}" for c in response.changes if c.action != "unchanged"]
            for warning in response.warnings:
                log.warning("config_dir_warning", warning=warning)
            log.info("config_dir_applied", digest=current[:12], documents=len(docs), changes=changed)
        self.done = current

    async def run_forever(self) -> None:
        log.info("config_dir_watching", directory=str(self.directory), poll_seconds=self.poll_seconds)
        while True:
            try:
                await self.sync()
            except Exception:  # the loop outlives any one bad poll
                log.exception("config_dir_poll_failed")
            await asyncio.sleep(self.poll_seconds)
