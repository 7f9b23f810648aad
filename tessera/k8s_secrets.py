"""``tessera identity k8s-secrets``: the workload identities of a Kubernetes namespace as plain
``kubernetes.io/tls`` Secrets (``tls.crt``, ``tls.key``, ``ca.crt``: cert-manager's layout), for
clusters without cert-manager (k8s/examples/plain-secrets).

The CA stays in ``<data-dir>/k8s-identity/<namespace>/`` so that running the command again
renews the leaves under the same trust: run it (and apply the output) before half of
``--hours`` has passed; the pods reload renewed Secrets without a restart.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

from tessera.identity import Authority, spiffe_id, write_private

# component -> the node its SPIFFE ID names ("" for none); every Envoy pod is node "gateway"
K8S_IDENTITIES = {
    "control-plane": "",
    "ext-authz": "",
    "ratelimit": "",
    "meter": "",
    "operator": "",
    "envoy": "gateway",
}


def secret_name(component: str) -> str:
    return f"tessera-identity-{component}"


def identity_secrets(directory: Path, namespace: str, hours: float) -> list[dict[str, Any]]:
    """One Secret per identity, each leaf issued afresh by the namespace's CA."""
    authority = Authority(directory / namespace)
    ca = authority.cert_path.read_bytes()
    out = []
    for component, node in K8S_IDENTITIES.items():
        cert, key = authority.issue(spiffe_id(component, namespace, node), lifetime=dt.timedelta(hours=hours))
        data = {"tls.crt": cert, "tls.key": key, "ca.crt": ca}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {"name": secret_name(component), "namespace": namespace},
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
            }
        )
    return out


def write_secrets(data_dir: Path, namespace: str, out: Path, hours: float) -> None:
    """The Secrets as a YAML stream (JSON documents), written 0600: it holds private keys."""
    docs = identity_secrets(data_dir / "k8s-identity", namespace, hours)
    write_private(out, "".join(f"---\n{json.dumps(d)}\n" for d in docs).encode())
