"""The billing outbox delivered to real HTTP receivers on 127.0.0.1, from a real database
(SQLite file and the real PostgreSQL server, schema from `alembic upgrade head`). No mocks.

Receivers check what Tessera sends with independent code: the `standardwebhooks` package for
signatures, the `cloudevents` SDK for CloudEvents, and the providers' documented request
examples for Stripe and Lago (tests/fixtures/billing/):
- stripe_meter_event.json: the form fields of Stripe's "create a billing meter event" example
  (POST /v1/billing/meter_events, docs.stripe.com/api/billing/meter-event/create);
- lago_event.json: the example request of POST /api/v1/events/batch
  (getlago.com/docs/api-reference/events/batch).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from prometheus_client import REGISTRY
from sqlalchemy import delete, select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.db.models import OutboxDelivery, OutboxEvent
from control_plane.settings import SinkSettings
from control_plane.usage import formats
from control_plane.usage.delivery import OutboxDeliverer, prune_outbox
from tessera.clock import FakeClock
from tessera.errors import ConfigError
from tests.conftest import free_port

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "billing"
KINDS = ("usage.recorded", "invoice.closed", "budget.threshold")


# --- database, receiver, events ---------------------------------------------------------------


@pytest.fixture
async def sessionmaker(sessionmaker) -> Any:
    """The tier's database, its outbox emptied (the PostgreSQL database is shared by the run)."""
    async with sessionmaker.begin() as s:
        await s.execute(delete(OutboxDelivery))
        await s.execute(delete(OutboxEvent))
    return sessionmaker


Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """A real HTTP server; ``handle`` decides each answer, ``requests`` keeps what arrived."""

    handle: Handler
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        return await self.handle(request, body)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def ok(_request: web.Request, _body: bytes) -> web.StreamResponse:
    return web.json_response({}, status=202)


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[Handler], Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def start(handle: Handler) -> Receiver:
        started.append(await Receiver(handle).start())
        return started[-1]

    yield start
    for r in started:
        await r.stop()


@pytest.fixture
async def deliverers() -> AsyncIterator[Callable[..., OutboxDeliverer]]:
    made: list[OutboxDeliverer] = []

    def make(*args: Any, **kwargs: Any) -> OutboxDeliverer:
        made.append(OutboxDeliverer(*args, **kwargs))
        return made[-1]

    yield make
    for d in made:
        await d.close()


def usage_payload(tenant: str, n: int) -> dict[str, Any]:
    return {
        "node": "envoy-0",
        "request_id": str(uuid.uuid4()),
        "time": (datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=n)).isoformat().replace("+00:00", "Z"),
        "tenant_id": tenant,
        "key_id": "k1",
        "model": "llama-3-8b",
        "model_requested": "llama",
        "status": 200,
        "prompt_tokens": 10 + n,
        "completion_tokens": 20,
        "cached_tokens": 0,
        "total_tokens": 30 + n,
        "usage_estimated": False,
        "streamed": n % 2 == 0,
        "cost_micros": 42,
        "currency": "USD",
        "unpriced": False,
    }


def payload_for(kind: str, tenant: str, n: int) -> dict[str, Any]:
    if kind == "usage.recorded":
        return usage_payload(tenant, n)
    if kind == "invoice.closed":
        return {
            "invoice_id": f"inv{n}",
            "tenant_id": tenant,
            "currency": "USD",
            "total_micros": n,
            "lines": [],
        }
    return {"tenant_id": tenant, "limit_id": "l1", "threshold_percent": 80, "spent_micros": n}


async def add_events(sm: Any, kinds: list[str]) -> list[OutboxEvent]:
    """Write outbox events in this order (their seq order); returns them."""
    rows = [
        OutboxEvent(
            id=f"{kind}:{uuid.uuid4().hex}",
            kind=kind,
            tenant_id=f"t{n % 3}",
            payload=payload_for(kind, f"t{n % 3}", n),
        )
        for n, kind in enumerate(kinds)
    ]
    async with sm.begin() as s:
        for row in rows:  # one flush each: seq follows list order
            s.add(row)
            await s.flush()
    return rows


