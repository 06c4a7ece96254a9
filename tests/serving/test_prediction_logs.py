"""Prediction logs: delivered in batches off the answer path, counted when monitoring is down."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from tests.conftest import caller
from tests.serving.conftest import Serving, infer_request
from tests.serving.models import scaled_model


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _deploy(serving: Serving, **log: object) -> str:
    version = serving.register("models/m/versions/1", scaled_model(serving.models_dir / "m1.onnx", 3.0))
    config = pb.PredictionLogConfig(enabled=True, log_inputs=True, log_outputs=True, subject_id_parameter="customer", **log)  # type: ignore[arg-type]
    serving.deploy("m", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)), prediction_log=config)
    return version


def test_predictions_reach_monitoring_in_batches_with_inputs_and_outputs(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = _deploy(serving, max_batch_rows=25)
    for i in range(100):
        request = infer_request("m", np.full((1, 4), float(i), dtype=np.float32), customer=f"c{i}")
        request.id = f"req-{i}"
        serving.oip.ModelInfer(request, timeout=5, metadata=caller())
    assert _until(lambda: len(serving.logs.rows("m")) == 100)
    assert 4 <= len(serving.logs.batches) < 100, "rows travel in batches, not one call per prediction"
    rows = {row["request_id"]: row for row in serving.logs.rows("m")}
    row = rows["req-42"]
    assert (row["model_version"], row["route"], row["status_code"], row["subject_id"]) == (version, "SINGLE", 0, "c42")
    assert [row[f"x_{j}"] for j in range(4)] == [42.0] * 4
    assert [row[f"y_{j}"] for j in range(4)] == [126.0] * 4
    assert row["latency_ms"] > 0 and row["timestamp"] is not None
    stats = serving.api.GetDeployment(rr.GetDeploymentRequest(name="deployments/m"), timeout=5).deployment.prediction_log_stats
    assert (stats.rows_sent, stats.rows_dropped) == (100, 0)


def test_monitoring_down_drops_and_counts_rows_without_slowing_answers(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving(prediction_log_send_attempts=1)
    _deploy(serving, queue_capacity=30)
    serving.logs.down = True
    serving.logs.delay_s = 0.3  # a monitoring service that hangs before failing
    started = time.perf_counter()
    for i in range(60):
        serving.infer("m", np.full((1, 4), float(i), dtype=np.float32))
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0, f"60 answers took {elapsed:.2f}s while monitoring hung"

    def dropped() -> int:
        return serving.api.GetDeployment(
            rr.GetDeploymentRequest(name="deployments/m"), timeout=5
        ).deployment.prediction_log_stats.rows_dropped

    assert _until(lambda: dropped() == 60)
    assert serving.logs.rows("m") == []
