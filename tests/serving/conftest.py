"""An in-process serving replica over mTLS with local model files and recording collaborators."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest

from falaj.inference import open_inference_grpc_pb2 as oip_pb
from falaj.inference import open_inference_grpc_pb2_grpc as oip_grpc
from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj.serving.v1 import service_pb2_grpc
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.serving.assignment import ExposureEvent, VariantAssignment, bucket_of
from falaj_platform.services.serving.server import Collaborators, ServingContext, build_spec
from falaj_platform.services.serving.sources import LocalModelSource
from tests.conftest import caller, identity


class RecordingAuditor:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def report(self, event: str, **details: Any) -> None:
        self.events.append({"event": event, **details})

    def digest_mismatch(self, model_version: str, expected: str, actual: str) -> None:
        self.report("ARTIFACT_DIGEST_MISMATCH", resource=model_version, expected=expected, actual=actual)

    def cross_region(self, resource: str, region: str, detail: str) -> None:
        self.report("CROSS_REGION_ACCESS", resource=resource, region=region, detail=detail)


class MemoryLogSink:
    """Monitoring stand-in: keeps every delivered batch; can be switched off."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, pa.Table]] = []
        self.down = False
        self.delay_s = 0.0
        self._lock = threading.Lock()

    def send(self, deployment: str, table: pa.Table, batch_id: str) -> None:
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if self.down:
            raise ConnectionError("monitoring is down")
        with self._lock:
            self.batches.append((deployment, table))

    def rows(self, deployment: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            tables = [t for d, t in self.batches if deployment is None or d == deployment]
        return [row for table in tables for row in table.to_pylist()]


class HashAssigner:
    """Experiments stand-in: deterministic buckets as the experiments contract defines them."""

    def __init__(self, variants: dict[str, tuple[int, int]], running: bool = True):
        self.variants = variants  # variant -> [start, end) buckets
        self.running = running
        self.calls = 0

    def assign(self, experiment: str, unit_id: str, attributes: Any) -> VariantAssignment:
        self.calls += 1
        bucket = bucket_of(experiment.rsplit("/", 1)[-1], unit_id, 0)
        for variant, (start, end) in self.variants.items():
            if self.running and start <= bucket < end:
                return VariantAssignment(variant, True)
        return VariantAssignment("control", False)


class MemoryExposures:
    def __init__(self) -> None:
        self.events: list[ExposureEvent] = []

    def send(self, experiment: str, exposures: list[ExposureEvent]) -> None:
        self.events.extend(exposures)


@dataclass
class Serving:
    context: ServingContext
    channel: grpc.Channel
    source: LocalModelSource
    logs: MemoryLogSink
    auditor: RecordingAuditor
    exposures: MemoryExposures
    models_dir: Path
    collaborators: Collaborators
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def oip(self) -> oip_grpc.GRPCInferenceServiceStub:
        return oip_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def api(self) -> service_pb2_grpc.ServingServiceStub:
        return service_pb2_grpc.ServingServiceStub(self.channel)

    def register(self, model_version: str, path: Path) -> str:
        self.source.register(model_version, path)
        return model_version

    def deploy(self, deployment_id: str, split: pb.TrafficSplit, **fields: Any) -> pb.Deployment:
        model = split_model(split)
        deployment = pb.Deployment(model=model, traffic_split=split, **fields)
        return self.api.CreateDeployment(
            rr.CreateDeploymentRequest(deployment_id=deployment_id, deployment=deployment), timeout=30, metadata=caller()
        ).deployment

    def infer(self, model: str, x: np.ndarray, *, version: str = "", input_name: str = "x", **parameters: str) -> oip_pb.ModelInferResponse:
        return self.oip.ModelInfer(
            infer_request(model, x, version=version, input_name=input_name, **parameters), timeout=10, metadata=caller()
        )


def split_model(split: pb.TrafficSplit) -> str:
    which = split.WhichOneof("strategy")
    version = {
        "single": lambda: split.single.model_version,
        "canary": lambda: split.canary.stable_model_version,
        "ab_test": lambda: split.ab_test.default_model_version,
    }[str(which)]()
    return version.rsplit("/versions/", 1)[0]


def infer_request(model: str, x: np.ndarray, *, version: str = "", input_name: str = "x", **parameters: str) -> oip_pb.ModelInferRequest:
    request = oip_pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    for name, value in parameters.items():
        request.parameters[name].string_param = value
    return request


def output_array(response: oip_pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}[tensor.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(tuple(tensor.shape))


FAST = {
    "sync_interval_s": 0.5,
    "canary_check_interval_s": 0.05,
    "prediction_log_flush_interval_s": 0.1,
    "exposure_flush_interval_s": 0.1,
    "warmup_request_count": 1,
}


@pytest.fixture
def start_serving(pki: PKI, settings_for: Callable[..., Settings], tmp_path: Path) -> Iterator[Callable[..., Serving]]:
    started: list[tuple[Any, Any, grpc.Channel]] = []

    def start(assigner: Any = None, features: Any = None, ingest: Any = None, **tuning: Any) -> Serving:
        settings = settings_for("serving")
        source = LocalModelSource(settings.region)
        logs, auditor, exposures = MemoryLogSink(), RecordingAuditor(), MemoryExposures()
        collaborators = Collaborators(
            source=source,
            features=features,
            assigner=assigner,
            exposures=exposures,
            prediction_logs=logs,
            auditor=auditor,
            ingest=ingest,
        )
        holder: dict[str, ServingContext] = {}

        def keep(context: ServingContext) -> None:
            holder["context"] = context

        spec = build_spec(
            configure=lambda config: config.tuned(**{**FAST, **tuning}),
            collaborators=lambda config: collaborators,
            on_context=keep,
        )
        running, database = start_service(spec, settings, listen_addr="127.0.0.1:0")
        channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
        started.append((running, database, channel))
        return Serving(holder["context"], channel, source, logs, auditor, exposures, tmp_path / "models", collaborators)

    yield start
    for running, database, channel in started:
        channel.close()
        running.stop(0)
        database.dispose()
