"""Envoy's side of mutual TLS to Tessera's internal services, defined once for the bootstrap
(ADS, ext_authz) and the clusters the control plane sends (its HTTP API, the admin API).

Envoy's own certificate reaches it as the SDS secret ``tessera_identity`` read from a file
(``identity_sds``). Under ``tessera up`` the supervisor writes that file whole, certificate and
key inline, and replaces it atomically on renewal (Envoy watches the file, so a renewal never
shows it a key beside the wrong certificate). In Kubernetes the file names the files of the
mounted Secret and watches their directory (kubelet swaps them all at once). Each cluster
checks the server's SPIFFE ID (URI SAN), not just the CA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessera.identity import server_name, spiffe_id, write_private

IDENTITY_SECRET = "tessera_identity"  # noqa: S105 - an SDS secret's name
T = "type.googleapis.com/"
SECRET_TYPE = T + "envoy.extensions.transport_sockets.tls.v3.Secret"
UPSTREAM_TLS = T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def identity_sds_config(identity_sds: str) -> dict[str, Any]:
    """Where Envoy reads its own certificate: the SDS file, watched."""
    return {
        "name": IDENTITY_SECRET,
        "sds_config": {"path_config_source": {"path": identity_sds}, "resource_api_version": "V3"},
    }


def internal_tls(
    identity_sds: str, ca_file: str, peer: str, namespace: str, *, alpn: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The transport socket of a cluster to the internal component ``peer``: Envoy presents its
    identity and accepts only a certificate from the CA that names ``peer``'s SPIFFE ID."""
    peer_id = spiffe_id(peer, namespace)
    common: dict[str, Any] = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificate_sds_secret_configs": [identity_sds_config(identity_sds)],
        "validation_context": {
            "trusted_ca": {"filename": ca_file},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_id}}],
        },
    }
    if alpn:
        common["alpn_protocols"] = list(alpn)
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": UPSTREAM_TLS, "sni": server_name(peer_id), "common_tls_context": common},
    }


def _secret_file(secret: dict[str, Any]) -> str:
    return json.dumps({"resources": [{"@type": SECRET_TYPE, **secret}]})


def write_inline_identity(path: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """The SDS file with the certificate and key inline, replaced in one rename (0600): Envoy's
    watch sees one move, the whole new secret."""
    secret = {
        "name": IDENTITY_SECRET,
        "tls_certificate": {
            "certificate_chain": {"inline_string": cert_pem.decode()},
            "private_key": {"inline_string": key_pem.decode()},
        },
    }
    write_private(path, _secret_file(secret).encode())


def inline_certificate(path: Path) -> bytes | None:
    """The certificate an inline SDS file holds now (None: no file, or not one of ours)."""
    try:
        (secret,) = json.loads(path.read_text())["resources"]
        return str(secret["tls_certificate"]["certificate_chain"]["inline_string"]).encode()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_file_identity(path: Path, directory: Path, cert: str = "tls.crt", key: str = "tls.key") -> None:
    """The SDS file naming a mounted Secret's files (Kubernetes): Envoy reloads them when
    kubelet swaps the directory's ``..data`` link."""
    secret = {
        "name": IDENTITY_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": str(directory / cert)},
            "private_key": {"filename": str(directory / key)},
            "watched_directory": {"path": str(directory)},
        },
    }
    write_private(path, _secret_file(secret).encode())
