"""Real local Redis topologies for the tests, from Debian's ``redis-server``: a Redis Cluster of
three masters with a replica each, and a master with a replica watched by three Sentinels.
Each is started in a directory of the test's own, on free ports, and torn down with it."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tessera.ports import free_port, reserve


def _cli(port: int, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=check
    )
    return done.stdout


def _wait(what: str, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"redis topology: {what} not reached in {timeout:.0f}s"
            raise TimeoutError(msg)
        time.sleep(0.1)


def _answers(port: int) -> bool:
    return _cli(port, "ping", check=False).strip() == "PONG"


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, and kept from others."""
    while True:
        port = free_port()
        bus = port + 10_000
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", bus))
            except OSError:
                continue
        reserve(bus)
        return port


class _Servers:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, *args: str) -> None:
        self.procs[port] = subprocess.Popen(
            ["redis-server", *args],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / f"{port}.log").open("ab"),
        )
        _wait(f"redis on {port}", lambda: _answers(port))

    def server(self, port: int, *extra: str) -> None:
        common = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.start(port, *common, "--dir", str(self.workdir), *extra)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)


class LocalCluster(_Servers):
    """Three masters, each with one replica (``redis-cli --cluster create``)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ports = [_cluster_port() for _ in range(6)]
        for port in self.ports:
            self.server(
                port,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "1000",
            )  # fmt: skip
        _cli(
            self.ports[0],
            "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
            "--cluster-replicas", "1", "--cluster-yes",
        )  # fmt: skip
        _wait("cluster_state:ok", lambda: all(self._state_ok(p) for p in self.ports))
        _wait("every replica in sync", lambda: len(self.replicas()) == 3)

    def _state_ok(self, port: int) -> bool:
        return "cluster_state:ok" in _cli(port, "cluster", "info", check=False)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def _nodes(self) -> list[list[str]]:
        return [line.split() for line in _cli(self.ports[0], "cluster", "nodes").splitlines() if line]

    def masters(self) -> list[int]:
        return [int(n[1].split("@")[0].rsplit(":", 1)[1]) for n in self._nodes() if "master" in n[2]]

    def replicas(self) -> list[int]:
        """Ports of replicas whose link to their master is up."""
        return [
            int(n[1].split("@")[0].rsplit(":", 1)[1])
            for n in self._nodes()
            if "slave" in n[2]
            and "master_link_status:up"
            in _cli(int(n[1].split("@")[0].rsplit(":", 1)[1]), "info", "replication")
        ]

    def failover(self) -> None:
        """Every replica takes over from its master at once, coordinated (``CLUSTER FAILOVER``:
        the replica catches up first, no write is lost); then every node agrees again."""
        before = set(self.masters())
        for replica in self.replicas():
            _cli(replica, "cluster", "failover")
        _wait("the replicas promoted", lambda: set(self.masters()).isdisjoint(before), timeout=30)
        _wait("cluster_state:ok", lambda: all(self._state_ok(p) for p in self.ports))


class LocalSentinel(_Servers):
    """A master and its replica, watched by three Sentinels (quorum 2) as ``tessera``."""

    NAME = "tessera"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.master, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.server(self.master)
        self.server(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        for port in self.sentinels:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} 1000\n"
                f"sentinel failover-timeout {self.NAME} 5000\n"
            )
            self.start(port, str(conf), "--sentinel")
        _wait(
            "the replica known to every sentinel", lambda: all(self._sees_replica(p) for p in self.sentinels)
        )

    def _sees_replica(self, sentinel: int) -> bool:
        return f"{self.replica}" in _cli(sentinel, "sentinel", "replicas", self.NAME, check=False)

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{self.NAME}"

    def current_master(self) -> int:
        out = _cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", self.NAME).split()
        return int(out[1])

    def failover(self) -> None:
        """Sentinel promotes the replica (``SENTINEL FAILOVER``); the old master follows it."""
        old = self.current_master()
        _cli(self.sentinels[0], "sentinel", "failover", self.NAME)
        _wait("the replica promoted", lambda: self.current_master() != old, timeout=30)
        new = self.current_master()
        _wait("the new master writable", lambda: "role:master" in _cli(new, "info", "replication"))
