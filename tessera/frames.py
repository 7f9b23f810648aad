"""Length-prefixed protobuf frames over a byte stream: the admission stream's wire format.

Each frame is a 4-byte big-endian length, then that many bytes of one serialised message. Used
where a gRPC stream's per-message cost was measured to dominate the work it carries (ext_authz
→ ratelimit admissions: one frame per event-loop tick of Checks, ARCHITECTURE §6). ``Frames``
is an incremental parser for an ``asyncio.Protocol``'s ``data_received``; ``frame`` encodes.
"""

from __future__ import annotations

from typing import Final

from tessera.errors import InvalidArgumentError

HEADER: Final = 4
MAX_FRAME: Final = 16 * 1024 * 1024  # a batch of admissions is a few hundred KB at most


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "big") + payload


class Frames:
    """Bytes in (any split), whole frames out."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by ``data``; raises InvalidArgumentError on an oversized frame
        (the peer is not speaking this protocol: drop the connection)."""
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        start = 0
        while len(buf) - start >= HEADER:
            size = int.from_bytes(buf[start : start + HEADER], "big")
            if size > MAX_FRAME:
                raise InvalidArgumentError("frame", f"{size} bytes is over {MAX_FRAME}")
            end = start + HEADER + size
            if len(buf) < end:
                break
            out.append(bytes(buf[start + HEADER : end]))
            start = end
        if start:
            del buf[:start]
        return out
