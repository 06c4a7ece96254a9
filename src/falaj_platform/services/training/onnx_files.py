"""Checks of an externally built ONNX file: it loads in ONNX Runtime, and its signature.

An imported model is registered only after ONNX Runtime builds a session from it; the
signature is read from the graph and merged with what the importer declared (feature
references, descriptions, class labels), refusing a declaration the graph contradicts.
"""

from __future__ import annotations

from pathlib import Path

from falaj.training.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import InvalidArgument

ORT_TYPES = {
    "tensor(float)": pb.TENSOR_DATA_TYPE_FLOAT32,
    "tensor(double)": pb.TENSOR_DATA_TYPE_FLOAT64,
    "tensor(float16)": pb.TENSOR_DATA_TYPE_FLOAT16,
    "tensor(int64)": pb.TENSOR_DATA_TYPE_INT64,
    "tensor(int32)": pb.TENSOR_DATA_TYPE_INT32,
    "tensor(int8)": pb.TENSOR_DATA_TYPE_INT8,
    "tensor(uint8)": pb.TENSOR_DATA_TYPE_UINT8,
    "tensor(bool)": pb.TENSOR_DATA_TYPE_BOOL,
    "tensor(string)": pb.TENSOR_DATA_TYPE_STRING,
}


def _spec(node: object) -> pb.TensorSpec:
    shape = [dim if isinstance(dim, int) else -1 for dim in getattr(node, "shape", None) or []]
    return pb.TensorSpec(
        name=str(getattr(node, "name", "")),
        dtype=ORT_TYPES.get(str(getattr(node, "type", "")), pb.TENSOR_DATA_TYPE_UNSPECIFIED),
        shape=shape,
    )


def inspect_onnx(path: Path) -> pb.ModelSignature:
    """The graph's inputs and outputs; InvalidArgument when ONNX Runtime cannot load the file."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - any loader failure means the file is not a usable model
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise InvalidArgument(f"the file does not load in ONNX Runtime: {first_line}", reason="INVALID_ONNX") from None
    return pb.ModelSignature(inputs=[_spec(node) for node in session.get_inputs()], outputs=[_spec(node) for node in session.get_outputs()])


def _merge(found: list[pb.TensorSpec], declared: list[pb.TensorSpec], kind: str) -> list[pb.TensorSpec]:
    by_name = {spec.name: spec for spec in found}
    unknown = [spec.name for spec in declared if spec.name not in by_name]
    if unknown:
        raise InvalidArgument(
            f"the signature declares {kind} {unknown[0]!r}, which the ONNX graph does not have (it has {', '.join(by_name)})",
            reason="SIGNATURE_MISMATCH",
            metadata={"field": f"header.signature.{kind}s"},
        )
    merged = []
    declared_by_name = {spec.name: spec for spec in declared}
    for spec in found:
        out = pb.TensorSpec()
        out.CopyFrom(spec)
        wanted = declared_by_name.get(spec.name)
        if wanted is not None:
            if wanted.dtype and spec.dtype and wanted.dtype != spec.dtype:
                raise InvalidArgument(
                    f"{kind} {spec.name!r} is {pb.TensorDataType.Name(spec.dtype)} in the graph, not {pb.TensorDataType.Name(wanted.dtype)}",
                    reason="SIGNATURE_MISMATCH",
                )
            if wanted.shape:
                out.shape[:] = wanted.shape
            out.feature_references[:] = wanted.feature_references
            out.description = wanted.description
        merged.append(out)
    return merged


def merge_signature(found: pb.ModelSignature, declared: pb.ModelSignature) -> pb.ModelSignature:
    """The graph's signature with the importer's feature references, descriptions and labels."""
    return pb.ModelSignature(
        inputs=_merge(list(found.inputs), list(declared.inputs), "input"),
        outputs=_merge(list(found.outputs), list(declared.outputs), "output"),
        feature_service=declared.feature_service,
        class_labels=declared.class_labels,
    )
