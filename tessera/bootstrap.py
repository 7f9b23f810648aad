"""Render the Envoy bootstrap template in ``envoy/`` with concrete addresses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

from tessera.envoy_tls import internal_tls

# The source tree's envoy/bootstrap.yaml; an installed wheel carries it as tessera/envoy-bootstrap.yaml
# (pyproject's force-include), so `tessera up` works from any install.
_SOURCE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"
TEMPLATE = _SOURCE if _SOURCE.exists() else Path(__file__).resolve().parent / "envoy-bootstrap.yaml"


@dataclass(frozen=True, slots=True)
class BootstrapParams:
    node_id: str
    admin_socket: str  # Envoy admin: a unix socket, mode 0600
    stats_host: str  # the plain listener for /stats/prometheus and /ready
    stats_port: int
    xds_host: str
    xds_port: int
    ext_authz: tuple[tuple[str, int], ...]  # one (host, port) per replica
    identity_sds: str  # the SDS file holding Envoy's certificate (tessera/envoy_tls.py)
    ca_file: str  # the CA the internal services' certificates chain to
    namespace: str = "default"  # the services' SPIFFE IDs name it


def _endpoints(addresses: tuple[tuple[str, int], ...]) -> str:
    """A YAML flow list of lb_endpoints (hosts quoted: YAML would read ``n`` as false)."""
    items = [
        f'{{endpoint: {{address: {{socket_address: {{address: "{host}", port_value: {port}}}}}}}}}'
        for host, port in addresses
    ]
    return "[" + ", ".join(items) + "]"


def render_bootstrap(params: BootstrapParams, template: Path = TEMPLATE) -> str:
    def tls(peer: str, *alpn: str) -> str:
        return json.dumps(
            internal_tls(params.identity_sds, params.ca_file, peer, params.namespace, alpn=alpn)
        )

    values = {
        "node_id": params.node_id,
        "admin_socket": params.admin_socket,
        "stats_host": params.stats_host,
        "stats_port": params.stats_port,
        "xds_host": params.xds_host,
        "xds_port": params.xds_port,
        "ext_authz_endpoints": _endpoints(params.ext_authz),
        "xds_tls": tls("control-plane", "h2"),
        "ext_authz_tls": tls("ext-authz", "h2"),
        "ext_authz_http_tls": tls("ext-authz", "http/1.1"),
    }
    # substitute (not safe_substitute): a missing parameter is an error, not a literal "${x}".
    return Template(template.read_text()).substitute(values)
