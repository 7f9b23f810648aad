"""Input validation for admin requests: each failure names the field and the reason."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from urllib.parse import urlsplit

from tessera.errors import InvalidArgumentError

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
BACKEND_KINDS = frozenset({"vllm", "dynamo", "trtllm", "llamacpp", "openai-compatible"})
CALENDAR_MONTH = 0  # window_seconds of a calendar-month (UTC) window, as on the policy stream
WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": CALENDAR_MONTH}
LIMIT_KINDS = frozenset({"requests", "tokens", "spend", "concurrency"})
MAX_WEIGHT_PERCENT = 10_000
MAX_TOKENS_CEILING = 10_000_000
CURRENCY = re.compile(r"^[A-Z]{3}$")
_DURATION = re.compile(r"(\d+)(h|m|s)")
_DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}
MAX_PAGE = 500
DEFAULT_PAGE = 50


def tenant_name(value: str) -> str:
    if not TENANT_NAME.fullmatch(value):
        raise InvalidArgumentError(
            "name", "must be 1-63 lower-case letters, digits or '-', starting with a letter or digit"
        )
    return value


def model_name(value: str, field: str = "name") -> str:
    if not MODEL_NAME.fullmatch(value):
        raise InvalidArgumentError(
            field, "must be 1-128 characters of letters, digits, '.', '_', '/' or '-', starting alphanumeric"
        )
    return value


def model_names(values: list[str], field: str) -> list[str]:
    if len(values) > MAX_LIST_ITEMS:
        raise InvalidArgumentError(field, f"at most {MAX_LIST_ITEMS} entries")
    return sorted({model_name(v, field) for v in values})


def backend_url(value: str) -> str:
    """``scheme://host:port`` with no path (ARCHITECTURE §10)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError("backend.url", f"invalid URL: {exc}") from exc
    if parts.scheme not in {"http", "https"}:
        raise InvalidArgumentError("backend.url", "scheme must be http or https")
    if not parts.hostname:
        raise InvalidArgumentError("backend.url", "a host is required")
    if port is None:
        raise InvalidArgumentError("backend.url", "an explicit port is required (scheme://host:port)")
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidArgumentError(
            "backend.url", "must be scheme://host:port with no path, query or credentials"
        )
    return f"{parts.scheme}://{parts.netloc}"


def backend_kind(value: str) -> str:
    kind = value or "openai-compatible"
    if kind not in BACKEND_KINDS:
        raise InvalidArgumentError("backend.kind", f"must be one of {', '.join(sorted(BACKEND_KINDS))}")
    return kind


def visibility(value: str) -> str:
    vis = value or "public"
    if vis not in {"public", "restricted"}:
        raise InvalidArgumentError("visibility", "must be public or restricted")
    return vis


def duration_seconds(value: str, field: str) -> int:
    """Go-style durations: ``90s``, ``15m``, ``24h``, ``1h30m``."""
    pos, total = 0, 0
    if len(value) > 32:  # noqa: PLR2004 - no sensible duration is longer
        raise InvalidArgumentError(field, "is too long")
    for m in _DURATION.finditer(value):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not value or pos != len(value) or total <= 0:
        raise InvalidArgumentError(field, "must be a positive Go-style duration such as 90s, 15m or 24h")
    return total


def limit_window(kind: str, value: str) -> int:
    """A limit's window in seconds (CALENDAR_MONTH for "month"); a concurrency limit has none."""
    if kind == "concurrency":
        if value:
            raise InvalidArgumentError("window", "a concurrency limit counts requests in flight: no window")
        return 0
    if value not in WINDOWS:
        raise InvalidArgumentError("window", f"must be one of {', '.join(WINDOWS)}")
    return WINDOWS[value]


def window_name(kind: str, seconds: int) -> str:
    if kind == "concurrency":
        return ""
    return next((k for k, v in WINDOWS.items() if v == seconds), f"{seconds}s")


def weight_percent(value: int, field: str) -> int:
    """A token weight in percent: 0 (unset) means 100."""
    if value > MAX_WEIGHT_PERCENT:
        raise InvalidArgumentError(field, f"at most {MAX_WEIGHT_PERCENT} (percent)")
    return value or 100


