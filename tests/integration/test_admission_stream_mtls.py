"""The admission stream under mutual TLS, attacked from the network: only ext_authz's
identity admits; an anonymous client, a certificate from another CA and a valid certificate
with another identity get no verdict and change no counter. The real stream server, limiter
and Admitter; certificates from the real CA code."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ext_authz.admissions import Admitter
from ratelimit.admission_stream import start_admission_stream
from ratelimit.backends import MemoryCounterBackend
from ratelimit.limiter import RateLimiter
from ratelimit.limits import snapshot_from_policy
from tessera.admission.v1 import admission_pb2
from tessera.frames import Frames, frame
from tessera.identity import Authority, spiffe_id
from tessera.policy.v1 import policy_pb2, policy_pb2_grpc
from tessera.settings import AdmissionSettings, IdentitySettings
from tessera.tls import client_context, server_context


def identity(ca: Authority, name: str, component: str | None = None) -> IdentitySettings:
    return ca.ensure(name, spiffe_id(component or name))


def one_request_a_minute() -> RateLimiter:
    limit = policy_pb2.Limit(
        id="R1", tenant_id="t1", kind=policy_pb2.Limit.REQUESTS, limit=1, window_seconds=60
    )
    return RateLimiter(MemoryCounterBackend(), snapshot_from_policy("v1", [policy_pb2.Resource(limit=limit)]))


def batch(request_id: str) -> bytes:
    admit = admission_pb2.AdmitBatch(batch=1)
    admit.admissions.add(request_id=request_id, tenant_id="t1", key_id="k1", model="m")
    return frame(admit.SerializeToString())


async def exchange(port: int, tls: ssl.SSLContext | None) -> admission_pb2.VerdictBatch | None:
    """Send one batch; the verdict, or None when the server cut the connection instead."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    except (ssl.SSLError, ConnectionError):
        return None  # refused during the handshake
    try:
        writer.write(batch("probe"))
        await writer.drain()
        frames = Frames()
        replies: list[bytes] = []
        while not replies and (data := await asyncio.wait_for(reader.read(65536), 5)):
            replies = frames.feed(data)
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return admission_pb2.VerdictBatch.FromString(replies[0]) if replies else None


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "identity")


@pytest.fixture
async def server(ca: Authority) -> AsyncIterator[tuple[int, RateLimiter]]:
    limiter = one_request_a_minute()
    tls = server_context(identity(ca, "ratelimit"))
    srv = await start_admission_stream(
        limiter, "127.0.0.1", 0, reuse_port=False, tls=tls, allowed=frozenset({spiffe_id("ext-authz")})
    )
    yield srv.sockets[0].getsockname()[1], limiter
    srv.close()


async def test_only_ext_authz_admits_and_nobody_else_moves_a_counter(
    server: tuple[int, RateLimiter], ca: Authority, tmp_path: Path
) -> None:
    port, _ = server
    other_ca = Authority(tmp_path / "other")
    hostile: dict[str, ssl.SSLContext | None] = {
        "anonymous, plaintext": None,
        "a certificate from another CA": client_context(identity(other_ca, "ext-authz")),
        "our CA, another identity (the meter)": client_context(identity(ca, "meter")),
    }
    for who, tls in hostile.items():
        assert await exchange(port, tls) is None, who
    # The one request of the minute is still there: none of the above counted.
    verdict = await exchange(port, client_context(identity(ca, "ext-authz")))
    assert verdict is not None
    assert verdict.verdicts[0].allowed
    second = await exchange(port, client_context(identity(ca, "ext-authz")))
    assert second is not None
    assert not second.verdicts[0].allowed


async def test_the_admitter_speaks_mutual_tls_and_only_to_ratelimit(ca: Authority, tmp_path: Path) -> None:
    limiter = one_request_a_minute()
    ext_authz = identity(ca, "ext-authz")
    for server_name, expect_connected in (("ratelimit", True), ("impostor", False)):
        tls = server_context(identity(ca, server_name))  # a valid certificate either way
        srv = await start_admission_stream(
            limiter, "127.0.0.1", 0, reuse_port=False, tls=tls, allowed=frozenset({spiffe_id("ext-authz")})
        )
        port = srv.sockets[0].getsockname()[1]
        admitter = Admitter(
            AdmissionSettings(url="127.0.0.1:1", stream_url=f"127.0.0.1:{port}", reconnect_max_seconds=0.1),
            ext_authz,
        )
        task: asyncio.Task[Any] = asyncio.create_task(admitter.run())
        try:
            await asyncio.sleep(0.5)
            assert admitter.connected is expect_connected, server_name
            if expect_connected:
                admission = admission_pb2.Admission(request_id="a", tenant_id="t1", key_id="k1", model="m")
                verdict = await admitter.admit(admission)
                assert verdict is not None
                assert verdict.allowed
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            srv.close()


