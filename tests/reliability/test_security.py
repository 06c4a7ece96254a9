"""Security through the real gateway: method-name tricks, caller spoofing, replayed writes, audited
denials for every role x method, and what a permitted caller can read off the ingest host.

Complements tests/gateway (authentication, a 16-method role matrix by hand, one audited
denial) with runs over every method of every contract and the cases those do not cover.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pyarrow as pa
import pytest

from falaj.common.v1 import common_pb2 as common
from falaj.experiments.v1 import message_pb2 as em
from falaj.experiments.v1 import request_response_pb2 as er
from falaj.experiments.v1 import service_pb2_grpc as es
from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gs
from falaj.ingest.v1 import message_pb2 as im
from falaj.ingest.v1 import request_response_pb2 as ir
from falaj.ingest.v1 import service_pb2_grpc as isvc
from falaj.training.v1 import message_pb2 as tm
from falaj.training.v1 import request_response_pb2 as tr
from falaj.training.v1 import service_pb2_grpc as ts
from falaj_platform.runtime.identity import client_id
from tests.gateway.conftest import CLIENTS, Platform
from tests.reliability.messages import Rpc, platform_rpcs

LIST_DATASETS = "/falaj.ingest.v1.IngestService/ListDatasets"


def _admin(platform: Platform) -> gs.GatewayAdminServiceStub:
    return gs.GatewayAdminServiceStub(platform.channel("root"))


def _call(channel: grpc.Channel, rpc: Rpc | str, request_id: str, payload: bytes = b"") -> grpc.StatusCode:
    """One call with an empty (valid) message of any kind; its status code."""
    path = rpc if isinstance(rpc, str) else rpc.path
    client_streaming = not isinstance(rpc, str) and rpc.client_streaming
    server_streaming = not isinstance(rpc, str) and rpc.server_streaming
    metadata = [("x-request-id", request_id)]
    try:
        if client_streaming and server_streaming:
            list(channel.stream_stream(path)(iter([payload]), timeout=30, metadata=metadata))
        elif client_streaming:
            channel.stream_unary(path)(iter([payload]), timeout=30, metadata=metadata)
        elif server_streaming:
            list(channel.unary_stream(path)(payload, timeout=30, metadata=metadata))
        else:
            channel.unary_unary(path)(payload, timeout=30, metadata=metadata)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def _audit_records(platform: Platform, **filters: object) -> list[gm.AuditRecord]:
    stub = _admin(platform)
    records: list[gm.AuditRecord] = []
    token = ""
    while True:
        page = stub.QueryAuditRecords(
            gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(**filters), page_size=1000, page_token=token),  # type: ignore[arg-type]
            timeout=30,
        )
        records.extend(page.records)
        token = page.next_page_token
        if not token:
            return records


def _service_calls(platform: Platform) -> float:
    """Calls the services handled, health checks left out (read from their Prometheus registries)."""
    total = 0.0
    for running, _ in platform.services.values():
        for metric in running.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "falaj_grpc_requests_total" and not sample.labels["method"].startswith("/grpc."):
                    total += sample.value
    return total


# -- method names ---------------------------------------------------------------------------------

METHOD_TRICKS = [
    "/falaj.ingest.v1.IngestService/../x",
    "/falaj.ingest.v1.IngestService/../../falaj.gateway.v1.GatewayAdminService/ListPolicies",
    "/falaj.ingest.v1.IngestService/ListDatasets/../DeleteDataset",
    "/falaj.ingest.v1.IngestService/ListDatasets/",
    "/falaj.ingest.v1.IngestService//ListDatasets",
    "//falaj.ingest.v1.IngestService/ListDatasets",
    "/falaj.ingest.v1.IngestService/./ListDatasets",
    "/falaj.ingest.v1.IngestService/List%44atasets",
    "/falaj.ingest.v1.IngestService/ListDatasets%2F..%2FDeleteDataset",
    "/falaj.ingest.v1.IngestService/ListDatasets?x=1",
    "/falaj.ingest.v1.IngestService/ListDatasets#x",
    "/falaj.ingest.v1.IngestService/ListDatasets;x",
    "/falaj.ingest.v1.IngestService\\ListDatasets",
    "/FALAJ.INGEST.V1.INGESTSERVICE/LISTDATASETS",
    "/falaj.ingest.v1.IngestServiceX/ListDatasets",
    "/falaj.ingest.v1/ListDatasets",
    "/falaj.ingest.v2.IngestService/ListDatasets",
    "/falaj.ingest.v1.IngestSer\u03bdice/ListDatasets",  # Greek nu
    "/falaj.ingest.v1.IngestService/ListDataset\u0455",  # Cyrillic dze
    "/\uff46alaj.ingest.v1.IngestService/ListDatasets",  # fullwidth f
    "/grpc.health.v1.Health/../falaj.ingest.v1.IngestService/DeleteDataset",
    "/grpc.health.v1.Health/Check/../../falaj.ingest.v1.IngestService/DeleteDataset",
    "/grpc.health.v1.Health/DeleteDataset",
    "/grpc.health.v1.HealthCheck/x",
    "/grpc.reflection.v1alpha.ServerReflection/../../falaj.gateway.v1.GatewayAdminService/CreatePolicy",
    "/grpc.health.v1.Health.falaj.ingest.v1.IngestService/ListDatasets",
    "/inference.GRPCInferenceService/../../falaj.ingest.v1.IngestService/DeleteDataset",
    "/feast.serving.ServingService/../GetOnlineFeatures",
    "/",
]


@pytest.mark.parametrize("client", ["root", "nobody"])
def test_path_tricks_in_method_names_reach_no_service_handler(falaj_platform: Platform, client: str) -> None:
    """Whether refused as unknown (UNIMPLEMENTED) or by policy, a trick never runs a service method."""
    channel = falaj_platform.channel(client)
    before = _service_calls(falaj_platform)
    outcomes: dict[str, grpc.StatusCode | str] = {}
    for index, method in enumerate(METHOD_TRICKS):
        request_id = f"trick-{client}-{index}"
        try:
            outcomes[method] = _call(channel, method, request_id)
        except (ValueError, UnicodeError) as error:  # the client library refuses to send it at all
            outcomes[method] = f"refused by the client: {type(error).__name__}"
    assert _service_calls(falaj_platform) == before, outcomes
    accepted = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL}
    unexpected = {m: o for m, o in outcomes.items() if isinstance(o, grpc.StatusCode) and o not in accepted}
    assert not unexpected, unexpected
    # Every policy denial among them is in the audit log.
    denied = [f"trick-{client}-{i}" for i, m in enumerate(METHOD_TRICKS) if outcomes[m] is grpc.StatusCode.PERMISSION_DENIED]
    for request_id in denied:
        (record,) = _audit_records(falaj_platform, request_id=request_id)
        assert record.decision == gm.DECISION_DENY and record.caller == client_id(client)


def test_health_paths_answer_the_gateways_own_health_only(falaj_platform: Platform) -> None:
    """An identity with no role gets the gateway's health (an open method), and nothing behind it."""
    channel = falaj_platform.channel("nobody")
    before = _service_calls(falaj_platform)
    assert _call(channel, "/grpc.health.v1.Health/Check", "health-open") is grpc.StatusCode.OK
    assert _call(channel, LIST_DATASETS, "health-then-list") is grpc.StatusCode.PERMISSION_DENIED
    assert _service_calls(falaj_platform) == before


