"""Serving on the real platform: a model imported into training, served through the gateway
over mTLS to a stock tritonclient, and an A-B split driven by a real experiment."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from falaj.common.v1 import common_pb2
from falaj.experiments.v1 import message_pb2 as exp_pb
from falaj.experiments.v1 import request_response_pb2 as exp_rr
from falaj.experiments.v1 import service_pb2_grpc as exp_service
from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj.serving.v1 import service_pb2_grpc
from falaj.training.v1 import message_pb2 as train_pb
from falaj.training.v1 import request_response_pb2 as train_rr
from falaj.training.v1 import service_pb2_grpc as train_service
from falaj_platform.pki import PKI
from tests.conftest import identity
from tests.gateway.conftest import Platform, stop_platform
from tests.serving.conftest import infer_request
from tests.serving.models import mlp_model, mlp_reference, mlp_weights, scaled_model
from tests.serving.platform import start_serving_platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("serving-platform")
    pki = PKI(root / "pki")
    pki.init()
    started = start_serving_platform(root / "home", pki)
    yield started
    stop_platform(started)


def _import(platform: Platform, model: str, path: Path, task: int) -> str:
    content = path.read_bytes()
    header = train_rr.ImportModelVersionHeader(
        registered_model=f"models/{model}",
        residency=common_pb2.Residency(region="ae-dxb"),
        task=task,  # type: ignore[arg-type]
        expected_sha256=hashlib.sha256(content).hexdigest(),
        import_source="tests/serving",
    )
    messages = [train_rr.ImportModelVersionRequest(header=header)]
    messages += [train_rr.ImportModelVersionRequest(chunk=content[i : i + 65536]) for i in range(0, len(content), 65536)]
    stub = train_service.TrainingServiceStub(platform.channel("root"))
    return str(stub.ImportModelVersion(iter(messages), timeout=60).model_version.name)


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
args = json.loads(sys.argv[1])
client = triton.InferenceServerClient(url=args["url"], ssl=True, root_certificates=args["ca"], private_key=args["key"],
    certificate_chain=args["cert"], channel_args=[("grpc.ssl_target_name_override", "localhost")])
x = np.array(args["x"], dtype=np.float32)
tensor = triton.InferInput("input", list(x.shape), "FP32")
tensor.set_data_from_numpy(x)
result = client.infer("churn", [tensor], outputs=[triton.InferRequestedOutput("output")])
metadata = client.get_model_metadata("churn")
missing = None
try:
    client.infer("no-such-model", [tensor])
except triton.InferenceServerException as error:
    missing = error.status()
print(json.dumps({
    "ready": client.is_model_ready("churn"),
    "output": result.as_numpy("output").tolist(),
    "version": result.get_response().model_version,
    "inputs": [[i.name, i.datatype, list(i.shape)] for i in metadata.inputs],
    "missing": missing,
}))
"""


def test_stock_tritonclient_is_served_a_registry_model_through_the_gateway(platform: Platform) -> None:
    version = _import(platform, "churn", mlp_model(platform.home / "mlp.onnx"), train_pb.TASK_TYPE_MULTICLASS_CLASSIFICATION)
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    created = serving.CreateDeployment(
        rr.CreateDeploymentRequest(
            deployment_id="churn",
            deployment=pb.Deployment(
                model="models/churn", traffic_split=pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version))
            ),
        ),
        timeout=60,
    ).deployment
    assert created.state == pb.DEPLOYMENT_STATE_READY
    served = serving.GetServedModel(rr.GetServedModelRequest(name="servedModels/churn-v1"), timeout=10).served_model
    assert served.state == pb.SERVED_MODEL_STATE_READY
    assert served.artifact_sha256 == hashlib.sha256((platform.home / "mlp.onnx").read_bytes()).hexdigest()

    admin = identity(platform.pki, "client", "root")
    x = np.random.default_rng(5).normal(size=(3, 30)).astype(np.float32)
    args = {"url": platform.gateway_addr, "ca": str(admin.ca_cert), "key": str(admin.key), "cert": str(admin.cert), "x": x.tolist()}
    # A process of its own: tritonclient and the platform both define `inference.*` messages.
    result = subprocess.run([sys.executable, "-c", TRITON_CLIENT, json.dumps(args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["ready"] is True and answer["version"] == "1"
    assert answer["inputs"] == [["input", "FP32", [-1, 30]]]
    np.testing.assert_allclose(np.array(answer["output"]), mlp_reference(x, mlp_weights()), rtol=1e-4, atol=1e-5)
    assert answer["missing"] == "StatusCode.NOT_FOUND"


def test_ab_split_follows_the_experiments_service_and_stays_sticky(platform: Platform) -> None:
    versions = [
        _import(platform, "ranker", scaled_model(platform.home / f"ranker{n}.onnx", float(n), width=4), train_pb.TASK_TYPE_REGRESSION)
        for n in (1, 2)
    ]
    root = platform.channel("root")
    experiments = exp_service.ExperimentsServiceStub(root)
    experiment = exp_pb.Experiment(
        display_name="ranker v2",
        hypothesis="v2 ranks better",
        variants=[
            exp_pb.Variant(variant_id="control", control=True, model_version=versions[0]),
            exp_pb.Variant(variant_id="treatment", model_version=versions[1]),
        ],
        allocation=exp_pb.Allocation(
            coverage_bps=10_000,
            weights=[
                exp_pb.VariantWeight(variant_id="control", weight_bps=5000),
                exp_pb.VariantWeight(variant_id="treatment", weight_bps=5000),
            ],
        ),
        hashing=exp_pb.HashingConfig(unit_attribute="user_id"),
        metrics=[exp_pb.MetricDefinition(metric_id="clicks", type=exp_pb.METRIC_TYPE_CONTINUOUS, role=exp_pb.METRIC_ROLE_PRIMARY)],
        residency=common_pb2.Residency(region="ae-dxb"),
    )
    experiments.CreateExperiment(exp_rr.CreateExperimentRequest(experiment_id="ranker-v2", experiment=experiment), timeout=30)
    experiments.StartExperiment(exp_rr.StartExperimentRequest(name="experiments/ranker-v2", reason="go"), timeout=30)
    serving = service_pb2_grpc.ServingServiceStub(root)
    split = pb.TrafficSplit(
        ab_test=pb.AbTestRouting(
            experiment="experiments/ranker-v2", routing_key="user_id", default_model_version=versions[0], record_exposures=True
        )
    )
    serving.CreateDeployment(
        rr.CreateDeploymentRequest(deployment_id="ranker", deployment=pb.Deployment(model="models/ranker", traffic_split=split)), timeout=60
    )
    from falaj.inference import open_inference_grpc_pb2_grpc as oip_grpc

    oip = oip_grpc.GRPCInferenceServiceStub(root)
    x = np.ones((1, 4), dtype=np.float32)
    seen: dict[str, str] = {}
    for _ in range(2):
        for user in range(30):
            response = oip.ModelInfer(infer_request("ranker", x, user_id=f"u{user}"), timeout=10)
            variant = response.parameters["falaj.variant"].string_param
            assert seen.setdefault(f"u{user}", variant) == variant
    assert set(seen.values()) == {"control", "treatment"}
    for unit in ("u0", "u1", "u2", "u3"):
        assignment = experiments.AssignVariant(
            exp_rr.AssignVariantRequest(experiment="experiments/ranker-v2", unit_id=unit), timeout=10
        ).assignment
        assert assignment.variant_id == seen[unit], "serving routes as the experiments service assigns"
    with pytest.raises(grpc.RpcError) as raised:
        oip.ModelInfer(infer_request("ranker", x), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
