"""Small ONNX models built in the tests with onnx.helper (no files shipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path, datatype: str, width: int = 3) -> Path:
    """y = x for a [-1, width] tensor of `datatype`."""
    kind = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", kind, ["batch", width])],
        [helper.make_tensor_value_info("y", kind, ["batch", width])],
    )
    return _save(graph, path)


def mlp_weights(seed: int = 0, inputs: int = 30, hidden: int = 64, outputs: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(inputs, hidden)) / np.sqrt(inputs)).astype(np.float32),
        (rng.normal(size=(hidden,)) * 0.1).astype(np.float32),
        (rng.normal(size=(hidden, outputs)) / np.sqrt(hidden)).astype(np.float32),
        (rng.normal(size=(outputs,)) * 0.1).astype(np.float32),
    ]


def mlp_reference(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    w1, b1, w2, b2 = weights
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


def mlp_model(path: Path, seed: int = 0, inputs: int = 30, hidden: int = 64, outputs: int = 2) -> Path:
    """The 30-64-2 MLP of the benchmark (input `input` [-1, 30], output `output` [-1, 2])."""
    w1, b1, w2, b2 = mlp_weights(seed, inputs, hidden, outputs)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
            helper.make_node("Add", ["o0", "b2"], ["output"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    return _save(graph, path)


def scaled_model(path: Path, factor: float, width: int = 4) -> Path:
    """y = x * factor: versions that answer differently, so a test can tell which one answered."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array([factor], dtype=np.float32), "k")],
    )
    return _save(graph, path)


def fragile_model(path: Path, width: int = 4) -> Path:
    """Like scaled_model(2.0) for x[:, 0] < 1, and an ONNX Runtime failure for x[:, 0] >= 4.

    It gathers row int(x[:, 0]) of a 4-row constant: zeros (the warm-up) work, large
    values are out of bounds at run time, as a broken release would be.
    """
    table = np.full((4, width), 2.0, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "start", "end", "axis"], ["first"]),
            helper.make_node("Squeeze", ["first", "axis"], ["first_flat"]),
            helper.make_node("Cast", ["first_flat"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["factors"], axis=0),
            helper.make_node("Mul", ["x", "factors"], ["y"]),
        ],
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        ],
    )
    return _save(graph, path)
