"""The experiments service in-process on a free port, with its real store, reached over mTLS
as the gateway reaches it; the audit log is a recording stand-in and guardrail checks run
synchronously so tests can observe their effect."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from falaj.common.v1 import common_pb2
from falaj.experiments.v1 import message_pb2 as pb
from falaj.experiments.v1 import request_response_pb2 as rr
from falaj.experiments.v1 import service_pb2_grpc
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.experiments.api import ExperimentsApi
from falaj_platform.services.experiments.server import build_spec
from tests.conftest import caller, identity


@dataclass
class RecordingAudit:
    """Stands in for the gateway's audit log: keeps every report."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def report(self, event_type: Any, **details: Any) -> None:
        self.events.append({"event_type": event_type, **details})

    def actions(self, resource: str) -> list[str]:
        return [e["action"] for e in self.events if e["resource"] == resource]


class Clock:
    """The service's clock: real time, moved forward on demand so events can lie in the past."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, delta: dt.timedelta) -> None:
        self.offset += delta


class ExperimentsClient:
    """The generated stub, called as the gateway would call it for client `alice`."""

    def __init__(self, channel: grpc.Channel, database: Database, audit: RecordingAudit, api: ExperimentsApi, clock: Clock):
        self.clock = clock
        self.stub = service_pb2_grpc.ExperimentsServiceStub(channel)
        self.database = database
        self.audit = audit
        self.api = api
        self.metadata = caller("alice")

    def __getattr__(self, method: str) -> Callable[..., Any]:
        rpc = getattr(self.stub, method)

        def call(request: Any, **kwargs: Any) -> Any:
            return rpc(request, metadata=self.metadata, timeout=60, **kwargs)

        return call


@pytest.fixture
def audit() -> RecordingAudit:
    return RecordingAudit()


@pytest.fixture
def experiments(database_url: str, settings_for: Callable[..., Settings], pki: PKI, audit: RecordingAudit) -> Iterator[ExperimentsClient]:
    """The real service on SQLite and (with FALAJ_TEST_POSTGRES_URL) on PostgreSQL."""
    holder: list[ExperimentsApi] = []
    clock = Clock()
    spec = build_spec(
        clock=clock,
        audit=lambda settings: audit,
        run_in_background=lambda task: task(),
        guardrail_check_interval=dt.timedelta(0),
        on_api=holder.append,
    )
    settings = settings_for("experiments", FALAJ_EXPERIMENTS_DATABASE_URL=database_url)
    running, database = start_service(spec, settings, listen_addr="127.0.0.1:0")
    channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
    try:
        yield ExperimentsClient(channel, database, audit, holder[0], clock)
    finally:
        channel.close()
        running.stop(0)
        database.dispose()


def error_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, str]:
    """(status code, ErrorInfo reason, message) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason = ""
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), reason, error.details() or ""  # type: ignore[attr-defined]


def design(
    *,
    weights: Mapping[str, int] | None = None,
    coverage_bps: int = 10_000,
    metrics: list[pb.MetricDefinition] | None = None,
    guardrails: list[pb.Guardrail] | None = None,
    analysis: pb.AnalysisConfig | None = None,
    targeting: pb.Targeting | None = None,
) -> pb.Experiment:
    """A two-variant experiment bound to deployments, with a continuous and a binary metric."""
    weights = dict(weights or {"control": 5000, "treatment": 5000})
    variants = [
        pb.Variant(variant_id=variant_id, control=index == 0, deployment=f"deployments/checkout-{variant_id}")
        for index, variant_id in enumerate(weights)
    ]
    return pb.Experiment(
        display_name="Checkout ranking",
        hypothesis="The new ranker raises revenue per user",
        variants=variants,
        allocation=pb.Allocation(
            coverage_bps=coverage_bps, weights=[pb.VariantWeight(variant_id=k, weight_bps=v) for k, v in weights.items()]
        ),
        hashing=pb.HashingConfig(unit_attribute="user_id"),
        targeting=targeting,
        metrics=metrics
        if metrics is not None
        else [
            pb.MetricDefinition(metric_id="revenue", type=pb.METRIC_TYPE_CONTINUOUS, role=pb.METRIC_ROLE_PRIMARY),
            pb.MetricDefinition(metric_id="converted", type=pb.METRIC_TYPE_BINARY, role=pb.METRIC_ROLE_SECONDARY),
        ],
        guardrails=guardrails or [],
        analysis_config=analysis,
        residency=common_pb2.Residency(region="ae-dxb"),
    )


def create_running(client: ExperimentsClient, experiment_id: str, experiment: pb.Experiment | None = None) -> pb.Experiment:
    client.CreateExperiment(rr.CreateExperimentRequest(experiment_id=experiment_id, experiment=experiment or design()))
    started: pb.Experiment = client.StartExperiment(rr.StartExperimentRequest(name=f"experiments/{experiment_id}", reason="go")).experiment
    return started
