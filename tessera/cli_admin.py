"""The admin subcommands of ``tessera``: one declarative :class:`Command` per admin RPC.

A command names its arguments, a function building the request message from the parsed
flags, the RPC it calls and a table renderer for the response. :func:`build_request` turns a
parsed namespace into ``(rpc_name, request)`` without any network, so request building is
unit-testable; :func:`fetch` makes the call, following pages for list commands.

List rule (every ``... list`` command, table and JSON output alike): the CLI follows
``next_page_token`` with ``page_size`` 500 and collects every item. Only ``audit list`` stops
early, at ``--limit`` rows (default 100), and then asks for no more rows than it still needs.
``--output json`` prints ONE document of the RPC's response type holding all collected items,
``{"items": [...], "next_page_token": ""}``; the token is empty unless ``--limit`` ended the
walk, and then it resumes exactly after the last row printed.

Nothing here imports protobuf or gRPC at module level: the generated messages are loaded when
a request is built, so ``--help`` and ``tessera up`` stay light.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

PAGE_SIZE = 500
AUDIT_DEFAULT_LIMIT = 100
LIMIT_KINDS = ("requests", "tokens", "spend", "concurrency")
LIMIT_WINDOWS = ("second", "minute", "hour", "day", "month")
PLAN_LIMIT_KINDS = LIMIT_KINDS
PLAN_LIMIT_WINDOWS = LIMIT_WINDOWS
ROLES = ("platform-admin", "tenant-admin", "tenant-viewer")
PRINCIPAL_KINDS = ("human", "service_account")
BACKEND_KINDS = ("openai-compatible", "vllm", "dynamo", "trtllm", "llamacpp")
_DURATION = re.compile(r"^(\d+[hms])+$")

Rows = list[list[str]]


class UsageError(Exception):
    """Flags that parse but do not make a request (reported like an argparse error, exit 2)."""


# --- flag value types (an ArgumentTypeError becomes "argument --flag: message", exit 2) -------


def duration(value: str) -> str:
    if not _DURATION.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Go-style duration such as 90s, 15m, 24h, 1h30m")
    return value


def timestamp(value: str) -> str:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        msg = f"{value!r} is not an RFC 3339 time with a zone, e.g. 2030-01-02T03:04:05Z"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a non-negative integer")
    return int(value)


def plan_limit(value: str) -> tuple[str, str, int]:
    """``KIND:WINDOW:N``, e.g. ``requests:minute:600``."""
    parts = value.split(":")
    kind, window, n = parts if len(parts) == 3 else ("", "", "")  # noqa: PLR2004 - KIND:WINDOW:N
    if kind not in PLAN_LIMIT_KINDS or window not in PLAN_LIMIT_WINDOWS or not n.isdigit() or int(n) < 1:
        msg = (
            f"{value!r} is not KIND:WINDOW:N (KIND one of {', '.join(PLAN_LIMIT_KINDS)}; "
            f"WINDOW one of {', '.join(PLAN_LIMIT_WINDOWS)}; N a positive integer)"
        )
        raise argparse.ArgumentTypeError(msg)
    return kind, window, int(n)


def role_binding(value: str) -> tuple[str, str]:
    """``ROLE[:TENANT]``: tenant roles need a tenant, platform-admin takes none."""
    role, _, tenant = value.partition(":")
    try:
        return _binding(role, tenant)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from exc


def _binding(role: str, tenant: str) -> tuple[str, str]:
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}")
    if (role == "platform-admin") == bool(tenant):
        raise UsageError("platform-admin takes no tenant" if tenant else f"{role} needs a tenant")
    return role, tenant


# --- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arg:
    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OneOf:
    """Mutually exclusive flags."""

    args: tuple[Arg, ...]


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


@dataclass(frozen=True, slots=True)
class Command:
    path: tuple[str, ...]  # ("tenants", "create") or ("whoami",)
    help: str
    rpc: str
    build: Callable[[argparse.Namespace, Any], Any]  # (args, admin_pb2) -> request message
    render: Callable[[Any], Rows]  # response -> table rows
    args: tuple[Arg | OneOf, ...] = ()
    paged: bool = False  # a list RPC: follow next_page_token (see the module docstring)
    note: Callable[[Any], str] | None = None  # a remark for stderr about the response, "" = none


# --- builders that need more than one line ----------------------------------------------------


def _mask(fields: dict[str, bool]) -> list[str]:
    mask = [name for name, given in fields.items() if given]
    if not mask:
        raise UsageError("nothing to update: give at least one of the optional flags")
    return mask


def _update_tenant(a: argparse.Namespace, pb: Any) -> Any:
    mask = _mask({"plan": a.plan is not None, "allowed_models": bool(a.allowed_models or a.clear_models)})
    return pb.UpdateTenantRequest(
        tenant=a.tenant, update_mask=mask, plan=a.plan or "", allowed_models=a.allowed_models or []
    )


def _plan_limits(pb: Any, limits: Sequence[tuple[str, str, int]] | None) -> list[Any]:
    return [pb.PlanLimit(kind=k, window=w, limit=n) for k, w, n in limits or ()]


def _update_plan(a: argparse.Namespace, pb: Any) -> Any:
    mask = _mask({"priority": a.priority is not None, "limits": bool(a.limits or a.clear_limits)})
    return pb.UpdatePlanRequest(
        plan=a.plan, update_mask=mask, priority=a.priority or 0, limits=_plan_limits(pb, a.limits)
    )


def _binding_request(message: str) -> Callable[[argparse.Namespace, Any], Any]:
    def build(a: argparse.Namespace, pb: Any) -> Any:
        role, tenant = _binding(a.role, a.tenant)
        return getattr(pb, message)(
            principal=a.principal, binding=pb.RoleBinding(role=role, tenant_id=tenant)
        )

    return build


def _create_key(a: argparse.Namespace, pb: Any) -> Any:
    return pb.CreateApiKeyRequest(
        tenant=a.tenant,
        name=a.name,
        ttl=a.ttl or "",
        expire_time=a.expires or "",
        allowed_models=a.allowed_models,
    )


def _read_text(path: str | None, what: str) -> str:
    """A file's text ("-" = standard input), stripped of surrounding whitespace; secrets are read
    from files, never taken on the command line (where ps and shell history keep them)."""
    if path is None:
        return ""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} from {path}: {exc.strerror}") from exc
    return text.strip()


def _backend_pb(a: argparse.Namespace, pb: Any) -> Any:
    return pb.Backend(
        url=a.backend,
        kind=a.kind,
        weight=a.weight,
        priority=a.priority,
        max_concurrency=a.max_concurrency,
        credential=_read_text(a.credential_file, "the credential"),
        credential_header=a.credential_header or "",
        ca_bundle=_read_text(a.ca_bundle, "the CA bundle"),
        sni=a.sni or "",
        health_path=a.health_path or "",
        timeout_seconds=a.timeout or 0,
        idle_timeout_seconds=a.idle_timeout or 0,
    )


def _add_model(a: argparse.Namespace, pb: Any) -> Any:
    return pb.AddModelRequest(
        name=a.name, backend=_backend_pb(a, pb), visibility=a.visibility, replace_backends=a.replace
    )


def _create_limit(a: argparse.Namespace, pb: Any) -> Any:
    if (a.kind == "concurrency") == bool(a.window):
        raise UsageError("--window is required, except for --kind concurrency (which has none)")
    return pb.CreateLimitRequest(
        tenant=a.tenant,
        key_id=a.key,
        model=a.model,
        kind=a.kind,
        window=a.window,
        limit=a.limit,
        shadow=a.shadow,
        fail_mode=a.fail,
        prompt_weight=a.prompt_weight,
        completion_weight=a.completion_weight,
    )


def _update_limit(a: argparse.Namespace, pb: Any) -> Any:
    mask = _mask(
        {"limit": a.limit is not None, "shadow": a.shadow is not None, "fail_mode": a.fail is not None}
    )
    return pb.UpdateLimitRequest(
        id=a.id, update_mask=mask, limit=a.limit or 0, shadow=bool(a.shadow), fail_mode=a.fail or ""
    )


def _update_backend(a: argparse.Namespace, pb: Any) -> Any:
    mask = _mask(
        {
            "weight": a.weight is not None,
            "priority": a.priority is not None,
            "kind": a.kind is not None,
            "max_concurrency": a.max_concurrency is not None,
            "credential": a.credential_file is not None or a.clear_credential,
            "credential_header": a.credential_header is not None,
            "ca_bundle": a.ca_bundle is not None,
            "sni": a.sni is not None,
            "health_path": a.health_path is not None,
            "timeout_seconds": a.timeout is not None,
            "idle_timeout_seconds": a.idle_timeout is not None,
        }
    )
    return pb.UpdateBackendRequest(
        name=a.name,
        url=a.backend,
        update_mask=mask,
        weight=a.weight or 0,
        priority=a.priority or 0,
        kind=a.kind or "",
        max_concurrency=a.max_concurrency or 0,
        credential=_read_text(a.credential_file, "the credential"),
        credential_header=a.credential_header or "",
        ca_bundle=_read_text(a.ca_bundle or None, "the CA bundle"),
        sni=a.sni or "",
        health_path=a.health_path or "",
        timeout_seconds=a.timeout or 0,
        idle_timeout_seconds=a.idle_timeout or 0,
    )


def _update_model(a: argparse.Namespace, pb: Any) -> Any:
    mask = _mask(
        {
            "default_max_tokens": a.default_max_tokens is not None,
            "max_max_tokens": a.max_tokens is not None,
            "aliases": a.aliases is not None or a.clear_aliases,
            "realtime": a.realtime is not None,
            "visibility": a.visibility is not None,
        }
    )
    return pb.UpdateModelRequest(
        name=a.name,
        update_mask=mask,
        default_max_tokens=a.default_max_tokens or 0,
        max_max_tokens=a.max_tokens or 0,
        aliases=a.aliases or [],
        realtime=a.realtime == "on",
        visibility=a.visibility or "",
    )


def _price_model(a: argparse.Namespace, pb: Any) -> Any:
    return pb.SetModelPriceRequest(
        name=a.name,
        input_micros=a.input_price,
        output_micros=a.output_price,
        **({} if a.cached_price is None else {"cached_micros": a.cached_price}),
        currency=a.currency,
        effective_time=a.effective or "",
    )


def _list_audit(a: argparse.Namespace, pb: Any) -> Any:
    return pb.ListAuditEventsRequest(
        tenant=a.tenant,
        actor=a.actor,
        action=a.action_filter,
        start_time=a.since or "",
        end_time=a.until or "",
        page_size=min(PAGE_SIZE, a.max_items),
    )


# --- renderers --------------------------------------------------------------------------------


def _or(value: str, empty: str = "-") -> str:
    return value or empty


def _fields(pairs: Sequence[tuple[str, str]]) -> Rows:
    """A two-column FIELD VALUE table, for responses that carry a secret."""
    return [[name, value] for name, value in pairs]


def _tenants(items: Sequence[Any], *, revoked: int | None = None) -> Rows:
    head = ["ID", "NAME", "STATUS", "PLAN", "MODELS"] + ([] if revoked is None else ["REVOKED KEYS"])
    extra = [] if revoked is None else [str(revoked)]
    rows = [
        [t.id, t.name, t.status, _or(t.plan), _or(", ".join(t.allowed_models), "(public)"), *extra]
        for t in items
    ]
    return [head, *rows]


def _plans(items: Sequence[Any]) -> Rows:
    def limits(p: Any) -> str:
        return _or(", ".join(f"{x.kind}:{x.window}:{x.limit}" for x in p.limits))

    return [["NAME", "PRIORITY", "LIMITS"], *[[p.name, str(p.priority), limits(p)] for p in items]]


def _principals(items: Sequence[Any]) -> Rows:
    def bindings(p: Any) -> str:
        return _or(", ".join(b.role + (f":{b.tenant_id}" if b.tenant_id else "") for b in p.bindings))

    return [
        ["ID", "NAME", "KIND", "STATUS", "ROLES", "KEY PREFIX"],
        *[[p.id, p.name, p.kind, p.status, bindings(p), _or(p.key_prefix)] for p in items],
    ]


def _keys(items: Sequence[Any]) -> Rows:
    return [
        ["ID", "TENANT", "NAME", "PREFIX", "STATUS", "EXPIRES"],
        *[[k.id, k.tenant_id, _or(k.name), k.prefix, k.status, _or(k.expire_time, "never")] for k in items],
    ]


def _created_principal(r: Any) -> Rows:
    return [*_principals([r.principal]), [], *_fields([("ADMIN KEY (shown once)", r.key)])]


def _created_key(r: Any) -> Rows:
    return _fields(
        [
            ("ID", r.id),
            ("TENANT", r.api_key.tenant_id),
            ("EXPIRES", _or(r.api_key.expire_time, "never")),
            ("KEY (shown once)", r.key),
        ]
    )


def _rotated_key(r: Any) -> Rows:
    return _fields(
        [
            ("ID", r.id),
            ("PREFIX", r.prefix),
            ("NEW KEY (shown once)", _or(r.key, "(not shown: this rotation id was already used)")),
            ("OLD KEY WORKS UNTIL", _or(r.grace_until, "(no grace: the old key no longer works)")),
        ]
    )


def _rotation_note(r: Any) -> str:
    if r.key:
        return ""
    return (
        f"rotation id already used: key {r.id} was rotated before (prefix {r.prefix}); "
        "the secret was shown only then"
    )


def _audit(items: Sequence[Any]) -> Rows:
    return [
        ["TIME", "ACTOR", "ACTION", "TARGET", "TENANT"],
        *[
            [
                e.time,
                _or(e.actor_name or e.actor),
                e.action,
                f"{e.target_type}/{e.target_id}",
                _or(e.tenant_id),
            ]
            for e in items
        ],
    ]


_CREDENTIAL_HELP = 'file holding a secret Envoy sends upstream ("-" = stdin); stored encrypted, never shown'
_CONNECTION_ARGS = (
    arg(
        "--credential-header",
        metavar="HEADER",
        help="header for the credential (default authorization: Bearer)",
    ),
    arg("--ca-bundle", metavar="FILE", help="https: PEM CA certificates to trust (default the gateway's)"),
    arg("--sni", metavar="HOST", help="https: server name sent and checked (default the URL's host)"),
    arg("--health-path", metavar="PATH", help='active health check path (default by kind; "none" = off)'),
    arg("--timeout", type=count, metavar="SECONDS", help="a whole request (default 0: no limit)"),
    arg("--idle-timeout", type=count, metavar="SECONDS", help="no byte either way (default 300)"),
)
_BACKEND_ARGS = (
    arg("--backend", required=True, metavar="URL", help="scheme://host:port"),
    arg("--kind", choices=BACKEND_KINDS, default="openai-compatible", help="the server's API dialect"),
    arg("--weight", type=count, default=1, help="share of traffic among backends of one priority"),
    arg("--priority", type=count, default=0, help="0 first; higher = fallback"),
    arg("--max-concurrency", type=count, default=0, help="requests in flight it takes (0 = no limit)"),
    arg("--credential-file", metavar="FILE", help=_CREDENTIAL_HELP),
    *_CONNECTION_ARGS,
)


def _models(items: Sequence[Any]) -> Rows:
    def backend(b: Any) -> str:
        extra = [f"max={b.max_concurrency}"] if b.max_concurrency else []
        extra += [f"credential in {b.credential_header}"] if b.has_credential else []
        extra += ["own CA"] if b.ca_bundle else []
        extra += [f"sni={b.sni}"] if b.sni else []
        extra += [f"health={b.health_path}"] if b.health_path else []
        extra += [f"timeout={b.timeout_seconds}s"] if b.timeout_seconds else []
        extra += [f"idle={b.idle_timeout_seconds}s"] if b.idle_timeout_seconds else []
        return f"{b.url} ({', '.join([b.kind, f'w={b.weight}', f'p={b.priority}', *extra])})"

    def backends(m: Any) -> str:
        return ", ".join(backend(b) for b in m.backends)

    def names(m: Any) -> str:
        return str(m.name) + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else "")

    def max_tokens(m: Any) -> str:
        return f"{m.default_max_tokens or '-'}/{m.max_max_tokens or '-'}"

    def prices(m: Any) -> str:
        return _or(
            ", ".join(
                f"from {p.effective_time}: in {p.input_micros} out {p.output_micros} "
                f"cached {p.cached_micros} {p.currency}"
                for p in m.prices
            )
        )

    return [
        [
            "NAME",
            "VISIBILITY",
            "REALTIME",
            "BACKENDS",
            "MAX_TOKENS (DEFAULT/MAX)",
            "PRICES (MICROS PER 1M TOKENS)",
        ],
        *[
            [names(m), m.visibility, "yes" if m.realtime else "no", backends(m), max_tokens(m), prices(m)]
            for m in items
        ],
    ]


def _usage(r: Any) -> Rows:
    fields = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
              "cost_micros", "currency", "unpriced_requests")  # fmt: skip
    group = next((f for f in ("model", "key_id", "day") if r.rows and r.rows[0].HasField(f)), "model")
    rows = [[getattr(row, group) or "-", *(str(getattr(row, f)) for f in fields)] for row in r.rows]
    return [[group.upper(), *(f.upper() for f in fields)], *rows]


def _invoices(items: Sequence[Any]) -> Rows:
    head = ["ID", "TENANT", "MONTH", "CURRENCY", "TOTAL_MICROS", "STATUS", "CLOSED", "LINES"]
    return [
        head,
        *(
            [
                i.id,
                i.tenant_id,
                i.period_start[:7],
                _or(i.currency),
                str(i.total_micros),
                i.status,
                i.close_time,
                str(len(i.lines)),
            ]
            for i in items
        ),
    ]


def _invoice(i: Any) -> Rows:
    head = ["KIND", "MODEL", "USAGE_MONTH", "PRICE_FROM", "IN/OUT/CACHED PER 1M", "REQUESTS", "PROMPT",
            "COMPLETION", "CACHED", "AMOUNT_MICROS"]  # fmt: skip
    lines = (
        [
            ln.kind,
            ln.model or "-",
            ln.usage_month,
            ln.price_from or "unpriced",
            f"{ln.input_micros}/{ln.output_micros}/{ln.cached_micros}",
            str(ln.requests),
            str(ln.prompt_tokens),
            str(ln.completion_tokens),
            str(ln.cached_tokens),
            str(ln.amount_micros),
        ]
        for ln in i.lines
    )
    return [*_invoices([i]), [], head, *lines]


def _limits(items: Sequence[Any]) -> Rows:
    def row(x: Any) -> list[str]:
        scope = [x.id, x.tenant_id, x.key_id or "*", x.model or "*"]
        return [*scope, x.kind, _or(x.window), str(x.limit), "yes" if x.shadow else "no", x.fail_mode]

    return [["ID", "TENANT", "KEY", "MODEL", "KIND", "WINDOW", "LIMIT", "SHADOW", "FAIL"], *map(row, items)]


# --- the commands -----------------------------------------------------------------------------

GROUPS = {
    "tenants": "manage tenants",
    "plans": "manage plans (default limits and scheduling priority)",
    "principals": "manage the principals that call the admin API, and their roles",
    "keys": "manage gateway API keys",
    "audit": "read the audit log",
    "models": "manage the model registry",
    "limits": "manage rate limits",
    "invoices": "read monthly invoices (closed after a grace period, then immutable)",
}

_TENANT = arg("tenant", help="tenant name or id")
_PLAN = arg("plan", help="plan name")
_PRINCIPAL = arg("principal", help="principal name or id")
_KEY_ID = arg("id", help="API key id")
_LIMIT_ID = arg("id", help="limit id")
_MODEL = arg("name", help="model name")
_VISIBILITY = arg(
    "--visibility",
    choices=("public", "restricted"),
    default="public",
    help="restricted: only tenants that allow it by name see and call it",
)
_ALLOW = arg(
    "--allow-model",
    action="append",
    dest="allowed_models",
    metavar="MODEL",
    help="allowed model (repeatable)",
)
_PLAN_LIMIT = arg(
    "--limit", action="append", type=plan_limit, dest="limits", metavar="KIND:WINDOW:N", help="(repeatable)"
)
_BIND = (
    arg("--role", required=True, choices=ROLES, help="the role"),
    arg("--tenant", default="", help="tenant id (tenant roles)"),
)


def _page(message: str, **filters: str) -> Callable[[argparse.Namespace, Any], Any]:
    """A list request: ``page_size`` 500 plus the named filter fields taken from the flags."""

    def build(a: argparse.Namespace, pb: Any) -> Any:
        values = {name: getattr(a, dest) or "" for name, dest in filters.items()}
        return getattr(pb, message)(page_size=PAGE_SIZE, **values)

    return build


COMMANDS: tuple[Command, ...] = (
    Command(
        ("tenants", "create"),
        "create a tenant",
        "CreateTenant",
        lambda a, pb: pb.CreateTenantRequest(name=a.name, plan=a.plan, allowed_models=a.allowed_models or []),
        lambda r: _tenants([r.tenant]),
        (arg("name", help="tenant name (unique)"), arg("--plan", default="", help="plan name"), _ALLOW),
    ),
    Command(
        ("tenants", "get"),
        "show a tenant",
        "GetTenant",
        lambda a, pb: pb.GetTenantRequest(tenant=a.tenant),
        lambda r: _tenants([r.tenant]),
        (_TENANT,),
    ),
    Command(
        ("tenants", "list"),
        "list tenants",
        "ListTenants",
        _page("ListTenantsRequest", status="status", plan="plan"),
        lambda r: _tenants(r.items),
        (
            arg("--status", choices=("active", "suspended", "deleted"), help="only tenants in this state"),
            arg("--plan", help="plan name"),
        ),
        paged=True,
    ),
    Command(
        ("tenants", "update"),
        "change a tenant's plan or model allow-list (only the flags given change)",
        "UpdateTenant",
        _update_tenant,
        lambda r: _tenants([r.tenant]),
        (
            _TENANT,
            arg("--plan", help="plan name ('' for none)"),
            OneOf((_ALLOW, arg("--clear-models", action="store_true", help="allow every public model"))),
        ),
    ),
    Command(
        ("tenants", "suspend"),
        "suspend a tenant: every key is refused within 1 s",
        "SuspendTenant",
        lambda a, pb: pb.SuspendTenantRequest(tenant=a.tenant, reason=a.reason),
        lambda r: _tenants([r.tenant]),
        (_TENANT, arg("--reason", default="", help="why (kept in the audit log)")),
    ),
    Command(
        ("tenants", "resume"),
        "resume a suspended tenant",
        "ResumeTenant",
        lambda a, pb: pb.ResumeTenantRequest(tenant=a.tenant),
        lambda r: _tenants([r.tenant]),
        (_TENANT,),
    ),
    Command(
        ("tenants", "delete"),
        "delete a tenant: revokes every key, keeps its usage and audit trail",
        "DeleteTenant",
        lambda a, pb: pb.DeleteTenantRequest(tenant=a.tenant),
        lambda r: _tenants([r.tenant], revoked=r.revoked_keys),
        (_TENANT,),
    ),
    Command(
        ("plans", "create"),
        "create a plan",
        "CreatePlan",
        lambda a, pb: pb.CreatePlanRequest(
            name=a.name, priority=a.priority, limits=_plan_limits(pb, a.limits)
        ),
        lambda r: _plans([r.plan]),
        (
            arg("name", help="plan name"),
            arg("--priority", type=int, default=0, help="higher = sooner"),
            _PLAN_LIMIT,
        ),
    ),
    Command(
        ("plans", "get"),
        "show a plan",
        "GetPlan",
        lambda a, pb: pb.GetPlanRequest(plan=a.plan),
        lambda r: _plans([r.plan]),
        (_PLAN,),
    ),
    Command(
        ("plans", "list"),
        "list plans",
        "ListPlans",
        _page("ListPlansRequest"),
        lambda r: _plans(r.items),
        paged=True,
    ),
    Command(
        ("plans", "update"),
        "change a plan's priority or limits (only the flags given change)",
        "UpdatePlan",
        _update_plan,
        lambda r: _plans([r.plan]),
        (
            _PLAN,
            arg("--priority", type=int, help="higher = sooner"),
            OneOf((_PLAN_LIMIT, arg("--clear-limits", action="store_true", help="remove every limit"))),
        ),
    ),
    Command(
        ("plans", "delete"),
        "delete a plan no tenant is on",
        "DeletePlan",
        lambda a, pb: pb.DeletePlanRequest(plan=a.plan),
        lambda _r: [["DELETED"], ["yes"]],
        (_PLAN,),
    ),
    Command(
        ("principals", "create"),
        "create a principal; prints its admin key once",
        "CreatePrincipal",
        lambda a, pb: pb.CreatePrincipalRequest(
            name=a.name,
            kind=a.kind,
            bindings=[pb.RoleBinding(role=r, tenant_id=t) for r, t in a.bindings or ()],
        ),
        _created_principal,
        (
            arg("name", help="principal name, e.g. an e-mail address"),
            arg("--kind", choices=PRINCIPAL_KINDS, default="human", help="a person or a service account"),
            arg(
                "--role",
                action="append",
                type=role_binding,
                dest="bindings",
                metavar="ROLE[:TENANT]",
                help=f"role binding (repeatable); ROLE one of {', '.join(ROLES)}",
            ),
        ),
    ),
    Command(
        ("principals", "get"),
        "show a principal",
        "GetPrincipal",
        lambda a, pb: pb.GetPrincipalRequest(principal=a.principal),
        lambda r: _principals([r.principal]),
        (_PRINCIPAL,),
    ),
    Command(
        ("principals", "list"),
        "list principals",
        "ListPrincipals",
        _page("ListPrincipalsRequest", tenant="tenant"),
        lambda r: _principals(r.items),
        (arg("--tenant", help="only principals bound to this tenant"),),
        paged=True,
    ),
    Command(
        ("principals", "bind"),
        "add a role binding",
        "AddRoleBinding",
        _binding_request("AddRoleBindingRequest"),
        lambda r: _principals([r.principal]),
        (_PRINCIPAL, *_BIND),
    ),
    Command(
        ("principals", "unbind"),
        "remove a role binding",
        "RemoveRoleBinding",
        _binding_request("RemoveRoleBindingRequest"),
        lambda r: _principals([r.principal]),
        (_PRINCIPAL, *_BIND),
    ),
    Command(
        ("principals", "disable"),
        "disable a principal and revoke its admin keys",
        "DisablePrincipal",
        lambda a, pb: pb.DisablePrincipalRequest(principal=a.principal),
        lambda r: _principals([r.principal]),
        (_PRINCIPAL,),
    ),
    Command(
        ("whoami",),
        "show who the admin credential belongs to and its roles",
        "WhoAmI",
        lambda _a, pb: pb.WhoAmIRequest(),
        lambda r: _principals([r.principal]),
    ),
    Command(
        ("keys", "create"),
        "mint an API key; prints the secret once",
        "CreateApiKey",
        _create_key,
        _created_key,
        (
            arg("--tenant", required=True, help="tenant name or id"),
            arg("--name", default="", help="a label for the key"),
            OneOf(
                (
                    arg("--ttl", type=duration, metavar="DUR", help="lifetime, e.g. 24h"),
                    arg("--expires", type=timestamp, metavar="RFC3339", help="expiry time"),
                )
            ),
            _ALLOW,
        ),
    ),
    Command(
        ("keys", "get"),
        "show an API key",
        "GetApiKey",
        lambda a, pb: pb.GetApiKeyRequest(id=a.id),
        lambda r: _keys([r.api_key]),
        (_KEY_ID,),
    ),
    Command(
        ("keys", "list"),
        "list API keys",
        "ListApiKeys",
        _page("ListApiKeysRequest", tenant="tenant", status="status"),
        lambda r: _keys(r.items),
        (
            arg("--tenant", help="tenant name or id"),
            arg("--status", choices=("active", "revoked", "expired"), help="only keys in this state"),
        ),
        paged=True,
    ),
    Command(
        ("keys", "revoke"),
        "revoke an API key (refused everywhere within 1 s)",
        "RevokeApiKey",
        lambda a, pb: pb.RevokeApiKeyRequest(id=a.id),
        lambda r: _keys([r.api_key]),
        (_KEY_ID,),
    ),
    Command(
        ("keys", "rotate"),
        "give a key a new secret; the old one works for --grace",
        "RotateApiKey",
        lambda a, pb: pb.RotateApiKeyRequest(id=a.id, grace=a.grace or "", rotation_id=a.rotation_id),
        _rotated_key,
        (
            _KEY_ID,
            arg(
                "--grace",
                type=duration,
                metavar="DUR",
                help="old secret keeps working (default 0s)",
            ),
            arg("--rotation-id", default="", help="idempotency key: a retry returns no new secret"),
        ),
        note=_rotation_note,
    ),
    Command(
        ("audit", "list"),
        "list audit events, newest first",
        "ListAuditEvents",
        _list_audit,
        lambda r: _audit(r.items),
        (
            arg("--tenant", default="", help="tenant name or id"),
            arg("--actor", default="", help="principal id"),
            arg("--action", default="", dest="action_filter", help="e.g. api_key.rotate"),
            arg("--since", type=timestamp, metavar="RFC3339", help="inclusive"),
            arg("--until", type=timestamp, metavar="RFC3339", help="exclusive"),
            arg(
                "--limit",
                type=positive_int,
                default=AUDIT_DEFAULT_LIMIT,
                dest="max_items",
                help=f"at most this many events (default {AUDIT_DEFAULT_LIMIT})",
            ),
        ),
        paged=True,
    ),
    Command(
        ("models", "add"),
        "register a model, or add a backend to it",
        "AddModel",
        _add_model,
        lambda r: _models([r.model]),
        (
            _MODEL,
            *_BACKEND_ARGS,
            _VISIBILITY,
            arg("--replace", action="store_true", help="replace the model's backends with this one"),
        ),
    ),
    Command(
        ("models", "list"),
        "list registered models",
        "ListModels",
        _page("ListModelsRequest"),
        lambda r: _models(r.items),
        paged=True,
    ),
    Command(
        ("models", "show"),
        "show one model: backends, max_tokens, prices",
        "GetModel",
        lambda a, pb: pb.GetModelRequest(name=a.name),
        lambda r: _models([r.model]),
        (_MODEL,),
    ),
    Command(
        ("models", "add-backend"),
        "add a backend to a registered model",
        "AddBackend",
        lambda a, pb: pb.AddBackendRequest(name=a.name, backend=_backend_pb(a, pb)),
        lambda r: _models([r.model]),
        (_MODEL, *_BACKEND_ARGS),
    ),
    Command(
        ("models", "update-backend"),
        "change a backend's settings (streams in flight go on)",
        "UpdateBackend",
        _update_backend,
        lambda r: _models([r.model]),
        (
            _MODEL,
            arg("--backend", required=True, metavar="URL", help="which backend"),
            arg("--weight", type=count, help="share of traffic among backends of one priority"),
            arg("--priority", type=count, help="0 first; higher = fallback"),
            arg("--kind", choices=BACKEND_KINDS, help="the server's API dialect"),
            arg("--max-concurrency", type=count, help="0 = no limit"),
            OneOf(
                (
                    arg("--credential-file", metavar="FILE", help=_CREDENTIAL_HELP),
                    arg("--clear-credential", action="store_true", help="send no credential any more"),
                )
            ),
            *_CONNECTION_ARGS,
        ),
    ),
    Command(
        ("models", "remove-backend"),
        "remove one backend from a model",
        "RemoveBackend",
        lambda a, pb: pb.RemoveBackendRequest(name=a.name, url=a.backend),
        lambda r: _models([r.model]),
        (_MODEL, arg("--backend", required=True, metavar="URL", help="which backend")),
    ),
    Command(
        ("models", "remove"),
        "remove a model from the registry (no longer routed or listed)",
        "RemoveModel",
        lambda a, pb: pb.RemoveModelRequest(name=a.name),
        lambda _r: [["REMOVED"], ["yes"]],
        (_MODEL,),
    ),
    Command(
        ("models", "update"),
        "set a model's max_tokens defaults, aliases, realtime or visibility",
        "UpdateModel",
        _update_model,
        lambda r: _models([r.model]),
        (
            _MODEL,
            arg("--default-max-tokens", type=count, help="used when a request names none (0 = unset)"),
            arg("--max-tokens", type=count, help="cap on a request's max_tokens (0 = unset)"),
            OneOf(
                (
                    arg(
                        "--alias",
                        dest="aliases",
                        action="append",
                        metavar="NAME",
                        help="another name callers may use (repeat; replaces the aliases)",
                    ),
                    arg("--clear-aliases", action="store_true", help="remove every alias"),
                )
            ),
            arg("--realtime", choices=("on", "off"), help="let /v1/realtime WebSockets through"),
            arg("--visibility", choices=("public", "restricted"), help=_VISIBILITY.kwargs["help"]),
        ),
    ),
    Command(
        ("models", "price"),
        "add an effective-dated price (micro-units per 1M tokens, e.g. 150000 = 0.15 USD)",
        "SetModelPrice",
        _price_model,
        lambda r: _models([r.model]),
        (
            _MODEL,
            arg("--input-price", type=count, required=True, metavar="MICROS", help="per 1M prompt tokens"),
            arg(
                "--output-price", type=count, required=True, metavar="MICROS", help="per 1M completion tokens"
            ),
            arg(
                "--cached-price",
                type=count,
                metavar="MICROS",
                help="per 1M cached prompt tokens (default: --input-price)",
            ),
            arg("--currency", default="USD", help="ISO 4217 code (default USD)"),
            arg(
                "--from",
                dest="effective",
                metavar="DATE",
                help="YYYY-MM-DD or RFC 3339, UTC (default: now); usage already metered from then on "
                "is re-priced unless a closed invoice holds it",
            ),
        ),
    ),
    Command(
        ("limits", "create"),
        "create a rate limit",
        "CreateLimit",
        _create_limit,
        lambda r: _limits([r.limit]),
        (
            arg("--tenant", required=True, help="tenant name or id"),
            arg("--key", default="", help="logical key id (default: the whole tenant)"),
            arg("--model", default="", help="(default: every model)"),
            arg("--kind", choices=LIMIT_KINDS, required=True, help="what the limit counts"),
            arg(
                "--window",
                choices=LIMIT_WINDOWS,
                default="",
                help="month = calendar month, UTC; none for concurrency",
            ),
            arg(
                "--limit",
                type=positive_int,
                required=True,
                help="requests, tokens or spend (micro-units) per window; requests in flight for concurrency",
            ),
            arg("--shadow", action="store_true", help="count and log, never refuse"),
            arg("--fail", choices=("open", "closed"), default="open", help="when counters are unreachable"),
            arg(
                "--prompt-weight",
                type=count,
                default=0,
                metavar="PERCENT",
                help="tokens: a prompt token counts (100)",
            ),
            arg(
                "--completion-weight",
                type=count,
                default=0,
                metavar="PERCENT",
                help="tokens: a completion token counts (100)",
            ),
        ),
    ),
    Command(
        ("limits", "update"),
        "change a limit's value, shadow flag or fail mode (its count carries over)",
        "UpdateLimit",
        _update_limit,
        lambda r: _limits([r.limit]),
        (
            _LIMIT_ID,
            arg("--limit", type=positive_int, help="the new value (the count carries over)"),
            OneOf(
                (
                    arg("--shadow", action="store_const", const=True, help="count and log, never refuse"),
                    arg(
                        "--enforce",
                        dest="shadow",
                        action="store_const",
                        const=False,
                        help="refuse over the limit",
                    ),
                )
            ),
            arg("--fail", choices=("open", "closed"), help="when counters are unreachable"),
        ),
    ),
    Command(
        ("limits", "delete"),
        "delete a limit (a plan default of the same kind and window applies again)",
        "DeleteLimit",
        lambda a, pb: pb.DeleteLimitRequest(id=a.id),
        lambda _r: [["DELETED"], ["yes"]],
        (_LIMIT_ID,),
    ),
    Command(
        ("limits", "list"),
        "list rate limits",
        "ListLimits",
        _page("ListLimitsRequest", tenant="tenant"),
        lambda r: _limits(r.items),
        (arg("--tenant", help="tenant name or id"),),
        paged=True,
    ),
    Command(
        ("usage",),
        "a tenant's usage, summed by model, key or day (default: this UTC month)",
        "QueryUsage",
        lambda a, pb: pb.QueryUsageRequest(
            tenant=a.tenant, to=a.to or "", group_by=a.group_by, **{"from": a.start or ""}
        ),
        _usage,
        (
            arg("--tenant", required=True, help="tenant name or id"),
            arg(
                "--from",
                dest="start",
                metavar="TIME",
                help="YYYY-MM-DD or RFC 3339, UTC (default: month start)",
            ),
            arg("--to", metavar="TIME", help="exclusive (default: next month's start)"),
            arg(
                "--group-by",
                choices=("model", "key", "day"),
                default="model",
                help="one row per (default model)",
            ),
        ),
    ),
    Command(
        ("invoices", "list"),
        "list a tenant's invoices",
        "ListInvoices",
        _page("ListInvoicesRequest", tenant="tenant"),
        lambda r: _invoices(r.items),
        (arg("--tenant", required=True, help="tenant name or id"),),
        paged=True,
    ),
    Command(
        ("invoices", "show"),
        "show an invoice and its lines",
        "GetInvoice",
        lambda a, pb: pb.GetInvoiceRequest(id=a.id),
        lambda r: _invoice(r.invoice),
        (arg("id", help="invoice id"),),
    ),
    Command(
        ("invoices", "preview"),
        "this month's open invoice so far (what closing it now would bill)",
        "PreviewInvoice",
        lambda a, pb: pb.PreviewInvoiceRequest(tenant=a.tenant),
        lambda r: _invoice(r.invoice),
        (arg("--tenant", required=True, help="tenant name or id"),),
    ),
    Command(
        ("invoices", "close"),
        "close every month past its grace period now (the control plane also does, every minute)",
        "CloseDueInvoices",
        lambda _a, pb: pb.CloseDueInvoicesRequest(),
        lambda r: _invoices(r.closed),
    ),
)


# --- wiring -----------------------------------------------------------------------------------


def add_admin_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add every command to ``sub`` (the top-level subparsers); ``common`` holds the global flags."""
    groups: dict[str, Any] = {}
    for cmd in COMMANDS:
        parent = sub
        if len(cmd.path) == 2:  # noqa: PLR2004 - GROUP ACTION
            group = cmd.path[0]
            if group not in groups:
                gp = sub.add_parser(group, parents=[common], help=GROUPS[group], description=GROUPS[group])
                groups[group] = gp.add_subparsers(dest="action", metavar="ACTION", required=True)
            parent = groups[group]
        p = parent.add_parser(
            cmd.path[-1],
            parents=[common],
            help=cmd.help,
            description=cmd.help,
        )
        for spec in cmd.args:
            if isinstance(spec, OneOf):
                group_ = p.add_mutually_exclusive_group()
                for a in spec.args:
                    group_.add_argument(*a.flags, **a.kwargs)
            else:
                p.add_argument(*spec.flags, **spec.kwargs)
        p.set_defaults(admin_command=cmd, command_parser=p)


def build_request(args: argparse.Namespace) -> tuple[str, Any]:
    """(RPC name, request message) for a parsed admin command; raises :class:`UsageError`."""
    from tessera.admin.v1 import admin_pb2  # noqa: PLC0415 - keep `tessera up` and --help light

    cmd: Command = args.admin_command
    return cmd.rpc, cmd.build(args, admin_pb2)


def fetch(call: Callable[[str, Any], Any], cmd: Command, request: Any, limit: int | None = None) -> Any:
    """Call ``cmd``'s RPC; for a list command collect pages (at most ``limit`` items) into one response."""
    if not cmd.paged:
        return call(cmd.rpc, request)
    items: list[Any] = []
    while True:
        if limit is not None:
            request.page_size = min(PAGE_SIZE, limit - len(items))
        page = call(cmd.rpc, request)
        items.extend(page.items)
        request.page_token = page.next_page_token
        if not page.next_page_token or (limit is not None and len(items) >= limit):
            break
    del page.items[:]
    page.items.extend(items[:limit])
    return page
