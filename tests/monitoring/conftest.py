"""The monitoring service in-process on a free port with its real store, reached over mTLS as
the gateway reaches it; a real in-process gRPC server standing in for the gateway (the
training, ingest and audit calls monitoring makes go to it); a real HTTP webhook receiver
on loopback."""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from falaj.common.v1 import common_pb2
from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.gateway.v1 import request_response_pb2 as gateway_requests
from falaj.gateway.v1 import service_pb2_grpc as gateway_service
from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj.ingest.v1 import service_pb2_grpc as ingest_service
from falaj.monitoring.v1 import message_pb2 as pb
from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj.monitoring.v1 import service_pb2_grpc
from falaj.training.v1 import message_pb2 as training_messages
from falaj.training.v1 import request_response_pb2 as training_requests
from falaj.training.v1 import service_pb2_grpc as training_service
from falaj_platform.pki import PKI
from falaj_platform.runtime import tls
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.identity import peer_spiffe_id
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.server import build_spec
from tests.conftest import caller, identity

# Logs of two days ago (inside the 30-day retention), on a whole hour.
T0 = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
MODEL_VERSION = "models/churn/versions/3"
FEATURES = ("tenure", "spend", "calls", "plan")


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for work the service's worker does in the background."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def arrow_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def batch(table: pa.Table, batch_id: str = "") -> common_pb2.ArrowBatch:
    return common_pb2.ArrowBatch(arrow_ipc=arrow_ipc(table), batch_id=batch_id, row_count=table.num_rows)


def reference_table(rows: int = 3000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    tenure = rng.normal(24, 8, rows)
    spend = rng.gamma(3.0, 20.0, rows)
    score = 1 / (1 + np.exp(-(0.05 * (spend - 60) - 0.05 * (tenure - 24))))
    return pa.table(
        {
            "tenure": tenure,
            "spend": spend,
            "calls": rng.poisson(3, rows).astype(np.int64),
            "plan": rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2]),
            "churn_score": score,
            "churn": (score >= 0.5).astype(np.int64),
        }
    )


def log_table(
    rows: int, *, start: int = 0, seed: int = 1, shift: float = 0.0, time0: dt.datetime = T0, step: dt.timedelta = dt.timedelta(seconds=1)
) -> pa.Table:
    """Prediction logs like the reference; `shift` moves tenure and spend by that many std."""
    rng = np.random.default_rng(seed)
    tenure = rng.normal(24 + 8 * shift, 8, rows)
    spend = rng.gamma(3.0, 20.0, rows) + 35 * shift
    score = 1 / (1 + np.exp(-(0.05 * (spend - 60) - 0.05 * (tenure - 24))))
    plan_p = [0.2, 0.3, 0.5] if shift else [0.5, 0.3, 0.2]
    return pa.table(
        {
            "request_id": [f"req-{start + i}" for i in range(rows)],
            "timestamp": pa.array([time0 + step * (start + i) for i in range(rows)], pa.timestamp("us", tz="UTC")),
            "latency_ms": rng.gamma(2.0, 10.0, rows),
            "status_code": pa.array([0] * rows, pa.int32()),
            "subject_id": [f"subject-{(start + i) % 50}" for i in range(rows)],
            "tenure": tenure,
            "spend": spend,
            "calls": rng.poisson(3 + 2 * shift, rows).astype(np.int64),
            "plan": rng.choice(["basic", "plus", "pro"], rows, p=plan_p),
            "churn_score": score,
            "churn": (score >= 0.5).astype(np.int64),
        }
    )


COLUMNS = [
    pb.ColumnSpec(name="tenure", type=pb.COLUMN_TYPE_NUMERICAL, role=pb.COLUMN_ROLE_FEATURE),
    pb.ColumnSpec(name="spend", type=pb.COLUMN_TYPE_NUMERICAL, role=pb.COLUMN_ROLE_FEATURE),
    pb.ColumnSpec(name="calls", role=pb.COLUMN_ROLE_FEATURE),
    pb.ColumnSpec(name="plan", role=pb.COLUMN_ROLE_FEATURE),
    pb.ColumnSpec(name="churn_score", type=pb.COLUMN_TYPE_NUMERICAL, role=pb.COLUMN_ROLE_PREDICTION_SCORE),
    pb.ColumnSpec(name="churn", type=pb.COLUMN_TYPE_CATEGORICAL, role=pb.COLUMN_ROLE_PREDICTION),
]


# -- a stand-in gateway: the calls monitoring makes to training, ingest and the audit log ------


