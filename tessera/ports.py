"""Free ports for the embedded stack and the tests, from below the kernel's ephemeral range.

A port found free by binding port 0 comes from the ephemeral range, which is also where every
outgoing connection takes its local port: between the moment the port is handed out and the
moment its server binds it, a connection may take it ("Address already in use"). Ports below
that range are never taken that way. A process never hands out the same port twice (several
picked before any is bound would otherwise collide now and then), nor one it was told is taken.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Final

LOWEST: Final = 10_000
RANGE_FILE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def reserve(*taken: int) -> None:
    """Ports chosen elsewhere (not bound yet): never handed out by ``free_port``."""
    _handed_out.update(taken)


def _ephemeral_start() -> int:
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    top = _ephemeral_start()
    if top - LOWEST > 1000:  # noqa: PLR2004 - room enough to pick at random
        for _ in range(200):
            port = LOWEST + secrets.randbelow(top - LOWEST)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
