"""Train -> evaluate -> export -> register -> approve -> promote, through the real gateway.

The training service runs with its production wiring: training sets through the gateway
from `FeaturesService.GetHistoricalFeatures` (streamed Arrow batches, with the service's
own identity and the gateway's Casbin policy), and audit events into the gateway's real,
hash-chained audit log. The features service itself is being built elsewhere and is not
ready, so `ParquetFeaturesService` below stands in for it: it answers that one RPC per
the contract in proto/falaj/features/v1 from Parquet files.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as fm
from falaj.features.v1 import request_response_pb2 as fr
from falaj.features.v1 import service_pb2_grpc as features_grpc
from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gateway_grpc
from falaj.training.v1 import message_pb2 as pb
from falaj.training.v1 import request_response_pb2 as rr
from falaj.training.v1 import service_pb2_grpc as training_grpc
from falaj_platform.gateway.server import Gateway, start_gateway
from falaj_platform.pki import PKI
from falaj_platform.runtime import tls
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID, client_id
from falaj_platform.runtime.server import RunningServer, create_server
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import load_settings
from falaj_platform.services.training.api import TrainingApi
from falaj_platform.services.training.config import TrainingConfig
from falaj_platform.services.training.server import build_spec
from tests.backends import backend_env
from tests.conftest import free_port, identity
from tests.training.conftest import FEATURES, FINAL_STATES, classification_table, job_spec

CLIENTS = {"sam": "data-scientist", "mia": "ml-engineer", "root": "admin"}


class ParquetFeaturesService(features_grpc.FeaturesServiceServicer):
    """GetHistoricalFeatures per the features contract, from `<root>/<dataset>/<version>.parquet`."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[fr.GetHistoricalFeaturesRequest] = []
        self.consent_filter = True  # False: answers as a features service that cannot filter by consent

    def GetHistoricalFeatures(
        self, request: fr.GetHistoricalFeaturesRequest, context: grpc.ServicerContext
    ) -> Iterator[fr.GetHistoricalFeaturesResponse]:
        self.requests.append(request)
        if request.consent_purpose and not self.consent_filter:
            raise FailedPrecondition("consent_purpose filtering is not available", reason="CONSENT_FILTER_UNAVAILABLE")
        source = request.entity_dataset
        _, dataset, _, version = source.dataset_version.split("/")
        table = pq.read_table(self.root / dataset / f"{version}.parquet")
        references = list(request.features.features.references)
        columns = {"customer_id": table.column("customer_id"), "event_timestamp": table.column("event_timestamp")}
        for carried in source.carry_columns:
            if carried not in table.column_names:
                raise InvalidArgument(f"carry column {carried!r} is not in {source.dataset_version}")
            columns[carried] = table.column(carried)
        for reference in references:
            view, feature = reference.split(":")
            if f"{view}__{feature}" not in table.column_names:
                raise NotFound(f"feature view {view!r} has no feature {feature!r}")
            columns[f"{view}__{feature}" if request.full_feature_names else feature] = table.column(f"{view}__{feature}")
        joined = pa.table(columns)
        digest = hashlib.sha256()
        for start in range(0, joined.num_rows, 100):
            part = joined.slice(start, 100)
            sink = pa.BufferOutputStream()
            with pyarrow.ipc.new_stream(sink, part.schema) as writer:
                writer.write_table(part)
            data = sink.getvalue().to_pybytes()
            digest.update(data)
            yield fr.GetHistoricalFeaturesResponse(
                batch=common_pb2.ArrowBatch(arrow_ipc=data, batch_id=str(start), row_count=part.num_rows)
            )
        yield fr.GetHistoricalFeaturesResponse(
            manifest=fm.RetrievalManifest(
                retrieval_id=f"retrieval-{uuid.uuid4().hex[:12]}",
                feature_references=references,
                feature_views=[
                    fm.FeatureViewSnapshot(feature_view="featureViews/customer", dataset_version="datasets/customer-profile/versions/3")
                ],
                entity_dataset_version=source.dataset_version,
                row_count=joined.num_rows,
                rows_excluded_without_consent=0,
                content_hash=digest.hexdigest(),
            )
        )


