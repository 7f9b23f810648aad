"""``python -m ext_authz [serve|check-config]`` (also ``tessera ext-authz …``)."""

from __future__ import annotations

import argparse
import sys

import structlog
from pydantic import ValidationError

from ext_authz.settings import ExtAuthzSettings, check_settings
from ext_authz.workers import run, supervise
from tessera.errors import ConfigError
from tessera.keys import load_pepper
from tessera.logging import configure_logging

log = structlog.get_logger("ext_authz")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ext_authz", description="Tessera ext_authz service")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="answer Envoy's ext_authz checks, over gRPC or HTTP (default)")
    serve.add_argument("--workers", type=int, default=None, help="processes sharing the port (SO_REUSEPORT)")
    sub.add_parser("check-config", help="validate settings and the pepper, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = ExtAuthzSettings()
    except ValidationError as exc:
        sys.stderr.write(f"ext_authz: invalid settings:\n{exc}\n")
        return EXIT_CONFIG
    configure_logging(settings.log, service="ext_authz")
    try:
        if args.command == "check-config":
            load_pepper(settings.pepper.file)
            log.info(
                "config_ok",
                transport=settings.transport,
                grpc_port=settings.grpc.port,
                policy_url=settings.policy.url,
            )
            return 0
        if getattr(args, "workers", None):
            settings = settings.model_copy(update={"workers": args.workers})
        check_settings(settings)
        if settings.workers > 1:
            return supervise(settings)
        run(settings)
    except ConfigError as exc:
        log.error("startup_failed", error=str(exc))  # noqa: TRY400 - a config error has no useful traceback
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
