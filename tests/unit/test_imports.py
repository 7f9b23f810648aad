"""Guards against protobuf packaging clashes (grpc/grpc#42830, #42926): xds-protos ships
its own google.* and opentelemetry.proto modules, which must not shadow or break the
official ones, whatever the install order."""

from __future__ import annotations

import importlib


def test_xds_protos_google_types_coexist_with_protobuf():
    from google.protobuf import any_pb2, struct_pb2  # noqa: PLC0415

    importlib.import_module("envoy.service.auth.v3.external_auth_pb2")
    importlib.import_module("envoy.service.ratelimit.v3.rls_pb2")
    importlib.import_module("envoy.service.discovery.v3.ads_pb2_grpc")
    rpc_status = importlib.import_module("google.rpc.status_pb2")
    s = struct_pb2.Struct()
    s.update({"tenant_id": "t"})
    a = any_pb2.Any()
    a.Pack(s)
    assert a.Is(struct_pb2.Struct.DESCRIPTOR)
    assert rpc_status.Status(code=7).code == 7


def test_generated_tessera_code_matches_installed_grpc():
    admin_grpc = importlib.import_module("tessera.admin.v1.admin_pb2_grpc")
    policy_grpc = importlib.import_module("tessera.policy.v1.policy_pb2_grpc")
    assert hasattr(admin_grpc, "TenantServiceStub")
    assert hasattr(policy_grpc, "PolicyServiceServicer")