@dataclass
class Stack:
    gateway: Gateway
    features: RunningServer
    features_service: ParquetFeaturesService
    training: RunningServer
    training_database: Database
    pki: PKI
    addr: str
    data_root: Path

    def channel(self, client: str) -> grpc.Channel:
        credentials = tls.channel_credentials(identity(self.pki, "client", client))
        return grpc.secure_channel(self.addr, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway-flow")
    for name, role in CLIENTS.items():
        if not (pki.client_dir(name) / "cert.pem").exists():
            pki.issue_client(name, role=role)
    gateway_addr = f"127.0.0.1:{free_port()}"
    env = {
        **backend_env(root / "home"),
        "FALAJ_HOME": str(root / "home"),
        "FALAJ_PKI_DIR": str(pki.root),
        "FALAJ_LOG_LEVEL": "warning",
        "FALAJ_GATEWAY_ADDR": gateway_addr,
        "FALAJ_RELOAD_SECONDS": "0.2",
    }
    features_service = ParquetFeaturesService(root / "datasets")  # type: ignore[abstract]

    def register_features(server: grpc.Server) -> list[str]:
        features_grpc.add_FeaturesServiceServicer_to_server(features_service, server)
        return ["falaj.features.v1.FeaturesService"]

    features = create_server(
        load_settings("features", env=env), register_features, listen_addr="127.0.0.1:0", allowed_peers=frozenset({GATEWAY_SPIFFE_ID})
    )
    env["FALAJ_FEATURES_ADDR"] = f"127.0.0.1:{features.port}"
    holder: dict[str, TrainingApi] = {}
    # Production wiring (features through the gateway, the gateway's audit log); only the config is the tests'.
    spec = build_spec(config=TrainingConfig(prewarm_workers=1), on_api=lambda api: holder.setdefault("api", api), cuda_devices=lambda: 0)
    training, database = start_service(spec, load_settings("training", env=env), listen_addr="127.0.0.1:0")
    env["FALAJ_TRAINING_ADDR"] = f"127.0.0.1:{training.port}"
    gateway = start_gateway(load_settings("gateway", env=env))
    stack = Stack(gateway, features, features_service, training, database, pki, gateway_addr, root / "datasets")
    yield stack
    holder["api"].close()
    gateway.stop(0)
    training.stop(0)
    database.dispose()
    features.stop(0)


def wait(stub: training_grpc.TrainingServiceStub, name: str, timeout: float = 60) -> pb.TrainingJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetTrainingJob(rr.GetTrainingJobRequest(name=name), timeout=10).training_job
        if job.state in FINAL_STATES:
            return job
        time.sleep(0.1)
    raise AssertionError(f"{name} did not finish")


def audit_events(stack: Stack, event_type: int) -> list[gm.AuditRecord]:
    with stack.channel("root") as channel:
        admin = gateway_grpc.GatewayAdminServiceStub(channel)
        request = gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(event_type=event_type), page_size=1000)  # type: ignore[arg-type]
        return list(admin.QueryAuditRecords(request, timeout=10).records)


