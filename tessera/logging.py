"""structlog + stdlib logging, configured once per process.

JSON lines off a TTY, console output on a TTY; library records (grpc, sqlalchemy,
alembic) go through the same formatter. ``merge_contextvars`` comes first so
per-request fields (request_id, tenant_id, rpc) land on every line.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from typing import Any

import structlog
import structlog.tracebacks

from tessera.settings import LogSettings

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(settings: LogSettings, *, service: str, stream: Any = None) -> None:
    out = stream or sys.stdout
    use_json = settings.format == "json" or (settings.format == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if use_json:
        # Tracebacks without local variables: a frame's locals can hold a bearer token, a
        # request body or a file's contents, and a log is no place for them.
        no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        final.append(structlog.processors.ExceptionRenderer(no_locals))
    final.append(renderer)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structlog": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": final,
                    "foreign_pre_chain": _SHARED,
                },
            },
            "handlers": {
                "default": {
                    "class": "logging.StreamHandler",
                    "formatter": "structlog",
                    "stream": out,
                },
            },
            "root": {"handlers": ["default"], "level": settings.level},
            "loggers": {
                "sqlalchemy.engine": {"level": "WARNING"},
                "aiohttp.access": {"level": "WARNING"},
            },
        },
    )
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(settings.level)),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