def sink_name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def metric(name: str, sink: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"sink": sink})


async def deliver_until_drained(d: OutboxDeliverer, sinks: list[str], passes: int = 400) -> int:
    for n in range(passes):
        await d.deliver_once()
        if all(metric("tessera_outbox_depth", s) == 0 for s in sinks):
            return n + 1
        await asyncio.sleep(0.02)
    pytest.fail("the outbox did not drain")


def whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


# --- standard webhooks ------------------------------------------------------------------------


async def test_flaky_webhook_receiver_gets_every_event_once_after_dedup(sessionmaker, receivers, deliverers):
    secret = whsec()
    verifier = Webhook(secret)
    rng = random.Random(7)  # noqa: S311 - a reproducible failure pattern, not a secret
    acked: list[str] = []
    bad_signatures: list[str] = []

    async def flaky(request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            bad_signatures.append(str(exc))
        roll = rng.random()
        if roll < 0.15:  # processed, but the answer says it failed: a retry will duplicate it
            return web.Response(status=500)
        if roll < 0.30:  # the connection drops before any answer
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        acked.append(request.headers["webhook-id"])
        return web.Response(status=204)

    receiver = await receivers(flaky)
    events = await add_events(sessionmaker, [KINDS[n % 3] for n in range(200)])
    name = sink_name()
    sink = SinkSettings(name=name, url=f"{receiver.url}/hook", secret=secret, batch_size=50)
    d = deliverers(sessionmaker, [sink], max_backoff=0.05)

    await deliver_until_drained(d, [name])

    assert bad_signatures == []
    assert sorted(set(acked)) == sorted(e.id for e in events)
    assert len(acked) == len(set(acked))  # a 2xx is final: an acknowledged event is not resent
    received_ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert len(received_ids) > len(events)  # failures happened and were retried
    assert (metric("tessera_outbox_delivery_failures_total", name) or 0) > 0
    assert metric("tessera_outbox_delivered_total", name) == len(events)
    by_id = {e.id: e for e in events}
    for _, headers, body in receiver.requests:
        message = json.loads(body)
        event = by_id[headers["webhook-id"]]
        assert message["type"] == event.kind
        assert message["data"] == event.payload
        assert headers["Content-Type"] == "application/json"
    async with sessionmaker() as s:
        rows = (await s.scalars(select(OutboxDelivery).where(OutboxDelivery.sink == name))).all()
    assert len(rows) == len(events)
    assert all(r.delivered_at is not None for r in rows)


def test_webhook_signature_follows_the_spec_and_rejects_tampering_and_replay():
    # The Standard Webhooks reference libraries' test vector.
    key = formats.webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = formats.webhook_signature(
        key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

    secret = whsec()
    event = formats.Event(
        "usage.recorded:abc", "usage.recorded", "t1", usage_payload("t1", 1), datetime.now(UTC)
    )
    now = int(time.time())
    request = formats.standard_webhook(event, formats.webhook_key(secret), now)
    verifier = Webhook(secret)
    assert verifier.verify(request.body, dict(request.headers))["data"] == event.payload

    tampered = request.body.replace(b'"total_tokens":31', b'"total_tokens":1')
    assert tampered != request.body
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, dict(request.headers))
    stale = formats.standard_webhook(event, formats.webhook_key(secret), now - 600)  # tolerance: 5 min
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(stale.body, dict(stale.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(whsec()).verify(request.body, dict(request.headers))


def test_the_same_event_always_yields_the_same_ids_and_bodies():
    event = formats.Event(
        "usage.recorded:x", "usage.recorded", "t1", usage_payload("t1", 2), datetime.now(UTC)
    )
    for fmt in ("cloudevents", "stripe", "lago"):
        sink = SinkSettings(name="s", url="http://127.0.0.1:1/", format=fmt, secret="tok")
        first, again = (formats.requests_from_events(sink, [event], t) for t in (1.0, 99.0))
        assert first == again
        assert first[0].event_ids == (event.id,)
    hook = SinkSettings(name="s", url="http://127.0.0.1:1/", secret=whsec())
    first, again = (formats.requests_from_events(hook, [event], t) for t in (1.0, 99.0))
    assert first[0].body == again[0].body
    assert first[0].headers["webhook-id"] == again[0].headers["webhook-id"] == event.id


@pytest.mark.parametrize("secret", ["", "whsec_not base64!", "whsec_"])
def test_a_standard_webhooks_sink_needs_a_whsec_secret(secret):
    sink = SinkSettings(name="hook", url="http://127.0.0.1:1/", secret=secret)
    with pytest.raises(ConfigError, match="hook"):
        OutboxDeliverer(None, [sink])


# --- CloudEvents, Stripe, Lago ----------------------------------------------------------------


async def test_cloudevents_batches_parse_with_the_sdk(sessionmaker, receivers, deliverers):
    receiver = await receivers(ok)
    events = await add_events(sessionmaker, [KINDS[n % 3] for n in range(25)])
    name = sink_name()
    sink = SinkSettings(
        name=name, url=f"{receiver.url}/api/v1/events", format="cloudevents", secret="om-token", batch_size=10
    )
    d = deliverers(sessionmaker, [sink])

    await deliver_until_drained(d, [name])

    assert [len(json.loads(body)) for _, _, body in receiver.requests] == [10, 10, 5]
    parsed = []
    for path, headers, body in receiver.requests:
        assert path == "/api/v1/events"
        assert headers["Content-Type"] == "application/cloudevents-batch+json"
        assert headers["Authorization"] == "Bearer om-token"
        for item in json.loads(body):
            message = HTTPMessage(
                headers={"content-type": "application/cloudevents+json"}, body=json.dumps(item).encode()
            )
            parsed.append(from_http(message, JSONFormat()))
    assert [ce.get_id() for ce in parsed] == [e.id for e in events]  # seq order
    for ce, event in zip(parsed, events, strict=True):
        assert ce.get_specversion() == "1.0"
        assert ce.get_source() == "tessera"
        assert ce.get_type() == f"tessera.{event.kind}"
        assert ce.get_subject() == event.tenant_id
        assert ce.get_datacontenttype() == "application/json"
        assert ce.get_data() == event.payload
        assert ce.get_time() is not None
    usage = next(ce for ce in parsed if ce.get_type() == "tessera.usage.recorded")
    assert usage.get_time() == datetime.fromisoformat(usage.get_data()["time"])


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys, nesting and scalar types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


async def test_stripe_and_lago_get_usage_only_in_their_documented_shapes(sessionmaker, receivers, deliverers):
    receiver = await receivers(ok)
    events = await add_events(sessionmaker, [KINDS[n % 3] for n in range(12)])
    usage = [e for e in events if e.kind == "usage.recorded"]
    stripe, lago = sink_name(), sink_name()
    sinks = [
        SinkSettings(
            name=stripe,
            url=f"{receiver.url}/v1/billing/meter_events",
            format="stripe",
            secret="sk_test_x",
        ),
        SinkSettings(name=lago, url=f"{receiver.url}/api/v1/events/batch", format="lago", secret="lago_key"),
    ]
    d = deliverers(sessionmaker, sinks)

    await deliver_until_drained(d, [stripe, lago])

    to_stripe = [(h, b) for path, h, b in receiver.requests if path == "/v1/billing/meter_events"]
    assert len(to_stripe) == len(usage)  # one request per usage event, nothing for the other kinds
    sent = {
        path: (headers, json.loads(body))
        for path, headers, body in receiver.requests
        if path != "/v1/billing/meter_events"
    }
    assert len(sent) == 1  # one Lago batch

    documented = json.loads((FIXTURES / "stripe_meter_event.json").read_text())
    for (headers, body), event in zip(to_stripe, usage, strict=True):
        assert headers["Authorization"] == "Bearer sk_test_x"
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = {k: v for k, (v,) in urllib.parse.parse_qs(body.decode(), strict_parsing=True).items()}
        assert set(form) == set(documented)  # the documented fields, all strings
        assert form["event_name"] == "tessera_tokens"
        assert form["identifier"] == event.id
        assert form["payload[stripe_customer_id]"] == event.tenant_id
        assert form["payload[value]"] == str(event.payload["total_tokens"])
        assert int(form["timestamp"]) == int(datetime.fromisoformat(event.payload["time"]).timestamp())

    headers, body = sent["/api/v1/events/batch"]
    assert headers["Authorization"] == "Bearer lago_key"
    documented = json.loads((FIXTURES / "lago_event.json").read_text())
    properties = [e.pop("properties") for e in body["events"]]
    for e in documented["events"]:
        e.pop("properties")
    assert shape(body) == shape(documented)
    assert [e["transaction_id"] for e in body["events"]] == [e.id for e in usage]
    for sent_event, props, event in zip(body["events"], properties, usage, strict=True):
        assert sent_event["external_subscription_id"] == event.tenant_id
        assert sent_event["code"] == "tokens"
        assert sent_event["timestamp"] == int(datetime.fromisoformat(event.payload["time"]).timestamp())
        assert props == {
            k: event.payload[k]
            for k in ("model", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens")
        }

    async with sessionmaker() as s:
        rows = (await s.scalars(select(OutboxDelivery).where(OutboxDelivery.sink.in_([stripe, lago])))).all()
    assert len(rows) == 2 * len(events)  # the other kinds count as delivered, with no attempt
    assert {r.attempts for r in rows if not r.event_id.startswith("usage.")} == {0}
    assert metric("tessera_outbox_delivered_total", stripe) == len(usage)


async def test_sink_kinds_narrow_what_it_is_sent(sessionmaker, receivers, deliverers):
    receiver = await receivers(ok)
    events = await add_events(sessionmaker, list(KINDS) * 2)
    name = sink_name()
    sink = SinkSettings(name=name, url=receiver.url, format="cloudevents", kinds=("invoice.closed",))
    d = deliverers(sessionmaker, [sink])

    await deliver_until_drained(d, [name])

    (_, headers, body), *_ = receiver.requests
    assert [ce["id"] for ce in json.loads(body)] == [e.id for e in events if e.kind == "invoice.closed"]
    assert "Authorization" not in headers  # no secret, no bearer


# --- backoff, errors, metrics -----------------------------------------------------------------


async def test_a_failed_event_waits_for_its_backoff_and_its_error_hides_the_secret(
    sessionmaker, receivers, deliverers
):
    token = "sk_live_" + secrets.token_hex(12)
    healthy = False

    async def echo_secret(request: web.Request, _body: bytes) -> web.StreamResponse:
        # A hostile receiver: its error answer repeats the credential it was sent.
        if healthy:
            return web.Response(status=200)
        return web.Response(
            status=503, reason=request.headers["Authorization"], text=request.headers["Authorization"]
        )

    receiver = await receivers(echo_secret)
    clock = FakeClock(time.time())
    [event] = await add_events(sessionmaker, ["usage.recorded"])
    name = sink_name()
    sink = SinkSettings(name=name, url=receiver.url, format="lago", secret=token)
    d = deliverers(sessionmaker, [sink], clock=clock)

    async def row() -> OutboxDelivery:
        async with sessionmaker() as s:
            found = await s.get(OutboxDelivery, (event.id, name))
        assert found is not None
        return found

    with capture_logs() as logs:
        assert await d.deliver_once() == 0
    assert len(receiver.requests) == 1
    first = await row()
    assert first.attempts == 1
    assert first.delivered_at is None
    assert first.last_error is not None
    assert first.last_error.startswith("HTTP 503")
    assert token not in first.last_error
    wait = first.next_attempt_at.replace(tzinfo=UTC).timestamp() - clock.now()
    assert 0.5 - 1e-3 <= wait <= 1.0 + 1e-3  # 1 s, with jitter
    assert token not in repr(logs)
    assert any(entry["event"] == "outbox_delivery_failed" for entry in logs)
    assert metric("tessera_outbox_delivery_failures_total", name) == 1

    await d.deliver_once()
    clock.advance(0.49)
    await d.deliver_once()
    assert len(receiver.requests) == 1  # not before next_attempt_at

    clock.advance(0.52)
    await d.deliver_once()
    assert len(receiver.requests) == 2
    second = await row()
    assert second.attempts == 2
    wait = second.next_attempt_at.replace(tzinfo=UTC).timestamp() - clock.now()
    assert 1.0 - 1e-3 <= wait <= 2.0 + 1e-3  # doubled

    healthy = True
    clock.advance(2.01)
    assert await d.deliver_once() == 1
    done = await row()
    assert done.attempts == 3
    assert done.delivered_at is not None


async def test_an_unreachable_sink_records_the_error_and_caps_the_backoff(sessionmaker, deliverers):
    secret = whsec()
    clock = FakeClock(time.time())
    [event] = await add_events(sessionmaker, ["invoice.closed"])
    name = sink_name()
    sink = SinkSettings(name=name, url=f"http://127.0.0.1:{free_port()}/hook", secret=secret)
    d = deliverers(sessionmaker, [sink], clock=clock, max_backoff=3.0)

    for _ in range(6):
        await d.deliver_once()
        clock.advance(3.0)

    async with sessionmaker() as s:
        found = await s.get(OutboxDelivery, (event.id, name))
    assert found is not None
    assert found.attempts == 6
    assert found.last_error is not None
    assert found.last_error.startswith("ClientConnectorError")
    assert secret.removeprefix("whsec_") not in found.last_error
    assert found.next_attempt_at.replace(tzinfo=UTC).timestamp() - (clock.now() - 3.0) <= 3.0 + 1e-3


async def test_outbox_depth_drops_to_zero_once_everything_is_delivered(sessionmaker, receivers, deliverers):
    up = False

    async def sometimes(_request: web.Request, _body: bytes) -> web.StreamResponse:
        return web.Response(status=200 if up else 502)

    receiver = await receivers(sometimes)
    clock = FakeClock(time.time())
    await add_events(sessionmaker, ["usage.recorded", "invoice.closed", "budget.threshold", "usage.recorded"])
    name = sink_name()
    d = deliverers(
        sessionmaker, [SinkSettings(name=name, url=receiver.url, format="cloudevents")], clock=clock
    )

    clock.advance(30)
    await d.deliver_once()
    assert metric("tessera_outbox_depth", name) == 4
    assert (metric("tessera_outbox_oldest_age_seconds", name) or 0) >= 29

    up = True
    clock.advance(2)
    assert await d.deliver_once() == 4
    assert metric("tessera_outbox_depth", name) == 0
    assert metric("tessera_outbox_oldest_age_seconds", name) == 0
    assert metric("tessera_outbox_delivered_total", name) == 4


async def test_run_forever_delivers_until_cancelled(sessionmaker, receivers, deliverers):
    receiver = await receivers(ok)
    events = await add_events(sessionmaker, ["usage.recorded"] * 5)
    name = sink_name()
    d = deliverers(
        sessionmaker, [SinkSettings(name=name, url=receiver.url, format="cloudevents", batch_size=2)]
    )

    task = asyncio.create_task(d.run_forever(0.01))
    for _ in range(500):
        if metric("tessera_outbox_depth", name) == 0:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert sorted(ce["id"] for _, _, b in receiver.requests for ce in json.loads(b)) == sorted(
        e.id for e in events
    )


async def test_replicas_on_one_database_deliver_each_event_to_each_sink_once(
    sessionmaker, db_url, receivers, deliverers
):
    """Three control-plane replicas (two engines) deliver one outbox at once, interleaved at every
    await: each event reaches the sink once, not once per replica."""
    got: list[str] = []

    async def slow(request: web.Request, _body: bytes) -> web.StreamResponse:
        await asyncio.sleep(0.01)  # the replicas' batches overlap
        got.append(request.headers["webhook-id"])
        return web.Response(status=204)

    receiver = await receivers(slow)
    events = await add_events(sessionmaker, [KINDS[n % 3] for n in range(240)])
    name = sink_name()
    sink = SinkSettings(name=name, url=f"{receiver.url}/hook", secret=whsec(), batch_size=20)
    other = make_engine(db_url)
    try:
        replicas = [deliverers(sm, [sink]) for sm in (sessionmaker, make_sessionmaker(other), sessionmaker)]
        await asyncio.gather(*(deliver_until_drained(r, [name]) for r in replicas))
    finally:
        await other.dispose()
    assert sorted(got) == sorted(e.id for e in events)


async def test_a_replica_killed_mid_batch_leaves_it_to_another_after_its_lease(
    sessionmaker, receivers, deliverers
):
    hold = asyncio.Event()
    arrived = asyncio.Event()

    async def stuck_then_ok(request: web.Request, _body: bytes) -> web.StreamResponse:
        arrived.set()
        await hold.wait()  # the first replica's request gets no answer before it dies
        return web.Response(status=204)

    receiver = await receivers(stuck_then_ok)
    events = await add_events(sessionmaker, ["usage.recorded"] * 5)
    name = sink_name()
    sink = SinkSettings(name=name, url=f"{receiver.url}/hook", secret=whsec(), batch_size=10)
    clock = FakeClock(start=time.time())
    first, second = (deliverers(sessionmaker, [sink], clock=clock, timeout=5.0, lease=30.0) for _ in range(2))
    dying = asyncio.create_task(first.deliver_once())
    await asyncio.wait_for(arrived.wait(), 10)
    dying.cancel()  # killed with its batch claimed and in flight
    with pytest.raises(asyncio.CancelledError):
        await dying
    hold.set()
    assert await second.deliver_once() == 0  # still leased to the dead replica
    clock.advance(36)  # past the lease: 35 s (a request timeout per 16 events, plus 30 s)
    assert await second.deliver_once() == len(events)
    async with sessionmaker() as s:
        rows = (await s.scalars(select(OutboxDelivery).where(OutboxDelivery.sink == name))).all()
    assert sorted(r.event_id for r in rows if r.delivered_at is not None) == sorted(e.id for e in events)


async def test_only_events_every_sink_acknowledged_are_pruned(sessionmaker, receivers, deliverers):
    receiver = await receivers(ok)
    events = await add_events(sessionmaker, ["usage.recorded"] * 4)
    delivered, never = sink_name(), sink_name()
    sink = SinkSettings(name=delivered, url=f"{receiver.url}/hook", secret=whsec())
    d = deliverers(sessionmaker, [sink])
    await deliver_until_drained(d, [delivered])
    later = datetime.now(UTC) + timedelta(days=1)  # everything is "old" by then
    async with sessionmaker.begin() as s:
        # A second sink that has acknowledged nothing keeps every event.
        assert await prune_outbox(s, [delivered, never], later) == 0
        assert await prune_outbox(s, [delivered], datetime.now(UTC) - timedelta(days=1)) == 0  # too new
        assert await prune_outbox(s, [delivered], later) == len(events)
    async with sessionmaker() as s:
        left = (
            await s.scalars(select(OutboxEvent.id).where(OutboxEvent.id.in_([e.id for e in events])))
        ).all()
        gone = (await s.scalars(select(OutboxDelivery).where(OutboxDelivery.sink == delivered))).all()
    assert (left, gone) == ([], [])