def test_train_register_approve_and_promote_through_the_gateway(stack: Stack) -> None:
    data = classification_table(rows=300, seed=2)
    (stack.data_root / "churn").mkdir(parents=True)
    pq.write_table(data, stack.data_root / "churn" / "1.parquet")
    sam = training_grpc.TrainingServiceStub(stack.channel("sam"))
    mia = training_grpc.TrainingServiceStub(stack.channel("mia"))

    spec = job_spec("datasets/churn/versions/1", "churn", family=pb.MODEL_FAMILY_MLP, epochs=6)
    spec.model.mlp.hidden_sizes[:] = [8]
    created = sam.CreateTrainingJob(rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=spec), request_id="gw-job-1"), timeout=10)
    job = wait(sam, created.training_job.name)
    assert job.state == pb.TRAINING_JOB_STATE_SUCCEEDED, job.failure
    assert job.create_stamp.actor == client_id("sam")
    # The training set came from GetHistoricalFeatures through the gateway, as streamed batches.
    request = stack.features_service.requests[0]
    assert list(request.features.features.references) == list(FEATURES)
    assert request.consent_purpose == "training" and list(request.entity_dataset.carry_columns) == ["churned"]
    assert job.data_summary.retrieval_id.startswith("retrieval-")
    assert list(job.data_summary.dataset_versions) == ["datasets/churn/versions/1", "datasets/customer-profile/versions/3"]
    assert job.data_summary.train_rows + job.data_summary.validation_rows + job.data_summary.holdout_rows == 300
    version = sam.GetModelVersion(rr.GetModelVersionRequest(name=job.model_version), timeout=10).model_version
    assert version.trained_by == client_id("sam") and version.lineage.retrieval_id == job.data_summary.retrieval_id

    promotion = sam.CreatePromotionRequest(
        rr.CreatePromotionRequestRequest(
            parent="models/churn", model_version=job.model_version, alias="production", justification="first model"
        ),
        timeout=10,
    ).promotion_request
    with pytest.raises(grpc.RpcError) as refused:
        sam.ApprovePromotionRequest(rr.ApprovePromotionRequestRequest(name=promotion.name), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    approved = mia.ApprovePromotionRequest(rr.ApprovePromotionRequestRequest(name=promotion.name, comment="looks good"), timeout=10)
    assert dict(approved.registered_model.aliases) == {"production": job.model_version}

    approvals = [r for r in audit_events(stack, gm.SECURITY_EVENT_TYPE_MODEL_APPROVED) if r.resource == promotion.name]
    assert [(r.caller, r.decision) for r in approvals] == [(client_id("sam"), gm.DECISION_DENY), (client_id("mia"), gm.DECISION_ALLOW)]
    assert all(r.reporter == "spiffe://falaj.local/service/training" for r in approvals)
    (promoted,) = [r for r in audit_events(stack, gm.SECURITY_EVENT_TYPE_MODEL_PROMOTED) if r.resource == job.model_version]
    assert promoted.caller == client_id("mia") and promoted.attributes["alias"] == "production"

    # A challenger is gated against production on the same held-out rows; the spec asks
    # for an impossible improvement, so it is not registered.
    spec.seed = 8
    spec.evaluation.gate.min_improvement = 0.5
    spec.registration.require_gate_pass = True
    challenger = wait(
        sam, sam.CreateTrainingJob(rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=spec)), timeout=10).training_job.name
    )
    assert challenger.state == pb.TRAINING_JOB_STATE_SUCCEEDED, challenger.failure
    gate = challenger.gate_result
    assert not gate.passed and gate.baseline_model_version == job.model_version
    assert "same held-out rows" in gate.reason and gate.metric == "roc_auc"
    assert challenger.model_version == ""
    assert sam.GetRegisteredModel(rr.GetRegisteredModelRequest(name="models/churn"), timeout=10).registered_model.latest_version_number == 1

    # An unknown feature is reported by the features service and fails the job.
    bad = job_spec("datasets/churn/versions/1", "churn-bad", features=("customer:tenure", "customer:shoe_size"))
    failed = wait(
        sam, sam.CreateTrainingJob(rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=bad)), timeout=10).training_job.name
    )
    assert failed.state == pb.TRAINING_JOB_STATE_FAILED and failed.failure.reason == pb.FAILURE_REASON_UNKNOWN_FEATURE
    assert "shoe_size" in failed.failure.message

    # A features service that cannot leave out rows without training consent trains nothing.
    stack.features_service.consent_filter = False
    try:
        spec.registration.require_gate_pass = False
        unfiltered = wait(
            sam, sam.CreateTrainingJob(rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=spec)), timeout=10).training_job.name
        )
    finally:
        stack.features_service.consent_filter = True
    assert unfiltered.state == pb.TRAINING_JOB_STATE_FAILED and unfiltered.failure.reason == pb.FAILURE_REASON_POLICY_DENIED
    assert "consent" in unfiltered.failure.message and unfiltered.model_version == ""

    # Serving-side download through the gateway over mTLS: the verified artifact.
    chunks = list(mia.DownloadModelArtifact(rr.DownloadModelArtifactRequest(name="models/churn/versions/production"), timeout=10))
    content = b"".join(m.chunk.data for m in chunks[1:])
    assert hashlib.sha256(content).hexdigest() == chunks[0].header.sha256 == version.artifact.sha256
    assert list(chunks[0].header.signature.inputs[0].feature_references) == list(FEATURES)
