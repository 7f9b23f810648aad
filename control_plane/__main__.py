"""``tessera control-plane [serve|migrate|check-config]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import structlog

from control_plane.settings import ControlPlaneSettings
from tessera.errors import ConfigError
from tessera.logging import configure_logging
from tessera.settings import redact_url

SETTLE_DRAIN_SECONDS = 5.0  # at shutdown, for the last settlements to reach the ratelimit service

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


async def _bootstrap(settings: ControlPlaneSettings, name: str) -> tuple[str, str]:
    """Create the first platform admin; returns (principal JSON, admin key)."""
    from google.protobuf import json_format  # noqa: PLC0415

    from control_plane.admin.convert import principal_pb  # noqa: PLC0415
    from control_plane.admin.principals import bootstrap_platform_admin  # noqa: PLC0415
    from control_plane.app import check_schema  # noqa: PLC0415
    from control_plane.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
    from tessera.keys import load_pepper  # noqa: PLC0415

    pepper = load_pepper(settings.pepper.file)
    engine = make_engine(settings.database.url.get_secret_value())
    try:
        await check_schema(engine)
        async with make_sessionmaker(engine).begin() as session:
            principal, key = await bootstrap_platform_admin(session, name, pepper)
            await session.refresh(principal, ["bindings", "credentials"])
            doc = json_format.MessageToJson(principal_pb(principal), preserving_proto_field_name=True)
    finally:
        await engine.dispose()
    return doc, key


async def _meter(settings: ControlPlaneSettings, log_path: Path, node: str) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from control_plane.app import check_schema  # noqa: PLC0415
    from control_plane.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
    from control_plane.usage.backstop import UsageBackstop  # noqa: PLC0415
    from control_plane.usage.meter import Meter  # noqa: PLC0415
    from control_plane.usage.settler import Settler  # noqa: PLC0415
    from control_plane.usage.telemetry import RequestMetrics  # noqa: PLC0415
    from tessera import tracing  # noqa: PLC0415
    from tessera.grpc_server import wait_for_termination  # noqa: PLC0415
    from tessera.metrics import serve_metrics, set_ready  # noqa: PLC0415
    from tessera.probe import http_base  # noqa: PLC0415

    engine = make_engine(settings.database.url.get_secret_value())
    try:
        await check_schema(engine)
        metrics = serve_metrics(settings.metrics)
        tracing.configure("tessera-meter", settings.tracing)
        retention = timedelta(days=settings.billing.raw_retention_days)
        settler = (
            Settler(settings.admission.url, identity=settings.identity) if settings.admission.url else None
        )
        tasks = []
        if settler is not None:  # settles, closes admissions billed, and bills those never closed
            backstop = UsageBackstop(
                make_sessionmaker(engine), settings.admission.url, settler, identity=settings.identity
            )
            tasks += [
                asyncio.create_task(settler.run()),
                asyncio.create_task(backstop.run_forever(settings.meter.backstop_poll_seconds)),
            ]
        meter = Meter(
            make_sessionmaker(engine),
            log_path,
            node,
            retention=retention,
            rotate_bytes=settings.meter.rotate_bytes,
            envoy_admin=http_base(settings.meter.envoy_admin),
            settler=settler,
            metrics=RequestMetrics(settings.meter.metric_label_values),
        )
        log.info("meter_started", log=str(log_path), node=node, metrics_port=metrics.port)
        set_ready(True)  # its /healthz: the store answered and the log is being read
        running = asyncio.create_task(
            meter.run_forever(settings.meter.poll_seconds, settle_interval=settings.meter.settle_poll_seconds)
        )

        async def stop_reading() -> None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

        try:
            await wait_for_termination(stop_reading)
            # SIGTERM: Envoy has stopped writing (it is stopped first); bill what it wrote
            log.info("meter_stopping")
            rows = await meter.finish()
            settled = await settler.drained(SETTLE_DRAIN_SECONDS) if settler is not None else True
            log.info("meter_stopped", rows=rows, settlements_sent=settled)
        finally:
            running.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(tracing.shutdown)
    finally:
        await engine.dispose()


def meter_main(argv: list[str] | None = None) -> int:
    """``tessera meter``: ingest one Envoy's usage log into the ledger (ARCHITECTURE §4)."""
    parser = argparse.ArgumentParser(prog="tessera meter")
    parser.add_argument("--log", type=Path, help="the Envoy's usage log (default TESSERA_METER__LOG_PATH)")
    parser.add_argument("--node", help="node name for lines that carry none (default TESSERA_METER__NODE)")
    args = parser.parse_args(argv)
    settings = ControlPlaneSettings()
    configure_logging(settings.log, service="meter")
    log_path = args.log or settings.meter.log_path or settings.gateway.access_log_path
    if log_path is None:
        print("tessera meter: give --log PATH (or TESSERA_METER__LOG_PATH)", file=sys.stderr)  # noqa: T201
        return 2
    try:
        asyncio.run(_meter(settings, log_path, args.node or settings.meter.node or "unknown"))
    except ConfigError as exc:
        print(f"tessera meter: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def admin_main(argv: list[str] | None = None) -> int:
    """``tessera admin bootstrap NAME``: the first platform admin of a deployment, key shown once."""
    import json  # noqa: PLC0415

    from tessera.errors import TesseraError  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="tessera admin")
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("bootstrap", help="create the first platform admin and print its admin key once")
    boot.add_argument("name", help="principal name, e.g. an e-mail address")
    boot.add_argument("--output", "-o", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    settings = ControlPlaneSettings()
    configure_logging(
        settings.log.model_copy(update={"level": "WARNING"}), service="control-plane", stream=sys.stderr
    )
    try:
        doc, key = asyncio.run(_bootstrap(settings, args.name))
    except TesseraError as exc:
        print(f"tessera admin: {exc}", file=sys.stderr)  # noqa: T201
        return 2 if isinstance(exc, ConfigError) else 1
    if args.output == "json":
        print(json.dumps({"principal": json.loads(doc), "key": key}, indent=2))  # noqa: T201
    else:
        print(f"platform admin {args.name} created. Admin key (shown once):\n{key}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