def test_a_spoofed_caller_header_does_not_change_who_a_write_is_attributed_to(falaj_platform: Platform) -> None:
    """root writes while claiming to be vic: the stored actor and the audit record name root.
    (tests/gateway covers the other direction: a spoofed admin identity gets no access.)"""
    stub = isvc.IngestServiceStub(falaj_platform.channel("root"))
    spoof = [("x-falaj-caller", client_id("vic")), ("x-request-id", "spoofed-create")]
    dataset = im.Dataset(schema=_schema(), residency=common.Residency(region="ae-dxb"))
    created = stub.CreateDataset(ir.CreateDatasetRequest(dataset_id="spoofed", dataset=dataset), metadata=spoof, timeout=30).dataset
    assert created.create_stamp.actor == client_id("root")
    (record,) = _audit_records(falaj_platform, request_id="spoofed-create")
    assert record.caller == client_id("root")


# -- replayed writes -------------------------------------------------------------------------------


def _schema() -> im.Schema:
    return im.Schema(
        columns=[
            im.Column(name="customer_id", type=im.COLUMN_TYPE_STRING),
            im.Column(name="amount", type=im.COLUMN_TYPE_FLOAT),
        ]
    )


def _replay_ingest(platform: Platform) -> tuple[grpc.StatusCode, bool]:
    stub = isvc.IngestServiceStub(platform.channel("root"))
    dataset = im.Dataset(schema=_schema(), residency=common.Residency(region="ae-dxb"))
    first = ir.CreateDatasetRequest(dataset_id="replayed_a", dataset=dataset, request_id="replay-ingest")
    answer = stub.CreateDataset(first, timeout=30)
    assert stub.CreateDataset(first, timeout=30) == answer  # the same body: the first answer again
    other = ir.CreateDatasetRequest(dataset_id="replayed_b", dataset=dataset, request_id="replay-ingest")
    code = _code(lambda: stub.CreateDataset(other, timeout=30))
    names = {d.name for d in stub.ListDatasets(ir.ListDatasetsRequest(page_size=1000), timeout=30).datasets}
    return code, "datasets/replayed_b" not in names


