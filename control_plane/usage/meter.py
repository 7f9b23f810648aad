"""``tessera meter``: ingest one Envoy's usage log into the ledger, exactly once.

The log is a file Envoy appends usage lines to (``tessera/usage_line.py``). The meter reads only
complete lines, from where its checkpoint says, and commits the rows and the new checkpoint in
one transaction: killed at any moment, it re-reads at most what it had not committed, and the
ledger's (node, request id) key drops any line seen twice.

Rotation: files are known by device, inode and a hash of their first line, not by name. A
rotated file (``usage.log`` renamed to ``usage.log.1`` and Envoy told to reopen) is read to its
end under its new name, and the new ``usage.log`` from its start.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy import delete, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db.models import MeterCheckpoint, UsageRecord
from control_plane.db.repositories import insert_stmt
from control_plane.usage import ledger
from control_plane.usage.settler import Settler
from control_plane.usage.telemetry import RequestMetrics, trace_ingestion
from tessera import usage_line
from tessera.probe import http_post

log = structlog.get_logger("control_plane.usage.meter")

# result: inserted | duplicate | invalid (not a v1 line) | refused (the database would not take it)
LINES = Counter("tessera_meter_lines_total", "Usage lines read", ["result"])
BACKLOG = Gauge("tessera_meter_backlog_bytes", "Bytes of usage log not ingested yet")
LAG = Gauge("tessera_meter_lag_seconds", "Age of the newest usage line when it was ingested")
LAST_INGEST = Gauge("tessera_meter_last_ingest_timestamp_seconds", "When the meter last committed rows")

MAX_BATCH_BYTES = 1 << 20
MAX_PARSED_LINES = 50_000  # lines the settle pass keeps parsed for the ledger (beyond: parsed again)
ROTATED_QUIET_SECONDS = 60.0  # a rotated file this long unwritten and read to its end goes
_ID_PROBE = 64 * 1024  # the first line (up to this) names a file, with its device and inode


@dataclass(frozen=True, slots=True)
class LogFile:
    path: Path
    file_id: str
    size: int
    mtime: float


def _file_id(fd: int) -> tuple[str, os.stat_result] | None:
    """Device, inode and the hash of the whole first line (an inode can be reused)."""
    st = os.fstat(fd)
    head = os.pread(fd, _ID_PROBE, 0)
    if b"\n" not in head and st.st_size <= len(head):
        return None  # not even one complete line yet: nothing to read, nothing to name
    digest = hashlib.sha256(head.split(b"\n", 1)[0]).hexdigest()[:24]
    return f"{st.st_dev}:{st.st_ino}:{digest}", st


def _identify(path: Path) -> LogFile | None:
    try:
        with path.open("rb") as f:
            found = _file_id(f.fileno())
    except OSError:
        return None
    if found is None:
        return None
    file_id, st = found
    return LogFile(path, file_id, st.st_size, st.st_mtime)


def log_files(log_path: Path) -> list[LogFile]:
    """The log and its rotated siblings (``usage.log.1``, ``usage.log-2026…``), oldest first."""
    found = [f for p in log_path.parent.glob(log_path.name + "*") if (f := _identify(p)) is not None]
    return sorted(found, key=lambda f: (f.mtime, f.path != log_path))


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete lines in ``data`` and how many bytes they span (a partial last line waits)."""
    end = data.rfind(b"\n")
    if end < 0:
        return [], 0
    return [ln for ln in data[:end].split(b"\n") if ln.strip()], end + 1


@dataclass(frozen=True, slots=True)
class _Chunk:
    end: int  # the offset after its last line
    lines: list[usage_line.UsageLine]
    invalid: int  # lines that were not v1 usage lines