@dataclass
class FakeGateway:
    """Records every call with the caller's certificate identity and answers like the services."""

    port: int = 0
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    training_down: bool = False
    reference: pa.Table | None = None

    def record(self, method: str, context: grpc.ServicerContext, request: Any) -> None:
        self.calls.append((method, peer_spiffe_id(context) or "", request))

    def named(self, method: str) -> list[Any]:
        return [request for name, _, request in self.calls if name == method]


class _Training(training_service.TrainingServiceServicer):
    def __init__(self, gateway: FakeGateway):
        self.gateway = gateway
        self.jobs: dict[str, training_messages.TrainingJob] = {}

    def GetTrainingJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.gateway.record("GetTrainingJob", context, request)
        if self.gateway.training_down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "training is restarting")
        if request.name != "trainingJobs/churn-base":
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        spec = training_messages.TrainingJobSpec(seed=7)
        spec.data.entities.dataset_version = "datasets/churn/versions/4"
        spec.hyperparameters.learning_rate = 0.001
        spec.hyperparameters.epochs = 10
        return training_requests.GetTrainingJobResponse(training_job=training_messages.TrainingJob(name=request.name, spec=spec))

    def CreateTrainingJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.gateway.record("CreateTrainingJob", context, request)
        existing = self.jobs.get(request.request_id)
        if existing is None:
            existing = training_messages.TrainingJob(
                name=f"trainingJobs/retrain-{len(self.jobs) + 1}", state=training_messages.TRAINING_JOB_STATE_QUEUED
            )
            existing.MergeFrom(request.training_job)
            self.jobs[request.request_id] = existing
        return training_requests.CreateTrainingJobResponse(training_job=existing)

    def GetModelVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.gateway.record("GetModelVersion", context, request)
        version = training_messages.ModelVersion(name=request.name, metrics={"accuracy": 0.91, "roc_auc": 0.95})
        version.lineage.dataset_versions.append("datasets/churn/versions/4")
        return training_requests.GetModelVersionResponse(model_version=version)


