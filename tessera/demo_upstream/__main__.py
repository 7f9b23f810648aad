"""``python -m tessera.demo_upstream``: serve the demo upstream until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Sequence

import structlog
from aiohttp import web

from tessera.demo_upstream.app import build_app
from tessera.logging import configure_logging
from tessera.settings import LogSettings

_log = structlog.get_logger("tessera.demo_upstream")

# How long in-flight requests get to finish once a stop signal arrives.
_SHUTDOWN_TIMEOUT_S = 2.0


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:  # noqa: PLR2004
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.demo_upstream",
        description="A stand-in for vLLM's OpenAI-compatible server (for tests and `make run`).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=8000, help="port to bind; 0 = ephemeral (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="model to serve (repeatable; default: demo)",
    )
    parser.add_argument("--name", default="demo-upstream", help="upstream name, for logs and responses")
    parser.add_argument(
        "--fail-status", type=int, default=0, help="answer everything with this status (a broken server)"
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="serve https with this certificate (chain)")
    parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    return parser


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def _serve(
    host: str,
    port: int,
    models: Sequence[str],
    name: str,
    *,
    fail_status: int = 0,
    tls: ssl.SSLContext | None = None,
) -> int:
    runner = web.AppRunner(
        build_app(models, name=name, fail_status=fail_status),
        access_log=None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port, ssl_context=tls).start()
        except OSError as exc:
            sys.stderr.write(f"demo-upstream: cannot listen on {host}:{port}: {exc.strerror or exc}\n")
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0][1]
        _log.info("demo_upstream.started", host=host, port=bound, models=list(models), name=name)
        await stop.wait()
        _log.info("demo_upstream.stopping", port=bound)
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(LogSettings(), service="demo-upstream")
    models: list[str] = args.models or ["demo"]
    tls = _tls(args.tls_cert, args.tls_key)
    return asyncio.run(_serve(args.host, args.port, models, args.name, fail_status=args.fail_status, tls=tls))


if __name__ == "__main__":
    raise SystemExit(main())
