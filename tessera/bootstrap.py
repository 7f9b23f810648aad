"""Render the Envoy bootstrap template in ``envoy/`` with concrete addresses."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"


@dataclass(frozen=True, slots=True)
class BootstrapParams:
    node_id: str
    admin_host: str
    admin_port: int
    xds_host: str
    xds_port: int
    ext_authz: tuple[tuple[str, int], ...]  # one (host, port) per replica
    ratelimit_host: str
    ratelimit_port: int


def _endpoints(addresses: tuple[tuple[str, int], ...]) -> str:
    """A YAML flow list of lb_endpoints (hosts quoted: YAML would read ``n`` as false)."""
    items = [
        f'{{endpoint: {{address: {{socket_address: {{address: "{host}", port_value: {port}}}}}}}}}'
        for host, port in addresses
    ]
    return "[" + ", ".join(items) + "]"


def render_bootstrap(params: BootstrapParams, template: Path = TEMPLATE) -> str:
    values = asdict(params)
    values["ext_authz_endpoints"] = _endpoints(values.pop("ext_authz"))
    # substitute (not safe_substitute): a missing parameter is an error, not a literal "${x}".
    return Template(template.read_text()).substitute(values)