class _Ingest(ingest_service.IngestServiceServicer):
    def __init__(self, gateway: FakeGateway):
        self.gateway = gateway

    def GetDataset(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.gateway.record("GetDataset", context, request)
        return ingest_requests.GetDatasetResponse(
            dataset=ingest_messages.Dataset(name=request.name, latest_version=f"{request.name}/versions/9")
        )

    def ReadDatasetVersion(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.gateway.record("ReadDatasetVersion", context, request)
        table = self.gateway.reference
        assert table is not None
        if request.columns:
            table = table.select(list(request.columns))
        for offset in range(0, table.num_rows, 1000):
            part = table.slice(offset, 1000)
            yield ingest_requests.ReadDatasetVersionResponse(batch=batch(part), row_offset=offset)


class _Admin(gateway_service.GatewayAdminServiceServicer):
    def __init__(self, gateway: FakeGateway):
        self.gateway = gateway

    def ReportAuditEvent(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.gateway.record("ReportAuditEvent", context, request)
        return gateway_requests.ReportAuditEventResponse(record=gateway_messages.AuditRecord(sequence=len(self.gateway.calls)))


@pytest.fixture
def fake_gateway(pki: PKI) -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_service.add_TrainingServiceServicer_to_server(_Training(gateway), server)  # type: ignore[abstract]
    ingest_service.add_IngestServiceServicer_to_server(_Ingest(gateway), server)  # type: ignore[abstract]
    gateway_service.add_GatewayAdminServiceServicer_to_server(_Admin(gateway), server)  # type: ignore[abstract]
    gateway.port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(identity(pki, "service", "gateway")))
    server.start()
    yield gateway
    server.stop(0)


# -- a webhook receiver ---------------------------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class WebhookReceiver:
    url: str
    deliveries: list[Delivery]
    # Status codes to answer, in order; 204 once they run out.
    statuses: list[int]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.deliveries) >= count, f"{len(self.deliveries)} deliveries arrived, expected {count}"
        return self.deliveries


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    deliveries: list[Delivery] = []
    statuses: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = statuses.pop(0) if statuses else 204
            deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield WebhookReceiver(f"http://127.0.0.1:{server.server_address[1]}/hooks/falaj", deliveries, statuses)
    server.shutdown()
    server.server_close()


# -- the service --------------------------------------------------------------------------------


class MonitoringClient:
    """The generated stub, called as the gateway calls it for client `alice`."""

    def __init__(self, channel: grpc.Channel, ctx: Context, running: Any):
        self.stub = service_pb2_grpc.MonitoringServiceStub(channel)
        self.ctx = ctx
        self.running = running
        self.metadata = caller("alice")

    def __getattr__(self, method: str) -> Callable[..., Any]:
        rpc = getattr(self.stub, method)

        def call(request: Any, **kwargs: Any) -> Any:
            return rpc(request, metadata=self.metadata, timeout=60, **kwargs)

        return call

    # -- helpers ------------------------------------------------------------------------------
    def upload_profile(self, profile_id: str = "churn-v3", table: pa.Table | None = None, **profile: Any) -> pb.ReferenceProfile:
        table = table if table is not None else reference_table()
        header = rr.UploadReferenceProfileHeader(
            profile_id=profile_id,
            profile=pb.ReferenceProfile(
                model_version=MODEL_VERSION,
                columns=COLUMNS,
                training_metrics=[pb.QualityMetricValue(metric=pb.QUALITY_METRIC_ACCURACY, value=0.97)],
                **profile,
            ),
        )
        messages = [rr.UploadReferenceProfileRequest(header=header)]
        messages += [rr.UploadReferenceProfileRequest(batch=batch(table.slice(o, 1000))) for o in range(0, table.num_rows, 1000)]
        return self.UploadReferenceProfile(iter(messages)).profile

    def create_monitor(self, monitor_id: str = "churn", window_rows: int = 500, **fields: Any) -> pb.ModelMonitor:
        settings: dict[str, Any] = {
            "model_version": MODEL_VERSION,
            "deployment": "churn-prod",
            "reference_profile": "referenceProfiles/churn-v3",
            "window": pb.WindowConfig(kind=pb.WINDOW_KIND_COUNT, row_count=window_rows),
            "drift": pb.DriftConfig(include_predictions=True),
            "quality": pb.QualityConfig(task_type=pb.TASK_TYPE_BINARY_CLASSIFICATION, positive_class="1"),
            "labels": {"team": "risk"},
        }
        monitor = pb.ModelMonitor(**{**settings, **fields})
        return self.CreateModelMonitor(rr.CreateModelMonitorRequest(monitor_id=monitor_id, monitor=monitor)).monitor

    def ingest(
        self, *tables: pa.Table, header: rr.PredictionLogHeader | None = None, batch_ids: list[str] | None = None
    ) -> rr.IngestPredictionLogsResponse:
        messages = [
            rr.IngestPredictionLogsRequest(header=header or rr.PredictionLogHeader(model_version=MODEL_VERSION, deployment="churn-prod"))
        ]
        for index, table in enumerate(tables):
            messages.append(rr.IngestPredictionLogsRequest(batch=batch(table, batch_ids[index] if batch_ids else "")))
        return self.IngestPredictionLogs(iter(messages))

    def reports(self) -> list[pb.DriftReport]:
        return list(self.ListDriftReports(rr.ListDriftReportsRequest(parent="modelMonitors/churn")).reports)


def fast(config: Any) -> Any:
    return dataclasses.replace(config, worker_interval_seconds=0.05, rule_interval_seconds=0.5, retraining_backoff_seconds=0.2)


@pytest.fixture
def start_monitoring(
    settings_for: Callable[..., Settings], pki: PKI, fake_gateway: FakeGateway
) -> Iterator[Callable[..., MonitoringClient]]:
    started: list[Any] = []

    def start(database_url: str = "", clock: Callable[[], dt.datetime] | None = None, **env: str) -> MonitoringClient:
        holder: list[Context] = []

        def configure(config: Any) -> Any:
            return dataclasses.replace(fast(config), clock=clock) if clock else fast(config)

        spec = build_spec(configure=configure, on_context=holder.append)
        extra = {"FALAJ_GATEWAY_ADDR": f"127.0.0.1:{fake_gateway.port}", **env}
        if database_url:
            extra["FALAJ_MONITORING_DATABASE_URL"] = database_url
        running, database = start_service(spec, settings_for("monitoring", **extra), listen_addr="127.0.0.1:0")
        channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
        started.append((running, database, channel))
        return MonitoringClient(channel, holder[0], running)

    yield start
    for running, database, channel in started:
        channel.close()
        running.stop(0)
        database.dispose()


@pytest.fixture
def monitoring(start_monitoring: Callable[..., MonitoringClient]) -> MonitoringClient:
    """The service on its embedded SQLite store."""
    return start_monitoring()
