"""``tessera control-plane [serve|migrate|check-config]``."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from control_plane.settings import ControlPlaneSettings
from tessera.errors import ConfigError
from tessera.logging import configure_logging
from tessera.settings import redact_url

log = structlog.get_logger("control_plane")


async def _serve(settings: ControlPlaneSettings) -> None:
    from control_plane.app import build_app  # noqa: PLC0415 - keep `migrate` light
    from tessera.grpc_server import wait_for_termination  # noqa: PLC0415

    app = await build_app(settings)
    await wait_for_termination(app.stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera control-plane")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the admin API, xDS and the policy stream (default)")
    sub.add_parser("migrate", help="upgrade the database schema to head")
    sub.add_parser("check-config", help="validate settings and exit")
    args = parser.parse_args(argv)
    settings = ControlPlaneSettings()
    configure_logging(settings.log, service="control-plane")
    url = settings.database.url.get_secret_value()
    try:
        if args.command == "migrate":
            from control_plane.db.migrate import upgrade  # noqa: PLC0415

            upgrade(url)
            log.info("migrated", database=redact_url(url))
        elif args.command == "check-config":
            print(settings.model_dump_json(indent=2))  # noqa: T201 - SecretStr fields print redacted
        else:
            asyncio.run(_serve(settings))
    except ConfigError as exc:
        print(f"tessera control-plane: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
