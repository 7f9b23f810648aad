"""The real ``ext_authz.admissions.Admitter`` against an admission server the test controls.

The stream server is a small asyncio server in the test speaking the admission stream's wire
format (``tessera/frames.py``, ``tessera.admission.v1``) whose verdicts are the real ones:
``ratelimit.admission.decide_batch`` over a real ``RateLimiter`` (memory counters, a
concurrency limit of 1 per tenant, so a reservation held or given back shows in the next
verdict). What the test controls is delivery: answer at once, hold a batch (neither decided
nor answered) until the test lets it go, or never answer (a half-open connection). ``Settle``
(how the Admitter gives a reservation back) is the real ``AdmissionServicer`` over the same
limiter on a real grpc.aio server, recording what it was sent. No mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from ext_authz.admissions import MISSES_BEFORE_RECONNECT, Admitter
from ratelimit.admission import AdmissionServicer, decide_batch
from ratelimit.backends import MemoryCounterBackend
from ratelimit.limiter import RateLimiter
from ratelimit.limits import snapshot_from_policy
from tessera.admission.v1 import admission_pb2, admission_pb2_grpc
from tessera.frames import Frames, frame
from tessera.policy.v1 import policy_pb2
from tessera.settings import AdmissionSettings

TIMEOUT = 0.2  # the Admitter's timeout_seconds: short, but far above an answer's few ms here
TENANTS = ("t1", "t2")  # each with a concurrency limit of 1 (one reservation held at a time)


class Mode(enum.Enum):
    ANSWER = "answer"  # decide and answer at once
    HOLD = "hold"  # decide and answer only when the test opens the gate
    SILENT = "silent"  # never answer (read and record only: a half-open connection)


@dataclass
class Connection:
    """One admission stream as the server saw it."""

    writer: asyncio.StreamWriter
    batches: list[admission_pb2.AdmitBatch] = field(default_factory=list)
    answered: int = 0  # VerdictBatch frames written
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the peer went away (or we did)

    @property
    def admissions(self) -> list[admission_pb2.Admission]:
        return [a for b in self.batches for a in b.admissions]

    def kill(self) -> None:
        self.writer.transport.abort()


class SlowAdmissionServer:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.mode = Mode.ANSWER
        self.gate = asyncio.Event()  # opens the held batches
        self.connections: list[Connection] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop_listening(self) -> None:
        assert self._server is not None
        self._server.close()

    async def stop(self) -> None:
        self.stop_listening()
        for conn in self.connections:
            conn.kill()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(writer)
        self.connections.append(conn)
        frames = Frames()
        try:
            while data := await reader.read(65536):
                for raw in frames.feed(data):
                    batch = admission_pb2.AdmitBatch.FromString(raw)
                    conn.batches.append(batch)
                    if self.mode is Mode.ANSWER:
                        await self._answer(conn, batch)
                    elif self.mode is Mode.HOLD:
                        held = asyncio.create_task(self._answer_when_let_go(conn, batch))
                        self._tasks.add(held)
        except ConnectionResetError:
            pass  # the Admitter aborted the connection
        finally:
            conn.closed.set()
            writer.close()
            self._tasks.discard(task)

    async def _answer_when_let_go(self, conn: Connection, batch: admission_pb2.AdmitBatch) -> None:
        await self.gate.wait()
        await self._answer(conn, batch)

    async def _answer(self, conn: Connection, batch: admission_pb2.AdmitBatch) -> None:
        reply = await decide_batch(self.limiter, batch)  # the real decision, made only now
        if not conn.writer.is_closing():
            conn.writer.write(frame(reply.SerializeToString()))
            conn.answered += 1


class RecordingAdmissionServicer(AdmissionServicer):
    """The real Settle, recording each usage it was sent."""

    def __init__(self, limiter: RateLimiter) -> None:
        super().__init__(limiter)
        self.usages: list[admission_pb2.Usage] = []

    async def Settle(  # noqa: N802 - the gRPC method name
        self, request: admission_pb2.SettleBatch, context: Any
    ) -> admission_pb2.SettleReply:
        self.usages.extend(request.usages)
        return await super().Settle(request, context)

    def released(self, request_id: str) -> list[admission_pb2.Usage]:
        return [u for u in self.usages if u.request_id == request_id]


# --- helpers and fixtures ------------------------------------------------------------------


def unanswered() -> float:
    return REGISTRY.get_sample_value("tessera_authz_admissions_unanswered_total") or 0.0


async def eventually(condition: Callable[[], object], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)


def admission(request_id: str, tenant: str = "t1") -> admission_pb2.Admission:
    return admission_pb2.Admission(
        request_id=request_id,
        tenant_id=tenant,
        key_id="k1",
        model="m",
        body_bytes=120,
        max_completion_tokens=16,
    )


async def verdict_of(admitter: Admitter, request_id: str, tenant: str = "t1") -> admission_pb2.Verdict:
    verdict = await admitter.admit(admission(request_id, tenant))
    assert verdict is not None, f"{request_id} was not answered in time"
    return verdict


@pytest.fixture
def limiter() -> RateLimiter:
    limits = [
        policy_pb2.Limit(id=f"C-{t}", tenant_id=t, kind=policy_pb2.Limit.CONCURRENCY, limit=1)
        for t in TENANTS
    ]
    return RateLimiter(
        MemoryCounterBackend(), snapshot_from_policy("v1", [policy_pb2.Resource(limit=x) for x in limits])
    )


@pytest.fixture
async def settle(limiter: RateLimiter) -> AsyncIterator[tuple[RecordingAdmissionServicer, str]]:
    servicer = RecordingAdmissionServicer(limiter)
    server = grpc.aio.server()
    admission_pb2_grpc.add_AdmissionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def stream(limiter: RateLimiter) -> AsyncIterator[SlowAdmissionServer]:
    server = SlowAdmissionServer(limiter)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def admitter(
    stream: SlowAdmissionServer, settle: tuple[RecordingAdmissionServicer, str]
) -> AsyncIterator[Admitter]:
    """The real Admitter, running, its stream open (the server has seen the connection)."""
    settings = AdmissionSettings(
        url=settle[1],
        stream_url=f"127.0.0.1:{stream.port}",
        timeout_seconds=TIMEOUT,
        reconnect_max_seconds=0.2,
    )
    admitter = Admitter(settings)
    task = asyncio.create_task(admitter.run())
    try:
        await eventually(lambda: admitter.connected and stream.connections, "the stream opened")
        yield admitter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def settled(settle: tuple[RecordingAdmissionServicer, str]) -> RecordingAdmissionServicer:
    return settle[0]


async def reconnected(admitter: Admitter, stream: SlowAdmissionServer, connections: int) -> Connection:
    await eventually(
        lambda: len(stream.connections) == connections and admitter.connected, f"connection {connections}"
    )
    return stream.connections[-1]


# --- 1. answered in time -------------------------------------------------------------------


async def test_admissions_answered_in_time_return_their_verdicts(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    before = unanswered()
    # One event-loop tick of admissions: one batch, answered in order by the real limiter
    # (a concurrency limit of 1: the first holds the slot, the others are refused).
    futures = [admitter.admit(admission(f"r{i}")) for i in range(3)]
    verdicts = await asyncio.gather(*futures)
    assert all(v is not None for v in verdicts)
    assert [(v.allowed, v.reserved) for v in verdicts if v is not None] == [
        (True, True),
        (False, False),
        (False, False),
    ]
    (conn,) = stream.connections
    assert len(conn.batches) == 1
    assert [a.request_id for a in conn.batches[0].admissions] == ["r0", "r1", "r2"]
    assert not any(a.forced for a in conn.admissions)
    # Another tenant's limit is its own.
    assert (await verdict_of(admitter, "other", "t2")).allowed
    assert unanswered() == before


# --- 2. not answered in time -----------------------------------------------------------------


async def test_an_admission_not_answered_in_time_returns_none_and_is_counted(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    stream.mode = Mode.SILENT
    before = unanswered()
    started = time.monotonic()
    verdict = await admitter.admit(admission("slow"))
    elapsed = time.monotonic() - started
    assert verdict is None  # the caller's fail mode decides
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.0
    assert unanswered() == before + 1
    # It was sent (unanswered, not unsent), and the connection is kept (one miss only).
    (conn,) = stream.connections
    assert [a.request_id for a in conn.admissions] == ["slow"]
    assert admitter.connected
    assert not conn.closed.is_set()


async def test_an_admission_while_not_connected_returns_none_at_once_and_is_counted(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    stream.stop_listening()
    stream.connections[0].kill()
    await eventually(lambda: not admitter.connected, "the Admitter saw the connection go")
    before = unanswered()
    started = time.monotonic()
    assert await admitter.admit(admission("nowhere")) is None
    assert time.monotonic() - started < TIMEOUT
    assert unanswered() == before + 1


# --- 3. a late verdict for a request refused fail-closed is given back --------------------------


async def test_a_late_reservation_of_an_abandoned_request_is_released(
    admitter: Admitter, stream: SlowAdmissionServer, settled: RecordingAdmissionServicer
) -> None:
    stream.mode = Mode.HOLD  # the counters are slow: nothing is decided until the gate opens
    gone, kept = admission("gone", "t1"), admission("kept", "t2")
    verdicts = await asyncio.gather(admitter.admit(gone), admitter.admit(kept))
    assert list(verdicts) == [None, None]
    # "gone" is refused fail-closed: the caller abandons it. Its release is sent at once (it
    # holds nothing yet: a settle of nothing changes nothing) ...
    admitter.abandon(gone)
    await eventually(lambda: len(settled.released("gone")) == 1, "the immediate release")
    assert stream.connections[0].answered == 0
    # ... and again when its admission lands late with a reservation.
    stream.gate.set()
    await eventually(lambda: stream.connections[0].answered == 1, "the late verdicts")
    await eventually(lambda: len(settled.released("gone")) == 2, "the release of the late reservation")
    usage = settled.released("gone")[-1]
    assert (usage.request_id, usage.tenant_id, usage.key_id, usage.model) == ("gone", "t1", "k1", "m")
    assert usage.HasField("prompt_tokens")
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 0)  # it never ran
    await asyncio.sleep(0.1)
    assert settled.released("kept") == []  # not abandoned (it ran fail-open): nothing given back
    # The counters agree: t1's only slot was given back, t2's is still held by "kept".
    stream.mode = Mode.ANSWER
    assert (await verdict_of(admitter, "next-t1", "t1")).allowed
    assert not (await verdict_of(admitter, "next-t2", "t2")).allowed


async def test_an_abandoned_request_answered_in_time_is_released(
    admitter: Admitter, stream: SlowAdmissionServer, settled: RecordingAdmissionServicer
) -> None:
    """Envoy abandons the Check (its future is cancelled) before the verdict lands."""
    stream.mode = Mode.HOLD
    future = admitter.admit(admission("cancelled"))
    await eventually(lambda: stream.connections[0].batches, "the batch sent")
    future.cancel()
    admitter.abandon(admission("cancelled"))
    await eventually(lambda: len(settled.released("cancelled")) == 1, "the immediate release")
    stream.gate.set()  # answered within the timeout, for a request that will not run
    await eventually(lambda: len(settled.released("cancelled")) == 2, "the release of its reservation")
    stream.mode = Mode.ANSWER
    assert (await verdict_of(admitter, "after")).allowed


# --- 4. fail-open admissions are counted: force ------------------------------------------------


async def test_a_forced_admission_reaches_the_server_and_again_after_a_disconnect(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    stream.mode = Mode.SILENT
    first = stream.connections[0]
    assert await admitter.admit(admission("open")) is None
    admitter.force(admission("open"))  # admitted fail-open: count it
    await eventually(lambda: len(first.admissions) == 2, "the forced admission on the first connection")
    original, forced = first.admissions
    assert not original.forced
    assert forced.forced
    assert forced.request_id == "open"
    assert forced.tenant_id == "t1"
    # It was never acknowledged: when the connection goes, it is sent again on the next one.
    stream.mode = Mode.ANSWER
    first.kill()
    second = await reconnected(admitter, stream, 2)
    await eventually(lambda: second.answered >= 1, "the forced admission answered on the new connection")
    assert [(a.request_id, a.forced) for a in second.batches[0].admissions] == [("open", True)]
    # It was counted: t1's only slot is taken.
    assert not (await verdict_of(admitter, "someone-else")).allowed


async def test_a_forced_admission_made_while_disconnected_is_sent_first_on_reconnect(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    stream.stop_listening()
    stream.connections[0].kill()
    await eventually(lambda: not admitter.connected, "the Admitter saw the connection go")
    assert await admitter.admit(admission("offline")) is None  # no stream: fail mode at once
    admitter.force(admission("offline"))
    await stream.start()  # the same port again
    second = await reconnected(admitter, stream, 2)
    await eventually(lambda: second.answered >= 1, "the forced admission answered")
    assert [(a.request_id, a.forced) for a in second.batches[0].admissions] == [("offline", True)]
    assert not (await verdict_of(admitter, "someone-else")).allowed  # it holds t1's slot


async def test_a_forced_admission_in_an_expired_batch_is_sent_again_after_a_reconnect(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    """The usual fail-open path against a dead server: a Check times out and is forced while
    other Checks arrive, so the forced admission rides in their batch, which expires too."""
    stream.mode = Mode.SILENT
    first = stream.connections[0]
    assert await admitter.admit(admission("a1")) is None
    admitter.force(admission("a1"))
    second_check = admitter.admit(admission("a2"))  # the same tick: one batch with forced a1
    assert await second_check is None
    assert [(a.request_id, a.forced) for a in first.batches[1].admissions] == [("a2", False), ("a1", True)]
    admitter.force(admission("a2"))
    third_check = admitter.admit(admission("a3"))
    assert await third_check is None  # the third miss in a row: the connection is dropped
    stream.mode = Mode.ANSWER
    await eventually(first.closed.is_set, "the first connection dropped")
    second = await reconnected(admitter, stream, 2)
    await eventually(lambda: second.answered >= 1, "the forced admissions answered")
    forced = {a.request_id for a in second.admissions if a.forced}
    assert forced == {"a1", "a2"}  # none of them was ever answered: both are counted now


async def test_keep_only_admissions_ride_after_forced_ones_and_are_sent_again_after_a_disconnect(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    """A request no limit applies to is only sent to be kept open (the usage backstop): nobody
    waits for it, it goes after fail-open counts, and an unanswered one is not lost."""
    stream.mode = Mode.SILENT
    first = stream.connections[0]
    admitter.keep(admission("unlimited", "t2"))
    admitter.force(admission("open"))  # the same tick
    await eventually(lambda: len(first.admissions) == 2, "one batch with both")
    assert [(a.request_id, a.forced, a.keep_only) for a in first.batches[0].admissions] == [
        ("open", True, False),
        ("unlimited", False, True),
    ]
    stream.mode = Mode.ANSWER
    first.kill()
    second = await reconnected(admitter, stream, 2)
    await eventually(lambda: second.answered >= 1, "both sent again and answered")
    assert {(a.request_id, a.keep_only) for a in second.admissions} == {("open", False), ("unlimited", True)}
    assert (await verdict_of(admitter, "t2-counted", "t2")).allowed  # keep-only took no slot of t2's


async def test_keep_only_batches_alone_find_a_half_open_connection(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    """With no limits anywhere only keep-only batches flow: unanswered, they too drop a dead
    connection (none of them waits, so nothing else would notice)."""
    first = stream.connections[0]
    stream.mode = Mode.SILENT
    for i in range(MISSES_BEFORE_RECONNECT):
        admitter.keep(admission(f"k{i}", "t2"))
        await asyncio.sleep(TIMEOUT * 1.5)
    stream.mode = Mode.ANSWER
    await eventually(first.closed.is_set, "the dead connection dropped")
    second = await reconnected(admitter, stream, 2)
    await eventually(lambda: len(second.admissions) == MISSES_BEFORE_RECONNECT, "all sent again")


# --- 5. a half-open connection is dropped after MISSES_BEFORE_RECONNECT misses ------------------


async def test_batches_unanswered_in_a_row_drop_the_connection_and_reconnect(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    assert MISSES_BEFORE_RECONNECT == 3
    first = stream.connections[0]
    stream.mode = Mode.SILENT
    for i in range(MISSES_BEFORE_RECONNECT - 1):
        assert await admitter.admit(admission(f"miss-{i}")) is None
    # An answer in between: the misses are no longer in a row.
    stream.mode = Mode.ANSWER
    assert (await verdict_of(admitter, "answered", "t2")).allowed
    stream.mode = Mode.SILENT
    for i in range(MISSES_BEFORE_RECONNECT - 1):
        assert await admitter.admit(admission(f"again-{i}")) is None
    await asyncio.sleep(0.1)
    assert not first.closed.is_set()
    assert len(stream.connections) == 1
    # The third in a row: the connection is presumed dead and opened afresh.
    before = unanswered()
    assert await admitter.admit(admission("third")) is None
    assert unanswered() == before + 1
    stream.mode = Mode.ANSWER
    await eventually(first.closed.is_set, "the first connection dropped by the Admitter")
    second = await reconnected(admitter, stream, 2)
    verdict = await verdict_of(admitter, "back")
    assert verdict.allowed  # answered normally on the new connection
    assert [a.request_id for a in second.admissions] == ["back"]


async def test_a_new_connection_is_not_dropped_for_the_misses_of_the_old_one(
    admitter: Admitter, stream: SlowAdmissionServer
) -> None:
    first = stream.connections[0]
    stream.mode = Mode.SILENT
    for i in range(MISSES_BEFORE_RECONNECT):
        assert await admitter.admit(admission(f"miss-{i}")) is None
    await eventually(first.closed.is_set, "the first connection dropped")
    second = await reconnected(admitter, stream, 2)
    # The new connection is as slow: one miss on it is one miss, not the fourth in a row.
    assert await admitter.admit(admission("slow-again")) is None
    await asyncio.sleep(0.1)
    assert not second.closed.is_set()
    assert len(stream.connections) == 2
    stream.mode = Mode.ANSWER
    assert (await verdict_of(admitter, "back")).allowed


# --- 6. a Check Envoy gives up on, through the whole ext_authz app (both gRPC server modes) ---


@pytest.mark.parametrize("grpc_server", ["aio", "sync"])
async def test_a_check_cancelled_by_envoy_gives_its_late_reservation_back(
    grpc_server: str,
    tmp_path: Any,
    stream: SlowAdmissionServer,
    settle: tuple[RecordingAdmissionServicer, str],
    limiter: RateLimiter,
) -> None:
    """Envoy's ext_authz timeout ends the Check while its admission waits: the request never
    runs, so the reservation that lands afterwards is released, on grpc.aio and on the sync
    server's threads alike; the tenant's one slot is free again."""
    from envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: PLC0415

    from ext_authz.app import build_app  # noqa: PLC0415
    from tests.integration import test_ext_authz_service as svc  # noqa: PLC0415

    policy = svc.FakePolicyServer()
    policy_grpc = grpc.aio.server()
    svc.policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, policy_grpc)
    policy_port = policy_grpc.add_insecure_port("127.0.0.1:0")
    await policy_grpc.start()
    pepper = tmp_path / "pepper"
    pepper.write_bytes(svc.PEPPER)
    pepper.chmod(0o600)
    settings = svc.make_settings(
        tmp_path,
        pepper,
        policy_port,
        grpc_server=grpc_server,
        admission=AdmissionSettings(url=settle[1], stream_url=f"127.0.0.1:{stream.port}", timeout_seconds=5),
    )
    app = await build_app(settings)
    try:
        await asyncio.wait_for(policy.subscribed.wait(), 5)
        snapshot = svc.full_snapshot()
        limit = policy_pb2.Limit(id="C-t1", tenant_id="t1", kind=policy_pb2.Limit.CONCURRENCY, limit=1)
        snapshot.upserts.append(policy_pb2.Resource(limit=limit))
        policy.push(snapshot)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            await svc.wait_health(channel, svc.SERVING)
            await eventually(lambda: app.authorizer.admitting, "the admission stream opened")
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            stream.mode = Mode.HOLD
            bearer = {"authorization": f"Bearer {svc.KEY}"}
            request = svc.check_request({**bearer, "x-request-id": "gone"}, "demo")
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await stub.Check(request, timeout=0.3)  # Envoy's timeout, shorter than the admission's
            assert cancelled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: stream.connections[-1].admissions, "the admission was sent")
            stream.gate.set()  # its verdict (a reservation of the slot) lands now, too late
            await eventually(lambda: settle[0].released("gone"), "the late reservation was released")
            stream.mode = Mode.ANSWER
            again = svc.check_request({**bearer, "x-request-id": "next"}, "demo")
            answer = await stub.Check(again, timeout=5)
            assert answer.status.code == 0, "the tenant's one slot is free again"
    finally:
        await app.stop()
        await policy_grpc.stop(0)