def _replay_training(platform: Platform) -> tuple[grpc.StatusCode, bool]:
    stub = ts.TrainingServiceStub(platform.channel("root"))

    def spec(epochs: int) -> tm.TrainingJobSpec:
        return tm.TrainingJobSpec(
            data=tm.TrainingDataSpec(
                feature_list=tm.FeatureList(references=["customer:spend"]),
                entities=tm.EntityFrame(dataset_version="datasets/none/versions/1"),
                label_column="churned",
            ),
            task=tm.TASK_TYPE_BINARY_CLASSIFICATION,
            model=tm.ModelSpec(family=tm.MODEL_FAMILY_LOGISTIC_REGRESSION),
            hyperparameters=tm.Hyperparameters(learning_rate=0.05, epochs=epochs, batch_size=32),
            seed=7,
            registration=tm.RegistrationSpec(registered_model="models/replayed"),
        )

    def create(epochs: int, job_id: str) -> tr.CreateTrainingJobResponse:
        request = tr.CreateTrainingJobRequest(
            training_job=tm.TrainingJob(spec=spec(epochs)), training_job_id=job_id, request_id="replay-training"
        )
        return stub.CreateTrainingJob(request, timeout=30)  # type: ignore[no-any-return]

    answer = create(3, "replayed-a")
    assert create(3, "replayed-a").training_job.name == answer.training_job.name
    code = _code(lambda: create(4, "replayed-b"))
    jobs = {j.name for j in stub.ListTrainingJobs(tr.ListTrainingJobsRequest(page_size=100), timeout=30).training_jobs}
    return code, "trainingJobs/replayed-b" not in jobs


def _replay_experiments(platform: Platform) -> tuple[grpc.StatusCode, bool]:
    stub = es.ExperimentsServiceStub(platform.channel("root"))
    experiment = em.Experiment(
        display_name="Replay",
        variants=[
            em.Variant(variant_id="control", control=True, deployment="deployments/replay-control"),
            em.Variant(variant_id="treatment", deployment="deployments/replay-treatment"),
        ],
        allocation=em.Allocation(
            coverage_bps=10_000,
            weights=[em.VariantWeight(variant_id="control", weight_bps=5000), em.VariantWeight(variant_id="treatment", weight_bps=5000)],
        ),
        hashing=em.HashingConfig(unit_attribute="user_id"),
        metrics=[em.MetricDefinition(metric_id="converted", type=em.METRIC_TYPE_BINARY, role=em.METRIC_ROLE_PRIMARY)],
    )
    stub.CreateExperiment(er.CreateExperimentRequest(experiment_id="replayed", experiment=experiment), timeout=30)
    stub.StartExperiment(er.StartExperimentRequest(name="experiments/replayed"), timeout=30)
    units = [er.AssignmentUnit(unit_id=f"user-{i}") for i in range(4)]
    assigned = stub.BatchAssignVariants(
        er.BatchAssignVariantsRequest(experiment="experiments/replayed", units=units), timeout=30
    ).assignments
    exposures = [em.Exposure(event_id=f"e-{a.unit_id}", unit_id=a.unit_id, variant_id=a.variant_id) for a in assigned]
    first = er.RecordExposuresRequest(experiment="experiments/replayed", request_id="replay-exposures", exposures=exposures[:2])
    answer = stub.RecordExposures(first, timeout=30)
    assert answer.accepted_count == 2
    assert stub.RecordExposures(first, timeout=30) == answer
    other = er.RecordExposuresRequest(experiment="experiments/replayed", request_id="replay-exposures", exposures=exposures)
    code = _code(lambda: stub.RecordExposures(other, timeout=30))
    # Nothing of the refused body was counted: the last two exposures are new under another id.
    fresh = stub.RecordExposures(
        er.RecordExposuresRequest(experiment="experiments/replayed", request_id="replay-exposures-2", exposures=exposures[2:]), timeout=30
    )
    return code, fresh.accepted_count == 2


