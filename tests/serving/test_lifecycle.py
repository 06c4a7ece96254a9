"""Loading and unloading versions: under traffic, verified digests, residency, warm-up."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj_platform.services.serving.sources import LocalModel
from tests.conftest import caller
from tests.serving.conftest import Serving
from tests.serving.models import scaled_model


def test_versions_swap_and_unload_under_traffic_without_dropping_a_request(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    versions = [serving.register(f"models/m/versions/{n}", scaled_model(serving.models_dir / f"m{n}.onnx", float(n))) for n in (1, 2, 3)]
    serving.deploy("m", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=versions[0])))
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []
    x = np.ones((1, 4), dtype=np.float32)

    def traffic() -> None:
        while not stop.is_set():
            try:
                response = serving.infer("m", x)
                factor = float(np.frombuffer(response.raw_output_contents[0], dtype=np.float32)[0])
                version = response.parameters["falaj.model_version"].string_param
                assert version.endswith(f"/{int(factor)}"), (version, factor)
                answered.append(version)
            except Exception as error:  # noqa: BLE001 - every failure is what this test counts
                failures.append(repr(error))

    clients = [threading.Thread(target=traffic) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for previous, current in zip(versions, versions[1:], strict=False):
            update = pb.Deployment(
                name="deployments/m", traffic_split=pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=current))
            )
            request = rr.UpdateDeploymentRequest(deployment=update, reason=f"to {current}")
            request.update_mask.paths.append("traffic_split")
            serving.api.UpdateDeployment(request, timeout=30, metadata=caller())
            unloaded = serving.api.UnloadModel(
                rr.UnloadModelRequest(name=f"servedModels/m-v{previous.rsplit('/', 1)[1]}"), timeout=30, metadata=caller()
            )
            assert unloaded.served_model.state == pb.SERVED_MODEL_STATE_UNLOADED
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert not failures, failures[:3]
    assert len(answered) > 50 and answered[-1] == versions[-1]
    assert serving.context.manager.get(versions[0]) is None and serving.context.manager.get(versions[1]) is None


def test_a_version_in_use_is_not_unloaded_without_force(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/m/versions/1", scaled_model(serving.models_dir / "m1.onnx", 1.0))
    serving.deploy("m", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)))
    with pytest.raises(grpc.RpcError) as raised:
        serving.api.UnloadModel(rr.UnloadModelRequest(name="servedModels/m-v1"), timeout=10, metadata=caller())
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "deployments/m" in raised.value.details()


def test_load_model_warms_up_and_reports_the_served_model(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/m/versions/1", scaled_model(serving.models_dir / "m1.onnx", 1.0))
    runtime = pb.ModelRuntimeConfig(warmup=pb.WarmupConfig(request_count=3, batch_sizes=[1, 8]))
    loaded = serving.api.LoadModel(
        rr.LoadModelRequest(model_version=version, runtime=runtime, wait_until_ready=True), timeout=30, metadata=caller()
    )
    served = loaded.served_model
    assert (served.name, served.state) == ("servedModels/m-v1", pb.SERVED_MODEL_STATE_READY)
    assert served.active_execution_provider == pb.EXECUTION_PROVIDER_CPU
    assert len(served.artifact_sha256) == 64 and served.ready_time.seconds >= served.load_start_time.seconds
    assert served.replicas[0].state == pb.SERVED_MODEL_STATE_READY
    listed = serving.api.ListServedModels(rr.ListServedModelsRequest(), timeout=5).served_models
    assert [s.name for s in listed] == ["servedModels/m-v1"]


def test_an_artifact_whose_digest_does_not_match_is_refused_and_audited(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    path = scaled_model(serving.models_dir / "m1.onnx", 1.0)
    serving.source.register("models/m/versions/1", LocalModel(path, "ae-dxb", sha256="0" * 64))
    with pytest.raises(grpc.RpcError) as raised:
        serving.deploy("m", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version="models/m/versions/1")))
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS
    assert serving.context.manager.get("models/m/versions/1") is None
    assert [e["event"] for e in serving.auditor.events] == ["ARTIFACT_DIGEST_MISMATCH"]
    with pytest.raises(grpc.RpcError) as missing:
        serving.api.GetDeployment(rr.GetDeploymentRequest(name="deployments/m"), timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    served = serving.api.GetServedModel(rr.GetServedModelRequest(name="servedModels/m-v1"), timeout=5).served_model
    assert served.state == pb.SERVED_MODEL_STATE_FAILED and "hashes to" in served.state_reason


def test_models_and_deployments_of_another_region_are_refused(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    path = scaled_model(serving.models_dir / "m1.onnx", 1.0)
    serving.source.register("models/m/versions/1", LocalModel(path, "ae-auh"))
    with pytest.raises(grpc.RpcError) as raised:
        serving.deploy("m", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version="models/m/versions/1")))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "ae-auh" in raised.value.details()
    serving.source.register("models/m/versions/2", path)
    with pytest.raises(grpc.RpcError) as foreign:
        serving.deploy(
            "m2", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version="models/m/versions/2")), residency={"region": "ae-auh"}
        )
    assert foreign.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [e["event"] for e in serving.auditor.events] == ["CROSS_REGION_ACCESS", "CROSS_REGION_ACCESS"]


def test_deployment_requests_are_validated_and_idempotent(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/m/versions/1", scaled_model(serving.models_dir / "m1.onnx", 1.0))
    split = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version))
    for bad_id, bad_split in (
        ("Bad_Id", split),
        ("ok", pb.TrafficSplit()),
        ("ok", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version="models/other/versions/1"))),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            serving.api.CreateDeployment(
                rr.CreateDeploymentRequest(deployment_id=bad_id, deployment=pb.Deployment(model="models/m", traffic_split=bad_split)),
                timeout=10,
                metadata=caller(),
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = rr.CreateDeploymentRequest(
        deployment_id="m", deployment=pb.Deployment(model="models/m", traffic_split=split), request_id="create-1"
    )
    first = serving.api.CreateDeployment(request, timeout=10, metadata=caller())
    again = serving.api.CreateDeployment(request, timeout=10, metadata=caller())
    assert first.deployment.etag == again.deployment.etag
    with pytest.raises(grpc.RpcError) as exists:
        serving.api.CreateDeployment(
            rr.CreateDeploymentRequest(deployment_id="m", deployment=request.deployment), timeout=10, metadata=caller()
        )
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
    stale = pb.Deployment(name="deployments/m", description="x", etag="stale")
    update = rr.UpdateDeploymentRequest(deployment=stale)
    update.update_mask.paths.append("description")
    with pytest.raises(grpc.RpcError) as aborted:
        serving.api.UpdateDeployment(update, timeout=10, metadata=caller())
    assert aborted.value.code() == grpc.StatusCode.ABORTED
    listed = serving.api.ListDeployments(rr.ListDeploymentsRequest(), timeout=5).deployments
    assert [d.name for d in listed] == ["deployments/m"] and listed[0].revision == 1
    serving.api.DeleteDeployment(rr.DeleteDeploymentRequest(name="deployments/m", unload_models=True), timeout=10, metadata=caller())
    assert serving.context.manager.get(version) is None
    with pytest.raises(grpc.RpcError) as gone:
        serving.infer("m", np.ones((1, 4), dtype=np.float32))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
