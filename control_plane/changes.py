"""Change notices between control-plane replicas on one PostgreSQL: ``NOTIFY`` after each write,
``LISTEN`` on every replica, so a write on any of them reaches every data-plane subscriber of
every other within a second (not on the next periodic refresh).

A notice carries nothing but "read the store again": the store stays the only truth, and a
notice lost (a replica's listening connection was down) is made good by the publish that
follows every reconnection and by the periodic refresh. SQLite is single-replica: no notices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from prometheus_client import Counter
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger("control_plane.changes")

CHANNEL: Final = "tessera_changes"
RECEIVED = Counter("tessera_cp_change_notices_total", "Change notices from other replicas")
RECONNECT_MAX_SECONDS: Final = 5.0


def shares_changes(engine: AsyncEngine) -> bool:
    """Whether replicas can share this store (PostgreSQL) and so exchange notices."""
    return engine.dialect.name == "postgresql"


async def announce(engine: AsyncEngine, origin: str) -> None:
    """Tell every other replica that the store changed (``origin``: this replica's own name)."""
    async with engine.begin() as conn:
        await conn.execute(
            text("SELECT pg_notify(:channel, :origin)"), {"channel": CHANNEL, "origin": origin}
        )


def _libpq_url(engine: AsyncEngine) -> str:
    return make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)


async def follow(engine: AsyncEngine, origin: str, on_change: Callable[[], Awaitable[None]]) -> None:
    """Until cancelled: call ``on_change`` once per burst of other replicas' notices (notices
    arriving while it runs make one more call, not one each), and after every (re)connection."""
    import psycopg  # noqa: PLC0415 - the PostgreSQL extra: only a PostgreSQL store gets here

    delay = 0.1
    wake = asyncio.Event()
    worker = asyncio.create_task(_apply(wake, on_change))
    try:
        while True:
            try:
                # TCP keepalives: a listening connection that died silently is noticed in ~25 s
                connect = psycopg.AsyncConnection.connect(
                    _libpq_url(engine),
                    autocommit=True,
                    connect_timeout=5,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
                async with await connect as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    log.info("change_notices_listening")
                    delay = 0.1
                    wake.set()  # what was written while not listening
                    async for notice in conn.notifies():
                        if notice.payload != origin:  # its own write is published already
                            RECEIVED.inc()
                            wake.set()
            except Exception as exc:
                log.warning("change_notices_lost", error=type(exc).__name__, retry_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def _apply(wake: asyncio.Event, on_change: Callable[[], Awaitable[None]]) -> None:
    while True:
        await wake.wait()
        wake.clear()
        try:
            await on_change()
        except Exception:  # the periodic refresh tries again
            log.warning("change_publish_failed", exc_info=True)
