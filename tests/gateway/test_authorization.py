"""Zero-trust authorization at the gateway: deny by default, roles x methods, reload, audit of denials."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gs
from falaj_platform.runtime.audit import AuditReporter, SecurityEvent
from falaj_platform.runtime.clients import secure_channel
from tests.gateway.conftest import Platform, call

R, W, P = "read", "write", "predict"
# A representative read and write (or predict) method of each service and of the admin API.
METHODS = {
    "/falaj.ingest.v1.IngestService/ListDatasets": ("ingest", R),
    "/falaj.ingest.v1.IngestService/CreateDataset": ("ingest", W),
    "/falaj.features.v1.FeaturesService/ListFeatureViews": ("features", R),
    "/falaj.features.v1.FeaturesService/Materialize": ("features", W),
    "/falaj.training.v1.TrainingService/ListRegisteredModels": ("training", R),
    "/falaj.training.v1.TrainingService/CreateTrainingJob": ("training", W),
    "/falaj.serving.v1.ServingService/ListDeployments": ("serving", R),
    "/falaj.serving.v1.ServingService/CreateDeployment": ("serving", W),
    "/falaj.experiments.v1.ExperimentsService/ListExperiments": ("experiments", R),
    "/falaj.experiments.v1.ExperimentsService/CreateExperiment": ("experiments", W),
    "/falaj.monitoring.v1.MonitoringService/ListAlertRules": ("monitoring", R),
    "/falaj.monitoring.v1.MonitoringService/CreateAlertRule": ("monitoring", W),
    "/inference.GRPCInferenceService/ServerLive": ("inference", R),
    "/inference.GRPCInferenceService/ModelInfer": ("inference", P),
    "/falaj.gateway.v1.GatewayAdminService/ListPolicies": ("gateway", R),
    "/falaj.gateway.v1.GatewayAdminService/QueryAuditRecords": ("gateway", R),
}
# What each role may do, written out by hand (not derived from the policy code).
EVERY_SERVICE = {"ingest", "features", "training", "serving", "experiments", "monitoring"}
GRANTS: dict[str, set[tuple[str, str]]] = {
    "root": {(svc, act) for svc in (*EVERY_SERVICE, "inference", "gateway") for act in (R, W, P)},
    "vic": {(svc, R) for svc in EVERY_SERVICE} | {("inference", R)},
    "dora": {(svc, R) for svc in EVERY_SERVICE} | {("ingest", W), ("features", W)},
    "sam": {(svc, R) for svc in EVERY_SERVICE} | {("training", W), ("experiments", W), ("inference", R), ("inference", P)},
    "mia": {(svc, R) for svc in EVERY_SERVICE}
    | {("training", W), ("serving", W), ("monitoring", W), ("experiments", W), ("inference", R), ("inference", P)},
    "nobody": set(),
}


@pytest.mark.parametrize("client", sorted(GRANTS))
def test_role_by_method_matrix_matches_the_policy(platform: Platform, client: str) -> None:
    channel = platform.channel(client)
    mismatches = []
    for method, (service, action) in METHODS.items():
        code = call(channel, method)
        allowed = code is not grpc.StatusCode.PERMISSION_DENIED
        if allowed != ((service, action) in GRANTS[client]):
            mismatches.append(f"{method}: got {code.name}")
    assert not mismatches, f"{client}: {mismatches}"


def test_every_denial_is_audited_with_its_reason(platform: Platform) -> None:
    channel = platform.channel("vic")
    method = "/falaj.ingest.v1.IngestService/DeleteDataset"
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(method)(b"", timeout=5, metadata=[("x-request-id", "deny-me-1")])
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    found = admin.QueryAuditRecords(gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(request_id="deny-me-1")), timeout=5).records
    assert len(found) == 1
    record = found[0]
    assert record.caller == "spiffe://falaj.local/client/vic"
    assert record.method == method and record.action == "write"
    assert record.decision == gm.DECISION_DENY
    assert record.decision_reason == gm.DECISION_REASON_NO_MATCHING_POLICY
    assert record.status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert record.source_address.startswith("ipv4:127.0.0.1:")


def test_allowed_calls_are_audited_with_outcome_and_duration(platform: Platform) -> None:
    channel = platform.channel("mia")
    channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=5, metadata=[("x-request-id", "live-1")])
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    (record,) = admin.QueryAuditRecords(gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(request_id="live-1")), timeout=5).records
    assert record.decision == gm.DECISION_ALLOW and record.status_code == 0
    assert record.duration.ToMicroseconds() > 0
    assert record.domain == "ae-dxb"


def test_policy_change_applies_without_restart_and_is_audited(platform: Platform) -> None:
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    nobody = platform.channel("nobody")
    method = "/falaj.serving.v1.ServingService/ListDeployments"
    assert call(nobody, method) is grpc.StatusCode.PERMISSION_DENIED
    policy = gm.Policy(subject="spiffe://falaj.local/client/nobody", domain="*", object=method, action="read")
    created = admin.CreatePolicy(gr.CreatePolicyRequest(policy=policy), timeout=5).policy
    assert call(nobody, method) is not grpc.StatusCode.PERMISSION_DENIED
    assert call(nobody, "/falaj.serving.v1.ServingService/DeleteDeployment") is grpc.StatusCode.PERMISSION_DENIED
    admin.DeletePolicy(gr.DeletePolicyRequest(name=created.name), timeout=5)
    assert call(nobody, method) is grpc.StatusCode.PERMISSION_DENIED
    events = admin.QueryAuditRecords(
        gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(event_type=gm.SECURITY_EVENT_TYPE_POLICY_CHANGED)), timeout=5
    ).records
    assert {e.action for e in events} >= {"add", "remove"}


def test_policy_writes_with_a_request_id_take_effect_once_and_a_duplicate_line_is_already_exists(platform: Platform) -> None:
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    policy = gm.Policy(
        subject="spiffe://falaj.local/client/nobody", domain="*", object="/falaj.ingest.v1.IngestService/GetDataset", action="read"
    )
    create = gr.CreatePolicyRequest(policy=policy, request_id="create-once")
    created = admin.CreatePolicy(create, timeout=5)
    revision = admin.ListPolicies(gr.ListPoliciesRequest(), timeout=5).policy_revision
    assert admin.CreatePolicy(create, timeout=5) == created  # the retry is answered, nothing written
    assert admin.ListPolicies(gr.ListPoliciesRequest(), timeout=5).policy_revision == revision
    with pytest.raises(grpc.RpcError) as duplicate:
        admin.CreatePolicy(gr.CreatePolicyRequest(policy=policy, request_id="create-again"), timeout=5)
    assert duplicate.value.code() is grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert created.policy.name in duplicate.value.details()  # type: ignore[attr-defined]
    delete = gr.DeletePolicyRequest(name=created.policy.name, request_id="delete-once")
    deleted = admin.DeletePolicy(delete, timeout=5)
    assert admin.DeletePolicy(delete, timeout=5) == deleted  # a retried delete is not NOT_FOUND
    with pytest.raises(grpc.RpcError) as gone:
        admin.DeletePolicy(gr.DeletePolicyRequest(name=created.policy.name), timeout=5)
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_explicit_deny_overrides_a_role_allow(platform: Platform) -> None:
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    method = "/falaj.training.v1.TrainingService/ListRegisteredModels"
    deny = gm.Policy(subject="spiffe://falaj.local/client/sam", domain="*", object=method, action="read", effect=gm.POLICY_EFFECT_DENY)
    created = admin.CreatePolicy(gr.CreatePolicyRequest(policy=deny), timeout=5).policy
    try:
        assert call(platform.channel("sam"), method) is grpc.StatusCode.PERMISSION_DENIED
        check = admin.CheckAccess(gr.CheckAccessRequest(subject="spiffe://falaj.local/client/sam", object=method), timeout=5)
        assert check.decision == gm.DECISION_DENY and check.reason == gm.DECISION_REASON_POLICY_DENY
        assert "data-scientist" in check.effective_roles
    finally:
        admin.DeletePolicy(gr.DeletePolicyRequest(name=created.name), timeout=5)


def test_domain_scoped_binding_applies_only_in_its_domain(platform: Platform) -> None:
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    binding = gm.RoleBinding(member="spiffe://falaj.local/client/nobody", role="data-engineer", domain="ae-auh")
    created = admin.CreateRoleBinding(gr.CreateRoleBindingRequest(binding=binding), timeout=5).binding
    nobody = platform.channel("nobody")
    method = "/falaj.ingest.v1.IngestService/CreateDataset"
    try:
        assert call(nobody, method, metadata=[("x-falaj-domain", "ae-auh")]) is not grpc.StatusCode.PERMISSION_DENIED
        assert call(nobody, method, metadata=[("x-falaj-domain", "ae-dxb")]) is grpc.StatusCode.PERMISSION_DENIED
        assert call(nobody, method) is grpc.StatusCode.PERMISSION_DENIED  # the gateway's own region, ae-dxb
        assert call(nobody, method, metadata=[("x-falaj-domain", "*")]) is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        admin.DeleteRoleBinding(gr.DeleteRoleBindingRequest(name=created.name), timeout=5)


def test_a_second_gateway_replica_follows_policy_changes(platform: Platform) -> None:
    from falaj_platform.gateway.server import start_gateway

    replica = start_gateway(platform.settings("gateway"), listen_addr="127.0.0.1:0")
    try:
        admin = gs.GatewayAdminServiceStub(platform.channel("root"))
        method = "/falaj.monitoring.v1.MonitoringService/ListAlerts"
        policy = gm.Policy(subject="spiffe://falaj.local/client/nobody", domain="*", object=method, action="read")
        created = admin.CreatePolicy(gr.CreatePolicyRequest(policy=policy), timeout=5).policy
        deadline = time.monotonic() + 5
        while replica.authorizer.revision < platform.gateway.authorizer.revision and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica.authorizer.decide("spiffe://falaj.local/client/nobody", "ae-dxb", method).allowed
        admin.DeletePolicy(gr.DeletePolicyRequest(name=created.name), timeout=5)
    finally:
        replica.stop(0)


def test_invalid_policy_lines_are_refused_with_their_reason(platform: Platform) -> None:
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    bad = [
        gm.Policy(subject="x", domain="*", object="/falaj.ingest.v1.IngestService", action="read"),
        gm.Policy(subject="x", domain="*", object="/falaj.ingest.v1.IngestService/../x", action="read"),
        gm.Policy(subject="x", domain="*", object="*", action="delete"),
        gm.Policy(subject="x", domain="AE DXB", object="*", action="read"),
    ]
    for policy in bad:
        with pytest.raises(grpc.RpcError) as raised:
            admin.CreatePolicy(gr.CreatePolicyRequest(policy=policy), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    imported = admin.ImportPolicies(gr.ImportPoliciesRequest(casbin_csv="p, a, *, *, read\nq, nonsense\n", dry_run=True), timeout=5)
    assert [e.line_number for e in imported.errors] == [2]


def test_a_disabled_enforcer_denies_everything(fresh_platform: Callable[..., Platform]) -> None:
    platform = fresh_platform()
    root = platform.channel("root")
    assert call(root, "/falaj.ingest.v1.IngestService/ListDatasets") is not grpc.StatusCode.PERMISSION_DENIED
    platform.gateway.authorizer.disable()
    assert call(root, "/falaj.ingest.v1.IngestService/ListDatasets") is grpc.StatusCode.PERMISSION_DENIED


def test_service_identity_may_report_audit_events_but_not_manage_policy(platform: Platform) -> None:
    settings = platform.settings("ingest", FALAJ_GATEWAY_ADDR=platform.gateway_addr)
    reporter = AuditReporter(settings)
    try:
        first = reporter.report(
            SecurityEvent.DATA_ERASED,
            resource="datasets/sales",
            action="erase",
            caller="spiffe://falaj.local/client/dora",
            report_id="erase-42",
        )
        again = reporter.report(
            SecurityEvent.DATA_ERASED,
            resource="datasets/sales",
            action="erase",
            caller="spiffe://falaj.local/client/dora",
            report_id="erase-42",
        )
        assert first.sequence == again.sequence  # a retried report is recorded once
        assert first.reporter == "spiffe://falaj.local/service/ingest"
        assert first.caller == "spiffe://falaj.local/client/dora"
    finally:
        reporter.close()
    with secure_channel(platform.gateway_addr, settings.pki) as channel:  # the ingest service's own identity
        assert call(channel, "/falaj.gateway.v1.GatewayAdminService/CreatePolicy") is grpc.StatusCode.PERMISSION_DENIED
        assert call(channel, "/falaj.ingest.v1.IngestService/ListDatasets") is grpc.StatusCode.PERMISSION_DENIED
