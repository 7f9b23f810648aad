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
    ext_authz_host: str
    ext_authz_port: int
    ratelimit_host: str
    ratelimit_port: int


def render_bootstrap(params: BootstrapParams, template: Path = TEMPLATE) -> str:
    # substitute (not safe_substitute): a missing parameter is an error, not a literal "${x}".
    return Template(template.read_text()).substitute(asdict(params))
