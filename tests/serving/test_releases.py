"""Canary, A-B and shadow releases: proportions, automatic rollback, stickiness, mirroring."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from tests.conftest import caller
from tests.serving.conftest import HashAssigner, Serving, infer_request, output_array
from tests.serving.models import fragile_model, scaled_model


def _versions(serving: Serving, factors: dict[int, float]) -> dict[int, str]:
    return {n: serving.register(f"models/m/versions/{n}", scaled_model(serving.models_dir / f"m{n}.onnx", f)) for n, f in factors.items()}


def _answered(serving: Serving, model: str, x: np.ndarray, **parameters: str) -> str:
    return serving.infer(model, x, **parameters).parameters["falaj.model_version"].string_param


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_canary_takes_its_share_of_traffic(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    v = _versions(serving, {1: 1.0, 2: 2.0})
    serving.deploy("m", pb.TrafficSplit(canary=pb.CanaryRouting(stable_model_version=v[1], canary_model_version=v[2], canary_percent=20)))
    x = np.ones((1, 4), dtype=np.float32)
    counts = Counter(_answered(serving, "m", x) for _ in range(1000))
    assert 140 <= counts[v[2]] <= 260, counts  # 20% of 1000, well beyond 4 standard deviations
    routes = {
        (s.model_version, s.role)
        for s in serving.api.GetDeployment(rr.GetDeploymentRequest(name="deployments/m"), timeout=5).deployment.route_statuses
    }
    assert routes == {(v[1], pb.ROUTE_ROLE_STABLE), (v[2], pb.ROUTE_ROLE_CANARY)}


def test_a_failing_canary_rolls_itself_back(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    stable = serving.register("models/m/versions/1", scaled_model(serving.models_dir / "m1.onnx", 1.0))
    canary = serving.register("models/m/versions/2", fragile_model(serving.models_dir / "m2.onnx"))
    split = pb.TrafficSplit(canary=pb.CanaryRouting(stable_model_version=stable, canary_model_version=canary, canary_percent=50))
    split.canary.rollback_thresholds.max_error_rate = 0.2
    split.canary.rollback_thresholds.min_request_count = 10
    serving.deploy("m", split)
    x = np.full((1, 4), 9.0, dtype=np.float32)  # the canary cannot take this input
    failures = 0
    for _ in range(200):
        try:
            serving.infer("m", x)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INTERNAL
            failures += 1
    assert failures >= 10
    deployment = serving.api.GetDeployment(rr.GetDeploymentRequest(name="deployments/m"), timeout=5).deployment
    assert deployment.traffic_split.WhichOneof("strategy") == "single"
    assert deployment.traffic_split.single.model_version == stable
    assert deployment.state == pb.DEPLOYMENT_STATE_DEGRADED and "error rate" in deployment.state_reason
    rollouts = serving.api.ListRollouts(rr.ListRolloutsRequest(parent="deployments/m"), timeout=5).rollouts
    assert [(r.revision, r.trigger, r.state) for r in rollouts] == [
        (2, pb.ROLLOUT_TRIGGER_AUTO_ROLLBACK, pb.ROLLOUT_STATE_SUCCEEDED),
        (1, pb.ROLLOUT_TRIGGER_USER_UPDATE, pb.ROLLOUT_STATE_ROLLED_BACK),
    ]
    assert "error rate" in rollouts[0].reason
    assert any(r.role == pb.ROUTE_ROLE_CANARY and r.metrics.error_count >= 10 for r in rollouts[1].route_statuses)
    assert any(e["event"] == "DEPLOYMENT_ROLLED_BACK" for e in serving.auditor.events)
    # Every request after the rollback is answered by the stable version.
    assert all(_answered(serving, "m", x) == stable for _ in range(50))


def test_ab_split_keeps_each_user_in_their_variant(start_serving: Callable[..., Serving]) -> None:
    assigner = HashAssigner({"control": (0, 5000), "treatment": (5000, 10000)})
    serving = start_serving(assigner=assigner)
    v = _versions(serving, {1: 1.0, 2: 2.0, 3: 3.0})
    split = pb.TrafficSplit(
        ab_test=pb.AbTestRouting(
            experiment="experiments/ranker",
            routing_key="user_id",
            default_model_version=v[1],
            variant_routes=[
                pb.VariantRoute(variant_id="control", model_version=v[2]),
                pb.VariantRoute(variant_id="treatment", model_version=v[3]),
            ],
            record_exposures=True,
        )
    )
    serving.deploy("m", split)
    x = np.ones((1, 4), dtype=np.float32)
    first: dict[str, str] = {}
    for round_ in range(3):
        for user in range(60):
            response = serving.infer("m", x, user_id=f"user-{user}")
            version = response.parameters["falaj.model_version"].string_param
            variant = response.parameters["falaj.variant"].string_param
            assert first.setdefault(f"user-{user}", version) == version, f"user-{user} switched variant in round {round_}"
            assert version == {"control": v[2], "treatment": v[3]}[variant]
    assert set(first.values()) == {v[2], v[3]}
    # The routing key may also travel in metadata.
    same = serving.oip.ModelInfer(
        infer_request("m", x),
        timeout=5,
        metadata=[*caller(), ("x-falaj-routing-key", "user-7")],
    )
    assert same.parameters["falaj.model_version"].string_param == first["user-7"]
    with pytest.raises(grpc.RpcError) as raised:
        serving.infer("m", x)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in raised.value.details()
    assert _until(lambda: len(serving.exposures.events) >= 180)
    assert {e.variant_id for e in serving.exposures.events} == {"control", "treatment"}


def test_shadow_answers_are_logged_and_never_returned(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    v = _versions(serving, {1: 1.0, 2: 5.0})
    split = pb.TrafficSplit(
        single=pb.SingleVersionRouting(model_version=v[1]), shadows=[pb.ShadowRoute(model_version=v[2], mirror_percent=100)]
    )
    serving.deploy("m", split, prediction_log=pb.PredictionLogConfig(enabled=True, log_outputs=True, log_inputs=True))
    x = np.full((1, 4), 2.0, dtype=np.float32)
    for i in range(20):
        request = infer_request("m", x)
        request.id = f"r{i}"
        response = serving.oip.ModelInfer(request, timeout=5, metadata=caller())
        assert response.parameters["falaj.model_version"].string_param == v[1]
        np.testing.assert_array_equal(output_array(response), x)  # the stable answer, never the shadow's 5x
        assert [o.name for o in response.outputs] == ["y"]
    assert _until(lambda: len([r for r in serving.logs.rows("m") if r["route"] == "SHADOW"]) >= 20)
    shadow_rows = [r for r in serving.logs.rows("m") if r["route"] == "SHADOW"]
    assert {r["model_version"] for r in shadow_rows} == {v[2]}
    assert all(r["y_0"] == pytest.approx(10.0) for r in shadow_rows)
    assert {r["request_id"] for r in shadow_rows} == {f"r{i}" for i in range(20)}


def test_promote_and_rollback_move_the_split_and_keep_history(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    v = _versions(serving, {1: 1.0, 2: 2.0})
    serving.deploy("m", pb.TrafficSplit(canary=pb.CanaryRouting(stable_model_version=v[1], canary_model_version=v[2], canary_percent=10)))
    promoted = serving.api.PromoteDeployment(
        rr.PromoteDeploymentRequest(name="deployments/m", reason="looks good"), timeout=10, metadata=caller()
    )
    assert promoted.deployment.traffic_split.single.model_version == v[2]
    assert promoted.rollout.trigger == pb.ROLLOUT_TRIGGER_USER_PROMOTE
    assert _answered(serving, "m", np.ones((1, 4), dtype=np.float32)) == v[2]
    back = serving.api.RollbackDeployment(
        rr.RollbackDeploymentRequest(name="deployments/m", to_revision=1, request_id="rb-1"), timeout=10, metadata=caller()
    )
    assert back.deployment.traffic_split.canary.stable_model_version == v[1]
    assert back.rollout.revision == 3 and back.rollout.previous_revision == 2
    again = serving.api.RollbackDeployment(
        rr.RollbackDeploymentRequest(name="deployments/m", to_revision=1, request_id="rb-1"), timeout=10, metadata=caller()
    )
    assert again.rollout.revision == 3, "a retried rollback is answered once"
    history = serving.api.ListRollouts(rr.ListRolloutsRequest(parent="deployments/m", page_size=2), timeout=5)
    assert [r.revision for r in history.rollouts] == [3, 2] and history.next_page_token
    rest = serving.api.ListRollouts(rr.ListRolloutsRequest(parent="deployments/m", page_token=history.next_page_token), timeout=5)
    assert [r.revision for r in rest.rollouts] == [1]
    events = [e["event"] for e in serving.auditor.events]
    assert "MODEL_PROMOTED" in events and "DEPLOYMENT_ROLLED_BACK" in events
