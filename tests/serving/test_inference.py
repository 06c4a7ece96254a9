"""The Open Inference Protocol on a real replica: datatypes, raw and typed inputs, errors."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.services.serving.tensors import CONTENTS_FIELD, NUMPY_OF, encode_bytes
from tests.conftest import caller
from tests.serving.conftest import Serving, infer_request, output_array
from tests.serving.models import identity_model, mlp_model, mlp_reference, mlp_weights

DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64", "BYTES"]


def _sample(datatype: str, rows: int = 2, width: int = 3) -> np.ndarray:
    rng = np.random.default_rng(3)
    if datatype == "BYTES":
        values = np.empty((rows, width), dtype=object)
        values[:] = [[f"v{r}{c}-é".encode() for c in range(width)] for r in range(rows)]
        return values
    if datatype == "BOOL":
        return rng.random((rows, width)) > 0.5
    dtype = NUMPY_OF[datatype]
    if dtype.kind == "f":
        return rng.normal(size=(rows, width)).astype(dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max]] * rows, dtype=dtype)[:, :width]


def _request(model: str, datatype: str, array: np.ndarray, raw: bool) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="req-1")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    if raw:
        data = encode_bytes(array) if datatype == "BYTES" else array.astype(NUMPY_OF[datatype]).tobytes()
        request.raw_input_contents.append(data)
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return request


def _decode(response: oip.ModelInferResponse, datatype: str) -> np.ndarray:
    tensor = response.outputs[0]
    raw = response.raw_output_contents[0]
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            length = int.from_bytes(raw[offset : offset + 4], "little")
            values.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
        return np.array(values, dtype=object).reshape(tuple(tensor.shape))
    return np.frombuffer(raw, dtype=NUMPY_OF[datatype]).reshape(tuple(tensor.shape))


@pytest.fixture
def typed_serving(start_serving: Callable[..., Serving]) -> Serving:
    serving = start_serving()
    for datatype in DATATYPES:
        version = serving.register(
            f"models/id-{datatype.lower()}/versions/1", identity_model(serving.models_dir / datatype / "m.onnx", datatype)
        )
        serving.deploy(f"id-{datatype.lower()}", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)))
    return serving


def test_every_datatype_round_trips_raw_and_typed(typed_serving: Serving) -> None:
    for datatype in DATATYPES:
        array = _sample(datatype)
        modes = [True] if datatype == "FP16" else [True, False]
        for raw in modes:
            response = typed_serving.oip.ModelInfer(_request(f"id-{datatype.lower()}", datatype, array, raw), timeout=10, metadata=caller())
            assert response.outputs[0].datatype == datatype
            assert list(response.outputs[0].shape) == [2, 3]
            assert not response.outputs[0].HasField("contents"), "outputs travel in raw_output_contents"
            assert response.id == "req-1" and response.model_version == "1"
            np.testing.assert_array_equal(_decode(response, datatype), array, err_msg=f"{datatype} raw={raw}")


def test_mlp_answers_like_numpy_and_names_the_version(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/mlp/versions/1", mlp_model(serving.models_dir / "mlp.onnx"))
    serving.deploy("mlp", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)))
    x = np.random.default_rng(0).normal(size=(5, 30)).astype(np.float32)
    response = serving.infer("mlp", x, input_name="input")
    np.testing.assert_allclose(output_array(response), mlp_reference(x, mlp_weights()), rtol=1e-4, atol=1e-5)
    assert response.parameters["falaj.model_version"].string_param == "models/mlp/versions/1"
    assert response.parameters["falaj.route"].string_param == "SINGLE"
    pinned = serving.infer("mlp", x, version="1", input_name="input")
    assert pinned.parameters["falaj.route"].string_param == "PINNED"

    metadata = serving.oip.ModelMetadata(oip.ModelMetadataRequest(name="mlp"), timeout=5, metadata=caller())
    assert (metadata.platform, list(metadata.versions)) == ("onnxruntime_onnx", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 30])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("output", "FP32", [-1, 2])]
    assert serving.oip.ModelReady(oip.ModelReadyRequest(name="mlp"), timeout=5, metadata=caller()).ready is True
    assert serving.oip.ModelReady(oip.ModelReadyRequest(name="mlp", version="1"), timeout=5, metadata=caller()).ready is True


def _error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    status = rpc_status.from_call(error)
    reason = ""
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), error.details(), reason


def test_bad_requests_get_protocol_errors_naming_the_problem(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/mlp/versions/1", mlp_model(serving.models_dir / "mlp.onnx"))
    serving.deploy("mlp", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)))
    x = np.zeros((1, 30), dtype=np.float32)

    def infer(request: oip.ModelInferRequest) -> Callable[[], object]:
        return lambda: serving.oip.ModelInfer(request, timeout=5, metadata=caller())

    code, message, _ = _error(infer(infer_request("nope", x, input_name="input")))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message
    code, message, _ = _error(infer(infer_request("mlp", x, version="7", input_name="input")))
    assert code == grpc.StatusCode.NOT_FOUND and "7" in message
    code, message, reason = _error(infer(infer_request("mlp", np.zeros((1, 29), dtype=np.float32), input_name="input")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SHAPE_MISMATCH") and "'input'" in message
    short = infer_request("mlp", x, input_name="input")
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    code, message, reason = _error(infer(short))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BYTE_SIZE_MISMATCH") and "'input'" in message
    wrong_type = infer_request("mlp", x, input_name="input")
    wrong_type.inputs[0].datatype = "INT32"
    code, message, reason = _error(infer(wrong_type))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATATYPE_MISMATCH") and "'input'" in message
    code, message, reason = _error(infer(infer_request("mlp", x, input_name="features")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_INPUT") and "'features'" in message
    mixed = infer_request("mlp", x, input_name="input")
    mixed.inputs[0].contents.fp32_contents.extend([0.0] * 30)
    code, _, reason = _error(infer(mixed))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MIXED_CONTENTS")
    wanted = infer_request("mlp", x, input_name="input")
    wanted.outputs.add(name="logits")
    code, message, reason = _error(infer(wanted))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_OUTPUT") and "'logits'" in message
    code, _, _ = _error(lambda: serving.oip.ModelMetadata(oip.ModelMetadataRequest(name="nope"), timeout=5, metadata=caller()))
    assert code == grpc.StatusCode.NOT_FOUND
