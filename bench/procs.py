"""Processes: ports, spawning (dies with the bench), stopping by pid, and /proc accounting.

CPU is read straight from ``/proc/<pid>/stat`` (utime + stime, all threads, in clock ticks)
and memory from ``/proc/<pid>/status`` (VmRSS, VmHWM): psutil is not a dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from tessera.probe import fetch

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session, logging to ``log``; it gets SIGTERM if the bench dies."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl, no locks taken
        )


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM this one process (by its pid), then SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def until(fn: Callable[[], T], *, timeout: float, interval: float = 0.2) -> T:
    """Call ``fn`` until it stops raising RuntimeError or OSError (re-raised after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (RuntimeError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def wait_http(url: str, *, timeout: float = 30.0, method: str = "GET") -> int:
    """Poll until ``url`` answers with any HTTP status; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=1) as resp:  # noqa: S310 - loopback URLs we built
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    msg = f"{url} did not answer within {timeout:.0f}s"
    raise TimeoutError(msg)


def envoy_counters(admin_url: str) -> dict[str, int]:
    """Envoy's request counters from its admin ``/stats``: every cluster's ``upstream_rq_total``
    and every HTTP listener's ``downstream_rq_total``."""
    query = urllib.parse.urlencode({"filter": r"(upstream_rq_total|downstream_rq_total)$"})
    status, body = fetch(f"{admin_url}/stats?{query}", timeout=5)  # http:// or Tessera's unix socket
    if status != 200:
        msg = f"Envoy admin {admin_url} answered {status}"
        raise OSError(msg)
    text = body.decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (every thread), in seconds; 0.0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def descendants(pid: int, stop_at: frozenset[int] = frozenset()) -> list[int]:
    """``pid`` and every live process below it (e.g. SO_REUSEPORT workers), not entering ``stop_at``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c in children.get(p, ()) if c not in stop_at)
    return out


def tree_cpu_seconds(pid: int, stop_at: frozenset[int] = frozenset()) -> float:
    return sum(cpu_seconds(p) for p in descendants(pid, stop_at))


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in kB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in {"VmRSS", "VmHWM"}:
                out[name] = int(value.split()[0])
    return out


class CpuMeter:
    """CPU seconds per named process tree between ``start()`` and ``stop()``.

    A tree stops at the other named pids, so a supervisor is charged only for itself,
    not for the services it runs (they have their own rows).
    """

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._named = frozenset(self.pids.values())
        self._before: dict[str, float] = {}
        self._self_before = 0.0

    def start(self) -> None:
        self._before = {name: self._tree(pid) for name, pid in self.pids.items()}
        self._self_before = _children_cpu()

    def stop(self) -> tuple[dict[str, float], float]:
        """Per-process CPU deltas, and the CPU of the load generator (our reaped children)."""
        after = {name: self._tree(pid) for name, pid in self.pids.items()}
        deltas = {name: max(0.0, after[name] - self._before[name]) for name in self.pids}
        return deltas, _children_cpu() - self._self_before

    def _tree(self, pid: int) -> float:
        return tree_cpu_seconds(pid, self._named - {pid})


def _children_cpu() -> float:
    ru = os.times()
    return ru.children_user + ru.children_system
