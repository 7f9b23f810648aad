"""The admin CLI, one command per admin RPC: parsing, request building, paging and rendering.

No network: requests are built from parsed argv, and paging runs against a fake ``call``.
"""

from __future__ import annotations

import io
import json

import pytest
from google.protobuf import json_format

from tessera.admin.v1 import admin_pb2 as pb
from tessera.admin_client import SERVICES
from tessera.cli import _print_table, build_parser, main
from tessera.cli_admin import COMMANDS, GROUPS, PAGE_SIZE, UsageError, build_request, fetch
from tessera.cli_resources import RPCS as RESOURCE_RPCS


def req(*argv: str):
    return build_request(build_parser().parse_args(list(argv)))


def usage_error(capsys, *argv: str) -> str:
    """argv is refused like a bad flag: exit 2, message on stderr, nothing on stdout."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    return out.err


# --- coverage and help ------------------------------------------------------------------------


def test_every_admin_rpc_has_exactly_one_command():
    rpcs = [m.name for s in SERVICES for m in pb.DESCRIPTOR.services_by_name[s].methods]
    # the declarative RPCs are `tessera apply/diff/get` (tessera/cli_resources.py)
    assert sorted(c.rpc for c in COMMANDS) == sorted(set(rpcs) - set(RESOURCE_RPCS))
    assert len({c.path for c in COMMANDS}) == len(COMMANDS)


HELP_PATHS = [[], *[[g] for g in GROUPS], *[list(c.path) for c in COMMANDS]]


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "tessera")
def test_help_exits_0_with_text(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tessera")
    assert "--output" in out


# --- global flags -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [list(c.path) for c in COMMANDS], ids=" ".join)
def test_output_json_before_or_after_every_command(path):
    required = {
        ("tenants", "create"): ["n"],
        ("tenants", "get"): ["t"],
        ("tenants", "update"): ["t", "--plan", "p"],
        ("tenants", "suspend"): ["t"],
        ("tenants", "resume"): ["t"],
        ("tenants", "delete"): ["t"],
        ("plans", "create"): ["p"],
        ("plans", "get"): ["p"],
        ("plans", "delete"): ["p"],
        ("plans", "update"): ["p", "--priority", "1"],
        ("principals", "create"): ["p"],
        ("principals", "get"): ["p"],
        ("principals", "bind"): ["p", "--role", "platform-admin"],
        ("principals", "unbind"): ["p", "--role", "platform-admin"],
        ("principals", "disable"): ["p"],
        ("keys", "create"): ["--tenant", "t"],
        ("keys", "get"): ["k"],
        ("keys", "revoke"): ["k"],
        ("keys", "rotate"): ["k"],
        ("models", "add"): ["m", "--backend", "http://h:1"],
        ("models", "update"): ["m", "--max-tokens", "9"],
        ("models", "show"): ["m"],
        ("models", "add-backend"): ["m", "--backend", "http://h:1"],
        ("models", "update-backend"): ["m", "--backend", "http://h:1", "--weight", "2"],
        ("models", "remove-backend"): ["m", "--backend", "http://h:1"],
        ("models", "remove"): ["m"],
        ("models", "price"): ["m", "--input-price", "1", "--output-price", "2"],
        ("limits", "create"): ["--tenant", "t", "--kind", "requests", "--window", "day", "--limit", "1"],
        ("limits", "update"): ["l", "--limit", "2"],
        ("limits", "delete"): ["l"],
        ("usage",): ["--tenant", "t"],
        ("invoices", "list"): ["--tenant", "t"],
        ("invoices", "show"): ["inv_x"],
        ("invoices", "preview"): ["--tenant", "t"],
    }.get(tuple(path), [])
    before = build_parser().parse_args(["-o", "json", "--token", "x", *path, *required])
    after = build_parser().parse_args([*path, *required, "--output", "json", "--token", "x"])
    default = build_parser().parse_args([*path, *required])
    assert (before.output, before.token) == (after.output, after.token) == ("json", "x")
    assert (default.output, default.token) == ("table", None)
    assert before.admin_command is after.admin_command
    assert req(*path, *required) == req("-o", "json", *path, *required)


# --- tenants ----------------------------------------------------------------------------------


def test_tenants_create():
    assert req("tenants", "create", "acme") == ("CreateTenant", pb.CreateTenantRequest(name="acme"))
    _, msg = req("tenants", "create", "acme", "--plan", "gold", "--allow-model", "a", "--allow-model", "b")
    assert msg == pb.CreateTenantRequest(name="acme", plan="gold", allowed_models=["a", "b"])


def test_tenants_get_list_suspend_resume_delete():
    assert req("tenants", "get", "acme") == ("GetTenant", pb.GetTenantRequest(tenant="acme"))
    assert req("tenants", "list") == ("ListTenants", pb.ListTenantsRequest(page_size=PAGE_SIZE))
    assert req("tenants", "list", "--status", "suspended", "--plan", "gold")[1] == pb.ListTenantsRequest(
        page_size=PAGE_SIZE, status="suspended", plan="gold"
    )
    assert req("tenants", "suspend", "acme", "--reason", "unpaid") == (
        "SuspendTenant",
        pb.SuspendTenantRequest(tenant="acme", reason="unpaid"),
    )
    assert req("tenants", "resume", "acme") == ("ResumeTenant", pb.ResumeTenantRequest(tenant="acme"))
    assert req("tenants", "delete", "acme") == ("DeleteTenant", pb.DeleteTenantRequest(tenant="acme"))


@pytest.mark.parametrize(
    ("flags", "mask", "plan", "models"),
    [
        (["--plan", "gold"], ["plan"], "gold", []),
        (["--plan", ""], ["plan"], "", []),
        (["--allow-model", "a", "--allow-model", "b"], ["allowed_models"], "", ["a", "b"]),
        (["--clear-models"], ["allowed_models"], "", []),
        (["--clear-models", "--plan", "p"], ["plan", "allowed_models"], "p", []),
    ],
)
def test_tenants_update_mask_follows_the_flags_given(flags, mask, plan, models):
    rpc, msg = req("tenants", "update", "acme", *flags)
    assert rpc == "UpdateTenant"
    assert msg == pb.UpdateTenantRequest(tenant="acme", update_mask=mask, plan=plan, allowed_models=models)


def test_tenants_update_needs_a_change_and_no_contradiction(capsys):
    assert "nothing to update" in usage_error(capsys, "tenants", "update", "acme")
    err = usage_error(capsys, "tenants", "update", "acme", "--clear-models", "--allow-model", "a")
    assert "--clear-models" in err
    assert "not allowed with" in err


# --- plans ------------------------------------------------------------------------------------


def test_plans_create_get_list():
    rpc, msg = req(
        "plans",
        "create",
        "gold",
        "--priority",
        "5",
        "--limit",
        "requests:minute:600",
        "--limit",
        "tokens:day:1000000",
    )
    assert rpc == "CreatePlan"
    assert msg == pb.CreatePlanRequest(
        name="gold",
        priority=5,
        limits=[
            pb.PlanLimit(kind="requests", window="minute", limit=600),
            pb.PlanLimit(kind="tokens", window="day", limit=1_000_000),
        ],
    )
    assert req("plans", "create", "free") == ("CreatePlan", pb.CreatePlanRequest(name="free"))
    assert req("plans", "get", "gold") == ("GetPlan", pb.GetPlanRequest(plan="gold"))
    assert req("plans", "list") == ("ListPlans", pb.ListPlansRequest(page_size=PAGE_SIZE))


def test_plans_update_mask():
    assert req("plans", "update", "gold", "--priority", "0") == (
        "UpdatePlan",
        pb.UpdatePlanRequest(plan="gold", update_mask=["priority"], priority=0),
    )
    _, msg = req("plans", "update", "gold", "--limit", "spend:month:5")
    assert msg == pb.UpdatePlanRequest(
        plan="gold", update_mask=["limits"], limits=[pb.PlanLimit(kind="spend", window="month", limit=5)]
    )
    _, msg = req("plans", "update", "gold", "--clear-limits", "--priority", "2")
    assert msg == pb.UpdatePlanRequest(plan="gold", update_mask=["priority", "limits"], priority=2)


@pytest.mark.parametrize(
    "bad",
    [
        "requests",
        "requests:minute",
        "requests:minute:x",
        "requests:week:5",
        "bytes:day:1",
        "a:b:c:d",
        "requests:minute:-1",
        "requests:minute:0",
    ],
)
@pytest.mark.parametrize("command", [["plans", "create", "p"], ["plans", "update", "p"]])
def test_malformed_plan_limit_is_an_argparse_error_naming_the_flag(command, bad, capsys):
    err = usage_error(capsys, *command, "--limit", bad)
    assert "argument --limit" in err
    assert "KIND:WINDOW:N" in err


def test_plans_update_needs_a_change(capsys):
    assert "nothing to update" in usage_error(capsys, "plans", "update", "gold")


# --- principals -------------------------------------------------------------------------------


def test_principals_create():
    rpc, msg = req(
        "principals",
        "create",
        "ci",
        "--kind",
        "service_account",
        "--role",
        "tenant-admin:acme",
        "--role",
        "platform-admin",
    )
    assert rpc == "CreatePrincipal"
    assert msg == pb.CreatePrincipalRequest(
        name="ci",
        kind="service_account",
        bindings=[
            pb.RoleBinding(role="tenant-admin", tenant_id="acme"),
            pb.RoleBinding(role="platform-admin"),
        ],
    )
    assert req("principals", "create", "ann")[1] == pb.CreatePrincipalRequest(name="ann", kind="human")


@pytest.mark.parametrize("bad", ["owner", "tenant-admin", "tenant-viewer:", "platform-admin:acme"])
def test_bad_role_binding_is_an_argparse_error(bad, capsys):
    assert "argument --role" in usage_error(capsys, "principals", "create", "ci", "--role", bad)


def test_principals_get_list_disable_whoami():
    assert req("principals", "get", "ci") == ("GetPrincipal", pb.GetPrincipalRequest(principal="ci"))
    assert req("principals", "list") == ("ListPrincipals", pb.ListPrincipalsRequest(page_size=PAGE_SIZE))
    assert req("principals", "list", "--tenant", "acme")[1] == pb.ListPrincipalsRequest(
        page_size=PAGE_SIZE, tenant="acme"
    )
    assert req("principals", "disable", "ci") == (
        "DisablePrincipal",
        pb.DisablePrincipalRequest(principal="ci"),
    )
    assert req("whoami") == ("WhoAmI", pb.WhoAmIRequest())


def test_principals_bind_and_unbind():
    binding = pb.RoleBinding(role="tenant-viewer", tenant_id="acme")
    assert req("principals", "bind", "ci", "--role", "tenant-viewer", "--tenant", "acme") == (
        "AddRoleBinding",
        pb.AddRoleBindingRequest(principal="ci", binding=binding),
    )
    assert req("principals", "unbind", "ci", "--role", "tenant-viewer", "--tenant", "acme") == (
        "RemoveRoleBinding",
        pb.RemoveRoleBindingRequest(principal="ci", binding=binding),
    )
    assert req("principals", "bind", "ci", "--role", "platform-admin")[1] == pb.AddRoleBindingRequest(
        principal="ci", binding=pb.RoleBinding(role="platform-admin")
    )


def test_principals_bind_checks_the_tenant(capsys):
    assert "needs a tenant" in usage_error(capsys, "principals", "bind", "ci", "--role", "tenant-admin")
    err = usage_error(capsys, "principals", "unbind", "ci", "--role", "platform-admin", "--tenant", "a")
    assert "platform-admin takes no tenant" in err
    with pytest.raises(UsageError):
        req("principals", "bind", "ci", "--role", "tenant-admin")


# --- keys -------------------------------------------------------------------------------------


def test_keys_create():
    assert req("keys", "create", "--tenant", "acme") == (
        "CreateApiKey",
        pb.CreateApiKeyRequest(tenant="acme"),
    )
    _, msg = req("keys", "create", "--tenant", "acme", "--name", "ci", "--ttl", "1h30m", "--allow-model", "m")
    assert msg == pb.CreateApiKeyRequest(tenant="acme", name="ci", ttl="1h30m", allowed_models=["m"])
    _, msg = req("keys", "create", "--tenant", "acme", "--expires", "2030-01-02T03:04:05Z")
    assert msg == pb.CreateApiKeyRequest(tenant="acme", expire_time="2030-01-02T03:04:05Z")


def test_keys_create_flag_errors(capsys):
    assert "--tenant" in usage_error(capsys, "keys", "create")
    err = usage_error(
        capsys, "keys", "create", "--tenant", "a", "--ttl", "1h", "--expires", "2030-01-01T00:00:00Z"
    )
    assert "not allowed with" in err
    assert "argument --ttl" in usage_error(capsys, "keys", "create", "--tenant", "a", "--ttl", "1 day")
    assert "argument --expires" in usage_error(
        capsys, "keys", "create", "--tenant", "a", "--expires", "2030-01-01"
    )
    assert "argument --expires" in usage_error(capsys, "keys", "create", "--tenant", "a", "--expires", "soon")


def test_keys_get_list_revoke_rotate():
    assert req("keys", "get", "k1") == ("GetApiKey", pb.GetApiKeyRequest(id="k1"))
    assert req("keys", "list") == ("ListApiKeys", pb.ListApiKeysRequest(page_size=PAGE_SIZE))
    assert req("keys", "list", "--tenant", "acme", "--status", "revoked")[1] == pb.ListApiKeysRequest(
        tenant="acme", status="revoked", page_size=PAGE_SIZE
    )
    assert req("keys", "revoke", "k1") == ("RevokeApiKey", pb.RevokeApiKeyRequest(id="k1"))
    assert req("keys", "rotate", "k1") == ("RotateApiKey", pb.RotateApiKeyRequest(id="k1"))
    assert req("keys", "rotate", "k1", "--grace", "15m", "--rotation-id", "r-1")[1] == pb.RotateApiKeyRequest(
        id="k1", grace="15m", rotation_id="r-1"
    )


def test_keys_rotate_renders_the_new_key_and_notes_a_reused_rotation_id(capsys):
    cmd = build_parser().parse_args(["keys", "rotate", "k1"]).admin_command
    fresh = pb.RotateApiKeyResponse(
        id="k1", key="tsk_abc_secret", prefix="tsk_abc_secr", grace_until="2030-01-01T00:00:00Z"
    )
    _print_table(cmd.render(fresh))
    out = capsys.readouterr().out
    assert "tsk_abc_secret" in out
    assert "2030-01-01T00:00:00Z" in out
    assert cmd.note(fresh) == ""
    retry = pb.RotateApiKeyResponse(id="k1", prefix="tsk_abc_secr")
    assert "rotation id already used" in cmd.note(retry)


# --- audit ------------------------------------------------------------------------------------


def test_audit_list():
    assert req("audit", "list") == ("ListAuditEvents", pb.ListAuditEventsRequest(page_size=100))
    _, msg = req(
        "audit", "list", "--tenant", "acme", "--actor", "p1", "--action", "api_key.rotate",
        "--since", "2030-01-01T00:00:00Z", "--until", "2030-01-02T00:00:00+00:00", "--limit", "1000",
    )  # fmt: skip
    assert msg == pb.ListAuditEventsRequest(
        tenant="acme",
        actor="p1",
        action="api_key.rotate",
        start_time="2030-01-01T00:00:00Z",
        end_time="2030-01-02T00:00:00+00:00",
        page_size=PAGE_SIZE,
    )


@pytest.mark.parametrize(("flag", "value"), [("--limit", "0"), ("--limit", "x"), ("--since", "yesterday")])
def test_audit_flag_errors(flag, value, capsys):
    assert f"argument {flag}" in usage_error(capsys, "audit", "list", flag, value)


# --- models and limits ------------------------------------------------------------------------


def test_models_add_and_list():
    assert req("models", "add", "m", "--backend", "http://h:8000") == (
        "AddModel",
        pb.AddModelRequest(
            name="m",
            backend=pb.Backend(url="http://h:8000", kind="openai-compatible", weight=1),
            visibility="public",
        ),
    )
    _, msg = req(
        "models", "add", "m", "--backend", "http://h:1", "--kind", "vllm", "--weight", "3",
        "--priority", "2", "--visibility", "restricted", "--replace",
    )  # fmt: skip
    assert msg == pb.AddModelRequest(
        name="m",
        backend=pb.Backend(url="http://h:1", kind="vllm", weight=3, priority=2),
        visibility="restricted",
        replace_backends=True,
    )
    assert req("models", "list") == ("ListModels", pb.ListModelsRequest(page_size=PAGE_SIZE))


def test_limits_create_and_list():
    _, msg = req(
        "limits", "create", "--tenant", "acme", "--key", "k1", "--model", "m", "--kind", "requests",
        "--window", "hour", "--limit", "10", "--shadow", "--fail", "closed",
    )  # fmt: skip
    assert msg == pb.CreateLimitRequest(
        tenant="acme",
        key_id="k1",
        model="m",
        kind="requests",
        window="hour",
        limit=10,
        shadow=True,
        fail_mode="closed",
    )
    assert req("limits", "list", "--tenant", "acme") == (
        "ListLimits",
        pb.ListLimitsRequest(tenant="acme", page_size=PAGE_SIZE),
    )


def test_models_show_backends_and_remove(capsys):
    assert req("models", "show", "m") == ("GetModel", pb.GetModelRequest(name="m"))
    assert req(
        "models", "add-backend", "m", "--backend", "http://h:2", "--weight", "3", "--priority", "1"
    ) == (
        "AddBackend",
        pb.AddBackendRequest(
            name="m", backend=pb.Backend(url="http://h:2", kind="openai-compatible", weight=3, priority=1)
        ),
    )
    assert req("models", "update-backend", "m", "--backend", "http://h:2", "--weight", "5")[1] == (
        pb.UpdateBackendRequest(name="m", url="http://h:2", update_mask=["weight"], weight=5)
    )
    assert "nothing to update" in usage_error(
        capsys, "models", "update-backend", "m", "--backend", "http://h:2"
    )
    assert req("models", "remove-backend", "m", "--backend", "http://h:2") == (
        "RemoveBackend",
        pb.RemoveBackendRequest(name="m", url="http://h:2"),
    )
    assert req("models", "remove", "m") == ("RemoveModel", pb.RemoveModelRequest(name="m"))


def test_backend_connection_options_and_secrets_read_from_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "key").write_text("sk-upstream\n")
    _, msg = req(
        "models", "add-backend", "m", "--backend", "https://h:443",
        "--credential-file", str(tmp_path / "key"), "--credential-header", "api-key",
        "--sni", "gpu.internal", "--health-path", "/ready", "--timeout", "600", "--idle-timeout", "900",
    )  # fmt: skip
    assert msg.backend == pb.Backend(
        url="https://h:443", kind="openai-compatible", weight=1, credential="sk-upstream",
        credential_header="api-key", sni="gpu.internal", health_path="/ready", timeout_seconds=600,
        idle_timeout_seconds=900,
    )  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-from-stdin\n"))
    _, msg = req("models", "update-backend", "m", "--backend", "https://h:443", "--credential-file", "-")
    assert (list(msg.update_mask), msg.credential) == (["credential"], "sk-from-stdin")
    _, msg = req(
        "models", "update-backend", "m", "--backend", "https://h:443", "--clear-credential", "--sni", ""
    )
    assert (list(msg.update_mask), msg.credential, msg.sni) == (["credential", "sni"], "", "")
    missing = usage_error(
        capsys, "models", "add", "m", "--backend", "http://h:1", "--credential-file", str(tmp_path / "nope")
    )
    assert "cannot read the credential" in missing


def test_models_update_aliases_realtime_visibility(capsys):
    _, msg = req("models", "update", "m", "--alias", "gpt-4o", "--alias", "gpt-4", "--realtime", "on")
    assert msg == pb.UpdateModelRequest(
        name="m", update_mask=["aliases", "realtime"], aliases=["gpt-4o", "gpt-4"], realtime=True
    )
    _, msg = req(
        "models", "update", "m", "--clear-aliases", "--realtime", "off", "--visibility", "restricted"
    )
    assert msg == pb.UpdateModelRequest(
        name="m", update_mask=["aliases", "realtime", "visibility"], visibility="restricted"
    )


def test_usage_and_invoices(capsys):
    _, msg = req(
        "usage",
        "--tenant",
        "acme",
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-15T12:00:00Z",
        "--group-by",
        "day",
    )
    assert msg == pb.QueryUsageRequest(
        tenant="acme", to="2026-11-15T12:00:00Z", group_by="day", **{"from": "2026-11-01"}
    )
    assert req("usage", "--tenant", "acme")[1] == pb.QueryUsageRequest(tenant="acme", group_by="model")
    assert "invalid choice" in usage_error(capsys, "usage", "--tenant", "a", "--group-by", "week")
    assert req("invoices", "show", "inv_1") == ("GetInvoice", pb.GetInvoiceRequest(id="inv_1"))
    assert req("invoices", "list", "--tenant", "acme")[1] == pb.ListInvoicesRequest(
        tenant="acme", page_size=PAGE_SIZE
    )


def test_usage_table_and_csv_name_the_group(capsys):
    from tessera.cli_admin import _usage  # noqa: PLC0415

    resp = pb.QueryUsageResponse(
        rows=[
            pb.UsageRow(
                day="2026-11-02",
                requests=3,
                prompt_tokens=10,
                completion_tokens=5,
                total_tokens=15,
                cost_micros=42,
                currency="USD",
            )
        ]
    )
    head, row = _usage(resp)
    assert head[:2] == ["DAY", "REQUESTS"]
    assert row[:5] == ["2026-11-02", "3", "10", "5", "15"]


def test_models_update_and_price():
    assert req("models", "update", "m", "--default-max-tokens", "256", "--max-tokens", "4096") == (
        "UpdateModel",
        pb.UpdateModelRequest(
            name="m",
            update_mask=["default_max_tokens", "max_max_tokens"],
            default_max_tokens=256,
            max_max_tokens=4096,
        ),
    )
    _, msg = req(
        "models", "price", "m", "--input-price", "150000", "--output-price", "600000", "--from", "2026-12-01"
    )
    assert msg == pb.SetModelPriceRequest(
        name="m", input_micros=150000, output_micros=600000, currency="USD", effective_time="2026-12-01"
    )
    _, free_cache = req(
        "models", "price", "m", "--input-price", "5", "--output-price", "9", "--cached-price", "0"
    )
    assert free_cache.HasField("cached_micros")  # cached tokens free: 0 is sent, not "unset"
    assert free_cache.cached_micros == 0
    assert not msg.HasField("cached_micros")  # not given: the server uses the input price
    # --output is the output format here as everywhere (the prices are --*-price)
    args = build_parser().parse_args(
        ["models", "price", "m", "--input-price", "1", "--output-price", "2", "--output", "json"]
    )
    assert (args.output, args.output_price) == ("json", 2)


def test_limits_of_every_kind_update_and_delete(capsys):
    _, msg = req(
        "limits", "create", "--tenant", "acme", "--kind", "tokens", "--window", "month", "--limit", "5000",
        "--prompt-weight", "50", "--completion-weight", "200",
    )  # fmt: skip
    assert msg == pb.CreateLimitRequest(
        tenant="acme", kind="tokens", window="month", limit=5000, fail_mode="open", prompt_weight=50,
        completion_weight=200,
    )  # fmt: skip
    _, msg = req("limits", "create", "--tenant", "acme", "--kind", "concurrency", "--limit", "4")
    assert msg == pb.CreateLimitRequest(tenant="acme", kind="concurrency", limit=4, fail_mode="open")
    assert "--window is required" in usage_error(
        capsys, "limits", "create", "--tenant", "a", "--kind", "spend", "--limit", "4"
    )
    assert req("limits", "update", "lim_1", "--limit", "7", "--enforce", "--fail", "closed") == (
        "UpdateLimit",
        pb.UpdateLimitRequest(
            id="lim_1", update_mask=["limit", "shadow", "fail_mode"], limit=7, fail_mode="closed"
        ),
    )
    assert req("limits", "update", "lim_1", "--shadow")[1] == pb.UpdateLimitRequest(
        id="lim_1", update_mask=["shadow"], shadow=True
    )
    assert "nothing to update" in usage_error(capsys, "limits", "update", "lim_1")
    assert req("limits", "delete", "lim_1") == ("DeleteLimit", pb.DeleteLimitRequest(id="lim_1"))


@pytest.mark.parametrize(("flag", "value"), [("--limit", "-1"), ("--limit", "lots"), ("--window", "week")])
def test_limits_create_flag_errors(flag, value, capsys):
    args = {"--tenant": "t", "--kind": "requests", "--window": "day", "--limit": "1"} | {flag: value}
    assert f"argument {flag}" in usage_error(
        capsys, "limits", "create", *[x for kv in args.items() for x in kv]
    )


# --- paging and rendering ---------------------------------------------------------------------


class FakeServer:
    """Serves ``total`` audit events (or tenants) in pages of at most ``page_size``."""

    def __init__(self, total: int, response_type):
        self.total, self.response_type, self.requests = total, response_type, []

    def __call__(self, rpc, request):
        self.requests.append((rpc, type(request)(page_size=request.page_size, page_token=request.page_token)))
        start = int(request.page_token or 0)
        end = min(self.total, start + request.page_size)
        page = self.response_type(next_page_token=str(end) if end < self.total else "")
        for i in range(start, end):
            page.items.add(id=f"id{i}")
        return page


def test_list_commands_collect_every_page():
    args = build_parser().parse_args(["tenants", "list"])
    _, request = build_request(args)
    server = FakeServer(1234, pb.ListTenantsResponse)
    resp = fetch(server, args.admin_command, request)
    assert [t.id for t in resp.items] == [f"id{i}" for i in range(1234)]
    assert resp.next_page_token == ""
    assert [r.page_token for _, r in server.requests] == ["", "500", "1000"]
    assert {rpc for rpc, _ in server.requests} == {"ListTenants"}
    doc = json.loads(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    assert len(doc["items"]) == 1234


@pytest.mark.parametrize(
    ("limit", "total", "sizes", "count", "token"),
    [
        (100, 5000, [100], 100, "100"),
        (1200, 5000, [500, 500, 200], 1200, "1200"),
        (1000, 700, [500, 500], 700, ""),
        (500, 500, [500], 500, ""),
    ],
)
def test_audit_list_stops_at_limit_and_asks_for_no_more(limit, total, sizes, count, token):
    args = build_parser().parse_args(["audit", "list", "--limit", str(limit)])
    _, request = build_request(args)
    server = FakeServer(total, pb.ListAuditEventsResponse)
    resp = fetch(server, args.admin_command, request, args.max_items)
    assert [r.page_size for _, r in server.requests] == sizes
    assert len(resp.items) == count
    assert resp.next_page_token == token  # resumes right after the last event returned


def test_single_calls_are_not_paged():
    args = build_parser().parse_args(["tenants", "get", "acme"])
    calls = []
    resp = fetch(
        lambda rpc, r: calls.append((rpc, r)) or pb.GetTenantResponse(),
        args.admin_command,
        build_request(args)[1],
    )
    assert resp == pb.GetTenantResponse()
    assert calls == [("GetTenant", pb.GetTenantRequest(tenant="acme"))]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c.path))
def test_every_renderer_handles_a_sparse_response(command, capsys):
    response = getattr(pb, f"{command.rpc}Response")()
    if hasattr(response, "items"):
        response.items.add()
    _print_table(command.render(response))
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert lines[0] == lines[0].upper()  # a header (or field names) first


def test_created_secrets_are_printed_once_in_the_table():
    cmd = build_parser().parse_args(["keys", "create", "--tenant", "t"]).admin_command
    rows = cmd.render(pb.CreateApiKeyResponse(id="k1", key="tsk_x_secret"))
    assert ["KEY (shown once)", "tsk_x_secret"] in rows
    cmd = build_parser().parse_args(["principals", "create", "p"]).admin_command
    rows = cmd.render(pb.CreatePrincipalResponse(principal=pb.Principal(name="p"), key="tadm_secret"))
    assert ["ADMIN KEY (shown once)", "tadm_secret"] in rows