def _replay_gateway(platform: Platform) -> tuple[grpc.StatusCode, bool]:
    stub = _admin(platform)

    def policy(obj: str) -> gr.CreatePolicyRequest:
        line = gm.Policy(subject=client_id("nobody"), domain="*", object=obj, action="read")
        return gr.CreatePolicyRequest(policy=line, request_id="replay-policy")

    first = policy("/falaj.monitoring.v1.MonitoringService/ListAlerts")
    answer = stub.CreatePolicy(first, timeout=30)
    assert stub.CreatePolicy(first, timeout=30) == answer
    code = _code(lambda: stub.CreatePolicy(policy("/falaj.monitoring.v1.MonitoringService/ListAlertRules"), timeout=30))
    check = stub.CheckAccess(
        gr.CheckAccessRequest(subject=client_id("nobody"), object="/falaj.monitoring.v1.MonitoringService/ListAlertRules"), timeout=30
    )
    for created in stub.ListPolicies(gr.ListPoliciesRequest(subject=client_id("nobody")), timeout=30).policies:
        stub.DeletePolicy(gr.DeletePolicyRequest(name=created.name), timeout=30)
    return code, check.decision == gm.DECISION_DENY


def _code(action: object) -> grpc.StatusCode:
    try:
        action()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


REPLAYS = {
    "ingest-CreateDataset": _replay_ingest,
    "training-CreateTrainingJob": _replay_training,
    "experiments-RecordExposures": _replay_experiments,
    "gateway-CreatePolicy": _replay_gateway,
}


@pytest.mark.parametrize("write", sorted(REPLAYS))
def test_a_request_id_replayed_with_another_body_is_refused_and_changes_nothing(falaj_platform: Platform, write: str) -> None:
    code, unchanged = REPLAYS[write](falaj_platform)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert unchanged, "the refused body still took effect"


# -- every role x every method: enforcement equals the policy, and every decision is audited ----------

EVERY_RPC = list(platform_rpcs())


@pytest.fixture(scope="module")
def matrix(falaj_platform: Platform) -> Iterator[dict[tuple[str, str], tuple[grpc.StatusCode, str]]]:
    """(client, method) -> (status code, request id) for every client identity and every method."""
    outcomes = {}
    run = uuid.uuid4().hex[:6]
    for client in sorted(CLIENTS):
        channel = falaj_platform.channel(client)
        for index, rpc in enumerate(EVERY_RPC):
            request_id = f"matrix-{run}-{client}-{index}"
            outcomes[(client, rpc.path)] = (_call(channel, rpc, request_id), request_id)
    yield outcomes


def test_enforcement_for_every_role_and_method_matches_the_policy_engines_answer(
    falaj_platform: Platform, matrix: dict[tuple[str, str], tuple[grpc.StatusCode, str]]
) -> None:
    admin = _admin(falaj_platform)
    mismatches = []
    for (client, method), (code, _) in matrix.items():
        check = admin.CheckAccess(gr.CheckAccessRequest(subject=client_id(client), domain="ae-dxb", object=method), timeout=30)
        denied = code is grpc.StatusCode.PERMISSION_DENIED
        if denied != (check.decision == gm.DECISION_DENY):
            mismatches.append(f"{client} {method}: call {code.name}, CheckAccess {gm.Decision.Name(check.decision)}")
    assert not mismatches, mismatches
    # The matrix is not trivially all-allow or all-deny.
    assert {code for code, _ in matrix.values()} >= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}


def test_every_call_of_the_matrix_has_one_audit_record_with_its_decision(
    falaj_platform: Platform, matrix: dict[tuple[str, str], tuple[grpc.StatusCode, str]]
) -> None:
    by_request = {}
    for record in _audit_records(falaj_platform, kind=gm.AUDIT_RECORD_KIND_CALL):
        by_request.setdefault(record.request_id, []).append(record)
    missing, wrong = [], []
    for (client, method), (code, request_id) in matrix.items():
        records = by_request.get(request_id, [])
        if len(records) != 1:
            missing.append(f"{client} {method}: {len(records)} records")
            continue
        (record,) = records
        expected = gm.DECISION_DENY if code is grpc.StatusCode.PERMISSION_DENIED else gm.DECISION_ALLOW
        if (record.decision, record.caller, record.method, record.status_code) != (expected, client_id(client), method, code.value[0]):
            wrong.append(f"{client} {method}: {record.decision} {record.caller} {record.method} {record.status_code} for {code.name}")
    assert not missing, missing[:20]
    assert not wrong, wrong[:20]
    denials = sum(1 for code, _ in matrix.values() if code is grpc.StatusCode.PERMISSION_DENIED)
    assert denials > len(EVERY_RPC)  # `nobody` alone is denied every method