class Meter:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        log_path: Path,
        node: str,
        *,
        retention: timedelta | None = None,
        rotate_bytes: int = 0,
        envoy_admin: str = "",
        settler: Settler | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._log_path = log_path
        self._node = node
        self._retention = retention
        self._rotate_bytes = rotate_bytes  # 0: someone else rotates (logrotate + /reopen_logs)
        self._envoy_admin = envoy_admin
        self._settler = settler
        self._metrics = metrics or RequestMetrics()
        self._offsets: dict[str, int] | None = None  # this meter is its node's only writer
        self._settle_offsets: dict[str, int] = {}  # file id -> read for settlement up to here
        self._parsed: dict[tuple[str, int], _Chunk] = {}  # (file id, offset) -> parsed by the settle pass
        self._parsed_lines = 0

    async def _checkpoints(self) -> dict[str, int]:
        """Read once from the database, then kept here: the meter is its node's only writer."""
        if self._offsets is None:
            async with self._sessionmaker() as s:
                rows = (
                    await s.execute(select(MeterCheckpoint).where(MeterCheckpoint.node == self._node))
                ).scalars()
                self._offsets = {c.file_id: c.offset for c in rows}
        return dict(self._offsets)

    async def ingest_available(self) -> int:
        """Read every complete line not ingested yet, in batches; returns the rows inserted."""
        inserted = 0
        offsets = await self._checkpoints()
        files = log_files(self._log_path)
        backlog = sum(max(0, f.size - offsets.get(f.file_id, 0)) for f in files)
        BACKLOG.set(backlog)
        if backlog == 0:
            LAG.set(0)  # caught up: no line waits (else an idle meter would show its last lag forever)
        for f in files:
            offset = offsets.get(f.file_id, 0)
            if f.size < offset:
                log.warning("usage_log_truncated", path=str(f.path), offset=offset, size=f.size)
                self._forget(f.file_id, f.size + 1)
                offset = 0  # truncated in place: its lines are new (duplicates are dropped anyway)
            while offset < f.size:
                read, added = await self._ingest_batch(f, offset)
                if read == 0:
                    break  # only a partial line left: Envoy has not finished writing it
                offset += read
                inserted += added
        BACKLOG.set(0)
        return inserted

    async def settle_available(self) -> int:
        """Offer every complete line of an admitted request (``reserved``) not offered yet to
        the settler, ahead of the ledger's slower cadence (a slot frees as soon as its line is
        read). The lines parsed here are kept for the ledger's next pass, so each line is parsed
        once. After a restart it starts from the checkpoint: a line settled twice changes
        nothing. Returns the lines offered."""
        if self._settler is None:
            return 0
        offered = 0
        checkpoints = await self._checkpoints()
        for f in log_files(self._log_path):
            # Its own position; the ledger's checkpoint only where it has none yet (a restart): the
            # ledger may have read further meanwhile, and those lines still need settling.
            offset = self._settle_offsets.get(f.file_id, checkpoints.get(f.file_id, 0))
            if f.size < offset:
                self._forget(f.file_id, f.size + 1)
                offset = 0  # truncated in place
            while offset < f.size:
                chunk = self._read(f, offset)
                if chunk is None:
                    break
                reserved = [ln for ln in chunk.lines if ln.reserved]
                self._settler.offer(reserved)
                offered += len(reserved)
                if self._parsed_lines < MAX_PARSED_LINES:
                    self._parsed[(f.file_id, offset)] = chunk
                    self._parsed_lines += len(chunk.lines)
                offset = chunk.end
            self._settle_offsets[f.file_id] = offset
        return offered

    def _read(self, f: LogFile, offset: int) -> _Chunk | None:
        """The complete lines from ``offset`` (up to ``MAX_BATCH_BYTES``), parsed; None when
        there are none yet or the path now names another file."""
        try:
            with f.path.open("rb") as fh:
                found = _file_id(fh.fileno())
                if found is None or found[0] != f.file_id:
                    return None  # the name now holds another file (rotated meanwhile): next pass
                data = os.pread(fh.fileno(), MAX_BATCH_BYTES, offset)
        except OSError:
            return None
        raw, span = complete_lines(data)
        if span == 0:
            return None
        parsed = [usage_line.parse(line, self._node) for line in raw]
        lines = [p for p in parsed if p is not None]
        return _Chunk(offset + span, lines, len(parsed) - len(lines))

    def _take(self, f: LogFile, offset: int) -> _Chunk | None:
        """Lines from ``offset``: those the settle pass parsed (consecutive chunks joined, up to
        ``MAX_BATCH_BYTES``), else read and parsed now."""
        chunk = self._parsed.pop((f.file_id, offset), None)
        if chunk is None:
            return self._read(f, offset)
        self._parsed_lines -= len(chunk.lines)
        while chunk.end - offset < MAX_BATCH_BYTES:
            nxt = self._parsed.pop((f.file_id, chunk.end), None)
            if nxt is None:
                break
            self._parsed_lines -= len(nxt.lines)
            chunk = _Chunk(nxt.end, chunk.lines + nxt.lines, chunk.invalid + nxt.invalid)
        return chunk

    def _forget(self, file_id: str, before: int) -> None:
        """Drop parsed chunks of ``file_id`` that start before ``before`` (read past, or truncated)."""
        for key in [k for k in self._parsed if k[0] == file_id and k[1] < before]:
            self._parsed_lines -= len(self._parsed.pop(key).lines)

    async def _ingest_batch(self, f: LogFile, offset: int) -> tuple[int, int]:
        chunk = self._take(f, offset)
        if chunk is None:
            return 0, 0
        lines, span = chunk.lines, chunk.end - offset
        self._forget(f.file_id, chunk.end)
        now, started_ns = datetime.now(UTC), time.time_ns()
        try:
            async with self._sessionmaker.begin() as s:
                terms = await ledger.load_terms(s)
                rows, dupes = await ledger.ingest(s, lines, terms, now)
                await self._save_checkpoint(s, f, offset + span, now)
            self._close(lines)
            self._metrics.observe(rows)
            trace_ingestion(lines, rows, started_ns)
            added = len(rows)
        except (DataError, IntegrityError):
            # A line the database refuses must not stop metering: take them one at a time.
            added, dupes, refused = await self._one_by_one(f, lines, offset + span, now)
            LINES.labels("refused").inc(refused)
        if self._offsets is not None:  # committed: the cached checkpoint follows
            self._offsets[f.file_id] = offset + span
        LINES.labels("inserted").inc(added)
        LINES.labels("duplicate").inc(dupes)
        LINES.labels("invalid").inc(chunk.invalid)
        LAST_INGEST.set(time.time())
        if lines:
            newest = max(ln.start_time + timedelta(milliseconds=ln.duration_ms) for ln in lines)
            LAG.set(max(0.0, (now - newest).total_seconds()))
        if chunk.invalid:
            log.warning("usage_lines_unreadable", count=chunk.invalid, path=str(f.path))
        log.debug("usage_ingested", inserted=added, duplicates=dupes, path=str(f.path), offset=offset + span)
        return span, added

    async def _one_by_one(
        self, f: LogFile, lines: list[usage_line.UsageLine], end: int, now: datetime
    ) -> tuple[int, int, int]:
        added = dupes = refused = 0
        for ln in lines:
            try:
                async with self._sessionmaker.begin() as s:
                    rows, d = await ledger.ingest(s, [ln], await ledger.load_terms(s), now)
                added, dupes = added + len(rows), dupes + d
                self._close([ln])
                self._metrics.observe(rows)
                trace_ingestion([ln], rows, time.time_ns())
            except (DataError, IntegrityError):
                refused += 1
                log.exception(
                    "usage_line_refused", node=ln.node, request_id=ln.request_id, trace_id=ln.trace_id
                )
        async with self._sessionmaker.begin() as s:
            await self._save_checkpoint(s, f, end, now)
        return added, dupes, refused

    def _close(self, lines: list[usage_line.UsageLine]) -> None:
        """Their ledger rows are committed: the usage backstop must not bill them. Lines that
        name no tenant too: an admitted request Envoy then refused without ext_authz's answer
        (ext_authz died, or answered too late) ran nowhere, and its line says so."""
        if self._settler is not None:
            self._settler.close(ln.request_id for ln in lines)

    async def _save_checkpoint(self, s: AsyncSession, f: LogFile, offset: int, now: datetime) -> None:
        row: dict[str, Any] = {"node": self._node, "file_id": f.file_id, "offset": offset,
                               "path": str(f.path), "updated_at": now}  # fmt: skip
        stmt = insert_stmt(s, MeterCheckpoint).values(row)
        await s.execute(
            stmt.on_conflict_do_update(
                index_elements=["node", "file_id"],
                set_={"offset": offset, "path": str(f.path), "updated_at": now},
            )
        )

    async def expire(self) -> int:
        """Drop ledger rows past the retention (rollups keep their sums) and checkpoints of
        files that no longer exist."""
        present = {f.file_id for f in log_files(self._log_path)}
        async with self._sessionmaker.begin() as s:
            await s.execute(
                delete(MeterCheckpoint).where(
                    MeterCheckpoint.node == self._node, MeterCheckpoint.file_id.not_in(present or {""})
                )
            )
            if self._retention is None:
                return 0
            cutoff = datetime.now(UTC) - self._retention
            # Billed rows (on a closed invoice) and rows billed to no one (refused unidentified).
            billed = UsageRecord.invoice_id.is_not(None) | UsageRecord.tenant_id.is_(None)
            done = await s.execute(delete(UsageRecord).where(UsageRecord.time < cutoff, billed))
            return int(getattr(done, "rowcount", 0) or 0)

    async def rotate(self, now: float | None = None) -> None:
        """Keep the log bounded: once it passes ``rotate_bytes`` and is read to its end, rename it
        and have Envoy reopen its path (lines Envoy still writes to the old file are read there);
        delete rotated files read to their end and quiet for a minute."""
        if not self._rotate_bytes:
            return
        now = time.time() if now is None else now
        offsets = await self._checkpoints()
        for f in log_files(self._log_path):
            done = offsets.get(f.file_id, -1) >= f.size
            if f.path == self._log_path:
                if done and f.size >= self._rotate_bytes:
                    await self._rotate_current(f, now)
            elif done and now - f.mtime > ROTATED_QUIET_SECONDS and self._reopened(f):
                f.path.unlink(missing_ok=True)
                async with self._sessionmaker.begin() as s:
                    await s.execute(
                        delete(MeterCheckpoint).where(
                            MeterCheckpoint.node == self._node, MeterCheckpoint.file_id == f.file_id
                        )
                    )
                log.info("usage_log_removed", path=str(f.path))

    async def _rotate_current(self, f: LogFile, now: float) -> None:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S%f")
        rotated = f.path.with_name(f"{f.path.name}.{stamp}")
        f.path.rename(rotated)
        status = await http_post(f"{self._envoy_admin}/reopen_logs")
        if status != 200:  # noqa: PLR2004
            # Envoy still writes to this file: put it back, or the next pass would delete it.
            rotated.rename(f.path)
            log.error("usage_log_rotation_failed", envoy_admin=self._envoy_admin, status=status)
            return
        log.info("usage_log_rotated", path=str(rotated), size=f.size)

    def _reopened(self, rotated: LogFile) -> bool:
        """Envoy writes a new file at the log's path (so not this one any more)."""
        current = _identify(self._log_path)
        return current is not None and current.file_id != rotated.file_id

    async def finish(self) -> int:
        """On shutdown: read the log to its end (every complete line) into the ledger and offer
        its settlements; returns the rows inserted. What Envoy wrote before it stopped is billed
        now, not by a meter that may never run again (the pod and its log volume go)."""
        self._offsets = None  # only what was committed counts (a pass may have been cut short)
        await self.settle_available()
        return await self.ingest_available()

    async def run_forever(
        self, interval: float = 0.5, expire_every: float = 3600.0, settle_interval: float = 0.1
    ) -> None:
        """Settle every ``settle_interval`` (cheap: reserved lines only); ingest into the ledger
        every ``interval`` (larger batches cost less per line)."""
        last_expire = last_ingest = 0.0
        while True:
            try:
                await self.settle_available()
                if time.monotonic() - last_ingest >= interval:
                    last_ingest = time.monotonic()
                    await self.ingest_available()
                    await self.rotate()
                if time.monotonic() - last_expire > expire_every:
                    last_expire = time.monotonic()
                    await self.expire()
            except Exception:
                log.exception("meter_pass_failed")  # the database may be down: try again
                self._offsets = None  # read the checkpoints again: only what was committed counts
            await asyncio.sleep(min(interval, settle_interval) if self._settler else interval)
