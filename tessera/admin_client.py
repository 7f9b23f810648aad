"""Finds and calls the admin API: URL and token from flags, env or the data dir's admin.json."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.datadir import DataDir, read_json
from tessera.identity import server_name, spiffe_id


class AdminConfigError(Exception):
    """The CLI cannot tell where the admin API is or which credential to use."""


@dataclass(frozen=True, slots=True)
class AdminTarget:
    url: str
    token: str
    # Mutual TLS: the operator's identity (certificate, key) and the CA the control plane's
    # certificate must chain to; the server must be the control plane of ``namespace``.
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    namespace: str = "default"

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


TLS_ENV = ("TESSERA_ADMIN_CERT_FILE", "TESSERA_ADMIN_KEY_FILE", "TESSERA_ADMIN_CA_FILE")


def _tls_files(saved: dict[str, Any]) -> tuple[Path | None, ...]:
    """(certificate, key, CA) from the environment, else admin.json; all three or none."""
    given = tuple(os.environ.get(name) for name in TLS_ENV)
    if not any(given):
        given = tuple(saved.get(k) for k in ("cert_file", "key_file", "ca_file"))
    if any(given) and not all(given):
        msg = "the admin API's mutual TLS needs a certificate, its key and the CA together"
        raise AdminConfigError(msg)
    return tuple(Path(v) if v else None for v in given)


def resolve_target(data_dir: Path, url: str | None = None, token: str | None = None) -> AdminTarget:
    url = url or os.environ.get("TESSERA_ADMIN_URL")
    token = token or os.environ.get("TESSERA_ADMIN_TOKEN")
    saved: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError):
        saved = _read(DataDir(data_dir).admin)
    if not (url and token):
        if not saved:
            msg = (
                f"no admin.json in {data_dir}: start the stack with `tessera up`, "
                "or pass --admin-url and --token"
            )
            raise AdminConfigError(msg)
        url = url or str(saved.get("admin_url", ""))
        token = token or str(saved.get("token", ""))
    cert, key, ca = _tls_files(saved)
    namespace = os.environ.get("TESSERA_ADMIN_NAMESPACE") or str(saved.get("namespace", "default"))
    return AdminTarget(url.removeprefix("grpc://"), token, cert, key, ca, namespace)


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(read_json(path))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        msg = f"cannot read {path}: {exc}"
        raise AdminConfigError(msg) from exc


def admin_channel(target: AdminTarget) -> grpc.Channel:
    """A channel to the admin API: mutual TLS as the operator when the target names the files
    (the server must hold the control plane's identity), else plaintext."""
    if not target.tls or target.cert_file is None or target.key_file is None or target.ca_file is None:
        return grpc.insecure_channel(target.url)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=target.ca_file.read_bytes(),
        private_key=target.key_file.read_bytes(),
        certificate_chain=target.cert_file.read_bytes(),
    )
    name = server_name(spiffe_id("control-plane", target.namespace))
    return grpc.secure_channel(target.url, credentials, options=[("grpc.ssl_target_name_override", name)])


SERVICES = tuple(admin_pb2.DESCRIPTOR.services_by_name)  # TenantService, PlanService, ...


class AdminClient:
    """A thin synchronous client that attaches the bearer token to every call.

    RPC names are unique across the admin services, so callers name the method only.
    """

    def __init__(self, target: AdminTarget, *, timeout: float = 10.0) -> None:
        self._channel = admin_channel(target)
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


def describe_error(exc: grpc.RpcError, target: AdminTarget) -> str:
    """One line for an admin call that failed: unreachable (is the stack up?) or the server's
    own status and message."""
    code = exc.code()
    details = exc.details() or ""
    # UNAVAILABLE from the transport (nothing listening) vs from the server (e.g. its database).
    low = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE and ("failed to connect" in low or "connection refused" in low):
        return f"cannot reach the admin API at {target.url} (is `tessera up` running?)"
    return f"{code.name}: {details}"
