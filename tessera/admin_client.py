"""Finds and calls the admin API: URL and token from flags, env or the data dir's admin.json."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.datadir import DataDir, read_json


class AdminConfigError(Exception):
    """The CLI cannot tell where the admin API is or which credential to use."""


@dataclass(frozen=True, slots=True)
class AdminTarget:
    url: str
    token: str


def resolve_target(data_dir: Path, url: str | None = None, token: str | None = None) -> AdminTarget:
    url = url or os.environ.get("TESSERA_ADMIN_URL")
    token = token or os.environ.get("TESSERA_ADMIN_TOKEN")
    if not (url and token):
        path = DataDir(data_dir).admin
        try:
            saved: dict[str, Any] = read_json(path)
        except FileNotFoundError as exc:
            msg = (
                f"no admin.json in {data_dir}: start the stack with `tessera up`, "
                "or pass --admin-url and --token"
            )
            raise AdminConfigError(msg) from exc
        except (OSError, ValueError) as exc:
            msg = f"cannot read {path}: {exc}"
            raise AdminConfigError(msg) from exc
        url = url or str(saved.get("admin_url", ""))
        token = token or str(saved.get("token", ""))
    return AdminTarget(url=url.removeprefix("grpc://"), token=token)


SERVICES = tuple(admin_pb2.DESCRIPTOR.services_by_name)  # TenantService, PlanService, ...


class AdminClient:
    """A thin synchronous client that attaches the bearer token to every call.

    RPC names are unique across the admin services, so callers name the method only.
    """

    def __init__(self, target: AdminTarget, *, timeout: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target.url)
        self._methods: dict[str, Any] = {}
        for service in SERVICES:
            stub = getattr(admin_pb2_grpc, f"{service}Stub")(self._channel)
            rpcs = admin_pb2.DESCRIPTOR.services_by_name[service].methods
            self._methods.update({m.name: getattr(stub, m.name) for m in rpcs})
        self._metadata = (("authorization", f"Bearer {target.token}"),)
        self._timeout = timeout

    def call(self, method: str, request: Any) -> Any:
        return self._methods[method](request, metadata=self._metadata, timeout=self._timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