def limit_value(value: int) -> int:
    if not 0 < value < 2**62:
        raise InvalidArgumentError("limit", "must be a positive integer")
    return value


def max_tokens(value: int, field: str) -> int | None:
    if value > MAX_TOKENS_CEILING:
        raise InvalidArgumentError(field, f"at most {MAX_TOKENS_CEILING}")
    return value or None


MAX_PRICE_MICROS = 9_000_000_000  # per 1M tokens: x at most 10**9 tokens a request fits int64 picos


def micros(value: int, field: str) -> int:
    """A price in micro-units per 1M tokens (at most 9,000 currency units)."""
    if value > MAX_PRICE_MICROS:
        raise InvalidArgumentError(field, f"at most {MAX_PRICE_MICROS} (9,000 currency units per 1M tokens)")
    return value


def currency(value: str) -> str:
    code = value or "USD"
    if not CURRENCY.match(code):
        raise InvalidArgumentError("currency", "must be a 3-letter ISO 4217 code such as USD")
    return code


def effective_time(value: str, now: datetime) -> datetime:
    """RFC 3339, or a date (midnight UTC); "" is ``now``."""
    if not value:
        return now
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        value += "T00:00:00Z"
    return timestamp(value, "effective_time")


def limit_kind(value: str) -> str:
    if value not in LIMIT_KINDS:
        raise InvalidArgumentError("kind", f"must be one of {', '.join(sorted(LIMIT_KINDS))}")
    return value


def fail_mode(value: str) -> bool:
    """True when the limit fails closed."""
    if value not in {"", "open", "closed"}:
        raise InvalidArgumentError("fail_mode", "must be open or closed")
    return value == "closed"