# --- the ratelimit service's gRPC server (Settle, RLS, health) under mutual TLS --------------


async def test_settle_answers_only_ext_authz_and_the_meter_and_rls_no_one(
    ca: Authority, tmp_path: Path
) -> None:
    """The real ratelimit app with an identity: a plaintext client cannot even connect, a
    certificate from another CA is refused in the handshake, and a valid certificate with an
    identity the method does not name gets PERMISSION_DENIED and settles nothing."""
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    from ratelimit.app import build_app  # noqa: PLC0415
    from tessera.admission.v1 import admission_pb2_grpc  # noqa: PLC0415
    from tessera.tls import grpc_channel  # noqa: PLC0415
    from tests.integration.test_ratelimit_service import FakePolicyService, settings_for  # noqa: PLC0415

    policy = FakePolicyService()
    policy_server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, policy_server)
    policy_port = policy_server.add_insecure_port("127.0.0.1:0")
    await policy_server.start()
    app = await build_app(settings_for(f"127.0.0.1:{policy_port}", identity=identity(ca, "ratelimit")))
    target = f"127.0.0.1:{app.port}"
    settle = admission_pb2.SettleBatch(
        usages=[admission_pb2.Usage(request_id="r", tenant_id="t1", model="m")]
    )
    try:

        async def call(who: IdentitySettings | None, method: str) -> grpc.StatusCode:
            async with grpc_channel(target, who, "ratelimit") as channel:
                try:
                    if method == "settle":
                        await admission_pb2_grpc.AdmissionServiceStub(channel).Settle(settle, timeout=3)
                    elif method == "rls":
                        await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
                            rls_pb2.RateLimitRequest(domain="tessera"), timeout=3
                        )
                    else:
                        await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=3
                        )
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        async def plaintext() -> grpc.StatusCode:
            async with grpc.aio.insecure_channel(target) as channel:
                try:
                    await admission_pb2_grpc.AdmissionServiceStub(channel).Settle(settle, timeout=3)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        assert await plaintext() == grpc.StatusCode.UNAVAILABLE
        other_ca = Authority(tmp_path / "other")
        assert await call(identity(other_ca, "meter"), "settle") == grpc.StatusCode.UNAVAILABLE
        assert await call(identity(ca, "envoy"), "settle") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(identity(ca, "meter"), "rls") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(identity(ca, "meter"), "settle") == grpc.StatusCode.OK
        assert await call(identity(ca, "ext-authz"), "settle") == grpc.StatusCode.OK
        assert await call(identity(ca, "supervisor"), "health") == grpc.StatusCode.OK
    finally:
        await app.stop()
        await policy_server.stop(0)


# --- renewal: a running server takes a renewed certificate without a restart ----------------


async def _served_serial(port: int, tls: ssl.SSLContext) -> str:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        cert: Any = writer.get_extra_info("peercert")
        return str(cert["serialNumber"])
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_a_renewed_certificate_is_served_from_the_next_connection_on(ca: Authority) -> None:
    """The supervisor renews ratelimit's certificate in place; new connections get the new one,
    with no restart."""
    from tessera.tls import follow_renewals  # noqa: PLC0415

    served = identity(ca, "ratelimit")
    tls = server_context(served)
    watcher = asyncio.create_task(follow_renewals(tls, served, every=0.05))
    allowed = frozenset({spiffe_id("ext-authz")})
    srv = await start_admission_stream(
        one_request_a_minute(), "127.0.0.1", 0, reuse_port=False, tls=tls, allowed=allowed
    )
    port = srv.sockets[0].getsockname()[1]
    client = client_context(identity(ca, "ext-authz"))
    try:
        first = await _served_serial(port, client)
        assert served.cert_file is not None
        served.cert_file.unlink()  # what is not fresh is issued again, in place
        assert ca.ensure("ratelimit", spiffe_id("ratelimit")) == served
        await asyncio.sleep(0.3)
        assert await _served_serial(port, client) != first
    finally:
        watcher.cancel()
        srv.close()
