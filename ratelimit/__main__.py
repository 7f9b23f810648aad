"""``python -m ratelimit`` / ``tessera ratelimit``: ``serve`` (default) or ``check-config``."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog
from pydantic import ValidationError

from ratelimit.backends import make_backend
from ratelimit.settings import RatelimitSettings, check_settings
from ratelimit.workers import serve, supervise
from tessera.errors import ConfigError
from tessera.logging import configure_logging
from tessera.settings import redact_url

log = structlog.get_logger("ratelimit")

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera ratelimit", description="Envoy RLS v3 service")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve ShouldRateLimit (the default)")
    commands.add_parser("check-config", help="validate the settings from the environment and exit")
    args = parser.parse_args(argv)
    try:
        settings = RatelimitSettings()
    except ValidationError as exc:
        sys.stderr.write(f"ratelimit: invalid settings:\n{exc}\n")
        return EXIT_CONFIG
    configure_logging(settings.log, service="ratelimit")
    try:
        if args.command == "check-config":
            return _check_config(settings)
        check_settings(settings)
        if settings.workers > 1:
            return supervise(settings)
        asyncio.run(serve(settings))
    except ConfigError as exc:
        log.error("ratelimit_config_invalid", error=str(exc))  # noqa: TRY400 - expected; no traceback
        return EXIT_CONFIG
    return 0


def _check_config(settings: RatelimitSettings) -> int:
    check_settings(settings)
    url = settings.redis.url.get_secret_value()
    asyncio.run(make_backend(url).close())  # validates the URL; connects nothing
    log.info("ratelimit_config_ok", counters=redact_url(url), workers=settings.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
