"""The latest xDS snapshot, and a way to wait for the next one.

Knows nothing about where snapshots come from (the publisher) or who reads them
(the ADS servicer).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from google.protobuf import any_pb2

from control_plane.xds.resources import type_version


@dataclass(frozen=True)
class XdsSnapshot:
    serial: int
    resources: dict[str, dict[str, any_pb2.Any]]  # type_url -> name -> resource
    versions: dict[str, str] = field(default_factory=dict)  # type_url -> version

    @classmethod
    def build(cls, serial: int, resources: dict[str, dict[str, any_pb2.Any]]) -> XdsSnapshot:
        return cls(serial, resources, {t: type_version(r) for t, r in resources.items()})


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshot: XdsSnapshot | None = None
        self._changed = asyncio.Condition()

    @property
    def snapshot(self) -> XdsSnapshot | None:
        return self._snapshot

    async def set(self, snapshot: XdsSnapshot) -> None:
        async with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    async def wait_newer(self, serial: int) -> XdsSnapshot:
        """Return the first snapshot whose serial is greater than ``serial``."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._snapshot is not None and self._snapshot.serial > serial
            )
            assert self._snapshot is not None  # noqa: S101 - guaranteed by the predicate
            return self._snapshot