# -- what a data engineer can read off the ingest host ----------------------------------------------


def test_a_data_engineer_cannot_import_the_platforms_private_keys(falaj_platform: Platform) -> None:
    stub = isvc.IngestServiceStub(falaj_platform.channel("dora"))
    lines = im.Schema(columns=[im.Column(name="line", type=im.COLUMN_TYPE_STRING, nullable=True)])
    stub.CreateDataset(
        ir.CreateDatasetRequest(dataset_id="loot", dataset=im.Dataset(schema=lines, residency=common.Residency(region="ae-dxb"))),
        timeout=30,
    )
    spec = im.FileImportSpec(
        uri=str(falaj_platform.pki.ca_key_path), format=im.FILE_FORMAT_CSV, csv=im.CsvOptions(no_header_row=True, delimiter="\t")
    )
    try:
        imported = stub.ImportFile(ir.ImportFileRequest(dataset="datasets/loot", file=spec), timeout=60).ingestion
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
        return
    read = stub.ReadDatasetVersion(ir.ReadDatasetVersionRequest(name=imported.dataset_version), timeout=60)
    text = "\n".join(str(v) for r in read for v in pa.ipc.open_stream(r.batch.arrow_ipc).read_all().column("line").to_pylist())
    leaked = "PRIVATE KEY" in text
    assert not leaked, "the CA's private key left the ingest host"


def test_a_replacing_policy_import_keeps_the_built_in_roles(tmp_path: object) -> None:
    from pathlib import Path

    from falaj_platform.pki import PKI
    from tests.gateway.conftest import stop_platform
    from tests.reliability.conftest import start_falaj

    root = Path(str(tmp_path))
    pki = PKI(root / "pki")
    pki.init()
    platform = start_falaj(root / "home", pki)
    try:
        admin = _admin(platform)
        line = "p, spiffe://falaj.local/client/nobody, *, /falaj.ingest.v1.IngestService/ListDatasets, read\n"
        admin.ImportPolicies(gr.ImportPoliciesRequest(casbin_csv=line, mode=gm.IMPORT_MODE_REPLACE), timeout=30)
        time.sleep(0.5)  # past a reload
        remaining = {stored.line.csv() for stored in platform.gateway.store.lines()}
        assert any(line.startswith("p, admin, *, *, *") for line in remaining), f"{len(remaining)} lines left: {sorted(remaining)[:5]}"
        assert _call(platform.channel("root"), "/falaj.gateway.v1.GatewayAdminService/ListPolicies", "after-replace") is grpc.StatusCode.OK
    finally:
        stop_platform(platform)


@pytest.mark.sqlite_only  # reads the gateway's SQLite file; PostgreSQL: tests/ingest/test_source_access.py
def test_a_data_engineer_cannot_import_the_platforms_own_databases(falaj_platform: Platform) -> None:
    stub = isvc.IngestServiceStub(falaj_platform.channel("dora"))
    lines = im.Schema(columns=[im.Column(name="line", type=im.COLUMN_TYPE_STRING, nullable=True)])
    dataset = im.Dataset(schema=lines, residency=common.Residency(region="ae-dxb"))
    stub.CreateDataset(ir.CreateDatasetRequest(dataset_id="sql_loot", dataset=dataset), timeout=30)
    gateway_db = falaj_platform.home / "gateway" / "gateway.db"
    assert gateway_db.exists()
    spec = im.SqlImportSpec(
        sqlalchemy_url=f"sqlite:///{gateway_db}", query="select v0 || ' ' || v2 as line from policy_rules", mode=im.SQL_IMPORT_MODE_FULL
    )
    with pytest.raises(grpc.RpcError) as refused:
        imported = stub.ImportSql(ir.ImportSqlRequest(dataset="datasets/sql_loot", sql=spec), timeout=60).ingestion
        pytest.fail(f"{imported.report.rows_accepted} rows of the gateway's policy store imported")
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value.details()  # type: ignore[attr-defined]
    # The refusal is on record as a denial, reported by ingest with the caller and the dataset.
    events = _audit_records(falaj_platform, kind=gm.AUDIT_RECORD_KIND_SECURITY_EVENT)
    denials = [r for r in events if r.resource == "datasets/sql_loot" and r.action == "import_sql"]
    assert [(r.decision, r.caller, r.attributes["refusal_reason"]) for r in denials] == [
        (gm.DECISION_DENY, client_id("dora"), "PROTECTED_PATH")
    ]