def page(page_size: int, page_token: str) -> tuple[int, str]:
    if page_size < 0:
        raise InvalidArgumentError("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
    if not page_token:
        return size, ""
    try:  # binascii.Error and UnicodeDecodeError are both ValueErrors
        after = base64.b64decode(page_token.encode(), altchars=b"-_", validate=True).decode()
    except ValueError as exc:
        raise InvalidArgumentError("page_token", "is not a token this API returned") from exc
    return size, after


def next_token(items_len: int, size: int, last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode() if items_len == size else ""


PLAN_LIMIT_KINDS = frozenset({"requests", "tokens", "spend", "concurrency"})
PLAN_WINDOWS = tuple(WINDOWS)
PRINCIPAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
PRINCIPAL_KINDS = frozenset({"human", "service_account"})
MAX_LIST_ITEMS = 256


def plan_name(value: str, field: str = "name") -> str:
    if not TENANT_NAME.fullmatch(value):
        raise InvalidArgumentError(field, "must be 1-63 lower-case letters, digits or '-'")
    return value


def plan_limits(items: list[tuple[str, str, int]]) -> list[dict[str, object]]:
    if len(items) > MAX_LIST_ITEMS:
        raise InvalidArgumentError("limits", f"at most {MAX_LIST_ITEMS} entries")
    out: list[dict[str, object]] = []
    seen: set[tuple[str, str]] = set()
    for i, (kind, window, limit) in enumerate(items):
        if kind not in PLAN_LIMIT_KINDS:
            raise InvalidArgumentError(
                f"limits[{i}].kind", f"must be one of {', '.join(sorted(PLAN_LIMIT_KINDS))}"
            )
        if window not in PLAN_WINDOWS:
            raise InvalidArgumentError(f"limits[{i}].window", f"must be one of {', '.join(PLAN_WINDOWS)}")
        if not 0 < limit < 2**62:
            raise InvalidArgumentError(f"limits[{i}].limit", "must be a positive integer")
        if (kind, window) in seen:
            raise InvalidArgumentError(f"limits[{i}]", f"a {kind} limit per {window} is given twice")
        seen.add((kind, window))
        out.append({"kind": kind, "window": window, "limit": limit})
    return out


def principal_name(value: str) -> str:
    if not PRINCIPAL_NAME.fullmatch(value):
        raise InvalidArgumentError(
            "name", "must be 1-128 letters, digits or . _ @ + -, starting alphanumeric"
        )
    return value


def principal_kind(value: str) -> str:
    kind = value or "human"
    if kind not in PRINCIPAL_KINDS:
        raise InvalidArgumentError("kind", "must be human or service_account")
    return kind


def update_mask(paths: list[str], allowed: set[str]) -> set[str]:
    if not paths:
        raise InvalidArgumentError("update_mask", f"name the fields to change: {', '.join(sorted(allowed))}")
    unknown = set(paths) - allowed
    if unknown:
        raise InvalidArgumentError("update_mask", f"cannot change {', '.join(sorted(unknown))}")
    return set(paths)


def timestamp(value: str, field: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise InvalidArgumentError(field, "must carry a UTC offset (e.g. Z)")
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # year 1 or 9999 shifted out of range overflows
        raise InvalidArgumentError(field, "must be an RFC 3339 time such as 2026-01-31T12:00:00Z") from exc


def short_text(value: str, field: str, limit: int = 256) -> str:
    if len(value) > limit:
        raise InvalidArgumentError(field, f"at most {limit} characters")
    return value


# --- backend connection options (docs/backends.md) -------------------------------------------

MAX_CREDENTIAL = 4096
MAX_CA_BUNDLE = 256 * 1024
MAX_TIMEOUT_SECONDS = 7 * 86400
_CREDENTIAL = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")  # visible ASCII, inner spaces
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_HEALTH_PATH = re.compile(r"^/[A-Za-z0-9._~/%!$&'()*+,;=:@?-]{0,255}$")
# Headers Tessera sets or Envoy owns: a credential may not replace them.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "upgrade", "te",
     "x-request-id", "x-tenant-id", "x-key-id", "x-tessera-priority", "x-tessera-backend",
     "x-gateway-inference-fairness-id"}
)  # fmt: skip
NO_HEALTH_CHECK = "none"


def credential(value: str) -> str:
    """A secret for the upstream: printable ASCII (it becomes a header value), no line breaks."""
    if len(value) > MAX_CREDENTIAL or not _CREDENTIAL.fullmatch(value):
        raise InvalidArgumentError(
            "backend.credential", f"must be 1-{MAX_CREDENTIAL} printable ASCII characters, no line breaks"
        )
    return value


def credential_header(value: str) -> str | None:
    """The header that carries the credential; None = authorization (as a Bearer token)."""
    name = value.lower()
    if not name or name == "authorization":
        return None
    if not _HEADER_NAME.fullmatch(name) or name in _RESERVED_HEADERS or name.startswith("x-envoy-"):
        raise InvalidArgumentError(
            "backend.credential_header", "must be a header name Tessera does not set (e.g. api-key)"
        )
    return name


def ca_bundle(value: str) -> str | None:
    """PEM CA certificates (each must parse); "" = the gateway's CA file."""
    if not value:
        return None
    from cryptography import x509  # noqa: PLC0415 - only writes of a CA bundle need it

    if len(value) > MAX_CA_BUNDLE:
        raise InvalidArgumentError("backend.ca_bundle", f"at most {MAX_CA_BUNDLE} bytes")
    try:
        certs = x509.load_pem_x509_certificates(value.encode())
    except ValueError as exc:
        raise InvalidArgumentError("backend.ca_bundle", "must be PEM certificates") from exc
    if not certs:
        raise InvalidArgumentError("backend.ca_bundle", "must be PEM certificates")
    return value


def sni(value: str) -> str | None:
    name = value.lower().rstrip(".")
    if not name:
        return None
    if not _HOSTNAME.fullmatch(name):
        raise InvalidArgumentError("backend.sni", "must be a DNS host name")
    return name


def health_path(value: str) -> str | None:
    """ "" = the kind's default; "none" = no active health check; else an absolute path."""
    if not value:
        return None
    if value != NO_HEALTH_CHECK and not _HEALTH_PATH.fullmatch(value):
        raise InvalidArgumentError(
            "backend.health_path", 'must be an absolute path such as /health, or "none"'
        )
    return value


def timeout_seconds(value: int, field: str) -> int | None:
    if value > MAX_TIMEOUT_SECONDS:
        raise InvalidArgumentError(field, f"at most {MAX_TIMEOUT_SECONDS} seconds")
    return value or None
