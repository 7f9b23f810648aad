"""Billing events as HTTP requests, one builder per sink format (pure: no I/O, no clock).

Every request carries each event's own ``id`` (webhook-id, CloudEvents ``id``, Stripe
``identifier``, Lago ``transaction_id``), so a receiver deduplicates retries by it.

- ``standard-webhooks`` (https://www.standardwebhooks.com): one POST per event, body
  ``{"type", "timestamp", "data"}``, signed ``v1,`` + base64(HMAC-SHA256(key, "id.ts.body"))
  where the key is the base64 after the secret's ``whsec_`` prefix.
- ``cloudevents``: a CloudEvents 1.0 JSON batch (``application/cloudevents-batch+json``), the
  shape OpenMeter ingests at ``POST /api/v1/events``; the secret, if any, is a bearer token.
- ``stripe``: a billing meter event (``POST /v1/billing/meter_events``, form-encoded, one
  event a request, the API key as bearer); ``usage.recorded`` only. ``payload`` maps the
  tenant id to ``stripe_customer_id`` and total tokens to ``value``.
- ``lago``: ``POST /api/v1/events/batch`` (at most 100 events a request); ``usage.recorded``
  only, metric code ``tokens``, the tenant id as ``external_subscription_id``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from control_plane.db.repositories import as_utc
from control_plane.settings import SinkSettings

USAGE = "usage.recorded"
STRIPE_EVENT_NAME = "tessera_tokens"  # the Stripe meter's event_name
LAGO_METRIC_CODE = "tokens"  # the Lago billable metric's code
CLOUDEVENTS_SOURCE = "tessera"

# Kinds each format carries (None = every kind) and the most events one request may hold.
_CARRIES: dict[str, frozenset[str] | None] = {
    "standard-webhooks": None,
    "cloudevents": None,
    "stripe": frozenset({USAGE}),
    "lago": frozenset({USAGE}),
}
_MAX_BATCH = {"standard-webhooks": 1, "cloudevents": 1000, "stripe": 1, "lago": 100}


@dataclass(frozen=True)
class Event:
    """An outbox event, detached from the database."""

    id: str
    kind: str
    tenant_id: str | None
    payload: Mapping[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Request:
    """One POST to a sink's URL, and the events it acknowledges when answered 2xx."""

    event_ids: tuple[str, ...]
    body: bytes
    headers: Mapping[str, str]


def takes(sink: SinkSettings, kind: str) -> bool:
    """Whether ``sink`` is sent events of ``kind`` (its format carries it, and ``kinds`` allows it)."""
    carried = _CARRIES[sink.format]
    return (carried is None or kind in carried) and (not sink.kinds or kind in sink.kinds)


def requests_from_events(sink: SinkSettings, events: Sequence[Event], now: float) -> list[Request]:
    """The requests that deliver ``events`` (all taken by ``sink``) in order; ``now`` (unix
    seconds) is the send time a standard webhook signs."""
    secret = sink.secret.get_secret_value()
    if sink.format == "standard-webhooks":
        key = webhook_key(secret)
        return [standard_webhook(e, key, int(now)) for e in events]
    size = min(sink.batch_size, _MAX_BATCH[sink.format])
    build = {"cloudevents": cloudevents_batch, "stripe": stripe_meter_events, "lago": lago_events}
    return [build[sink.format](events[i : i + size], secret) for i in range(0, len(events), size)]


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64); ValueError if invalid."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("a standard-webhooks secret is 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a standard-webhooks secret may not be empty")
    return key


def webhook_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def standard_webhook(event: Event, key: bytes, timestamp: int) -> Request:
    body = _json({"type": event.kind, "timestamp": _rfc3339(occurred_at(event)), "data": event.payload})
    headers = {
        "content-type": "application/json",
        "webhook-id": event.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhook_signature(key, event.id, timestamp, body),
    }
    return Request((event.id,), body, headers)


def cloudevents_batch(events: Sequence[Event], token: str) -> Request:
    body = [
        {
            "specversion": "1.0",
            "id": e.id,
            "source": CLOUDEVENTS_SOURCE,
            "type": f"tessera.{e.kind}",
            "subject": e.tenant_id,
            "time": _rfc3339(occurred_at(e)),
            "datacontenttype": "application/json",
            "data": e.payload,
        }
        for e in events
    ]
    return _request(events, body, token, "application/cloudevents-batch+json")


def stripe_meter_events(events: Sequence[Event], token: str) -> Request:
    """One Stripe billing meter event (``POST /v1/billing/meter_events``, form-encoded, the
    API key as bearer): Stripe takes one event per request there."""
    (e,) = events
    form = {
        "event_name": STRIPE_EVENT_NAME,
        "identifier": e.id,
        "timestamp": str(int(occurred_at(e).timestamp())),
        "payload[stripe_customer_id]": e.tenant_id or "",
        "payload[value]": str(e.payload.get("total_tokens", 0)),
    }
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return Request((e.id,), urllib.parse.urlencode(form).encode(), headers)


def lago_events(events: Sequence[Event], token: str) -> Request:
    fields = ("model", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens")
    body = {
        "events": [
            {
                "transaction_id": e.id,
                "external_subscription_id": e.tenant_id,
                "code": LAGO_METRIC_CODE,
                "timestamp": int(occurred_at(e).timestamp()),
                "properties": {f: e.payload[f] for f in fields if e.payload.get(f) is not None},
            }
            for e in events
        ]
    }
    return _request(events, body, token, "application/json")


def occurred_at(event: Event) -> datetime:
    """When the usage happened (the payload's ``time``), else when the event was written."""
    raw = event.payload.get("time")
    if isinstance(raw, str):
        try:
            return as_utc(datetime.fromisoformat(raw))
        except ValueError:
            pass
    return as_utc(event.created_at)


def _request(events: Sequence[Event], body: object, token: str, content_type: str) -> Request:
    headers = {"content-type": content_type}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return Request(tuple(e.id for e in events), _json(body), headers)


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")
