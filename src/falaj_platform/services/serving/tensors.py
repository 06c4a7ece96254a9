"""Open Inference Protocol tensors <-> numpy arrays.

Inputs arrive either as typed `contents` or as `raw_input_contents` (row-major bytes,
little-endian; BYTES elements as a 4-byte little-endian length followed by the bytes,
as Triton does). Outputs always go back in `raw_output_contents`, the only place
tritonclient reads them. Errors name the tensor so a caller can fix the request.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from falaj.inference import open_inference_grpc_pb2 as oip
from falaj_platform.runtime.errors import InvalidArgument

# OIP datatype -> numpy dtype (little-endian); BYTES are numpy object arrays of bytes.
NUMPY_OF: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# Typed `contents` field that carries each datatype (FP16 can only travel raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# ONNX Runtime type strings -> OIP datatype.
DATATYPE_OF_ONNX = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_DATATYPE_OF_NUMPY = {dtype: name for name, dtype in NUMPY_OF.items() if name != "BYTES"}

_LENGTH = struct.Struct("<I")


def datatype_of_array(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array (str and bytes arrays are BYTES)."""
    if array.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    name = _DATATYPE_OF_NUMPY.get(array.dtype)
    if name is None:
        raise InvalidArgument(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, OIP datatype and shape (-1 for a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    feature_references: tuple[str, ...] = ()

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want < 0 or want == got for want, got in zip(self.shape, shape, strict=True))


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    values: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: BYTES element {len(values)} has a truncated length prefix", reason="BAD_TENSOR_BYTES")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"input {name!r}: BYTES element {len(values)} runs past the end of the data", reason="BAD_TENSOR_BYTES")
        values.append(bytes(view[offset : offset + length]))
        offset += length
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: the shape needs {count} BYTES elements but the data holds {len(values)}", reason="BAD_TENSOR_BYTES"
        )
    array = np.empty(count, dtype=object)
    array[:] = values
    return array


def encode_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor elements as length-prefixed bytes (str elements UTF-8 encoded)."""
    parts: list[bytes] = []
    for value in array.reshape(-1).tolist():
        data = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_inputs(request: oip.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, checked for size and datatype (not yet against a model)."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; give one per input, in order",
            reason="RAW_INPUT_COUNT_MISMATCH",
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(f"input {name!r} is given twice", reason="DUPLICATE_INPUT", metadata={"input": name})
        dtype = NUMPY_OF.get(tensor.datatype)
        if dtype is None:
            raise InvalidArgument(
                f"input {name!r}: unknown datatype {tensor.datatype!r}", reason="UNKNOWN_DATATYPE", metadata={"input": name}
            )
        shape = tuple(tensor.shape)
        if any(dim < 0 for dim in shape):
            raise InvalidArgument(
                f"input {name!r}: shape {list(shape)} has a negative dimension", reason="BAD_SHAPE", metadata={"input": name}
            )
        count = element_count(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input {name!r} carries contents while the request uses raw_input_contents; use one or the other",
                    reason="MIXED_CONTENTS",
                    metadata={"input": name},
                )
            data = raw[index]
            if tensor.datatype == "BYTES":
                arrays[name] = _decode_bytes(data, count, name).reshape(shape)
                continue
            if len(data) != count * dtype.itemsize:
                raise InvalidArgument(
                    f"input {name!r}: {tensor.datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes, got {len(data)}",
                    reason="BYTE_SIZE_MISMATCH",
                    metadata={"input": name},
                )
            arrays[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
            continue
        if tensor.datatype == "FP16":
            raise InvalidArgument(
                f"input {name!r}: FP16 tensors travel only in raw_input_contents", reason="FP16_NEEDS_RAW", metadata={"input": name}
            )
        values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
        if len(values) != count:
            raise InvalidArgument(
                f"input {name!r}: shape {list(shape)} needs {count} elements, contents hold {len(values)}",
                reason="ELEMENT_COUNT_MISMATCH",
                metadata={"input": name},
            )
        if tensor.datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = list(values)
            arrays[name] = array.reshape(shape)
        else:
            arrays[name] = np.array(values, dtype=dtype).reshape(shape)
    return arrays


def check_against(arrays: Mapping[str, np.ndarray], datatypes: Mapping[str, str], specs: Sequence[TensorSpec]) -> None:
    """Every model input given with the right datatype and shape, and nothing else."""
    known = {spec.name for spec in specs}
    for name in arrays:
        if name not in known:
            raise InvalidArgument(
                f"input {name!r} is not an input of the model; it takes {sorted(known)}", reason="UNKNOWN_INPUT", metadata={"input": name}
            )
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None:
            raise InvalidArgument(f"input {spec.name!r} is missing", reason="MISSING_INPUT", metadata={"input": spec.name})
        given = datatypes.get(spec.name, spec.datatype)
        if given != spec.datatype:
            raise InvalidArgument(
                f"input {spec.name!r} must be {spec.datatype}, got {given}", reason="DATATYPE_MISMATCH", metadata={"input": spec.name}
            )
        if not spec.accepts_shape(array.shape):
            raise InvalidArgument(
                f"input {spec.name!r} must have shape {list(spec.shape)} (-1 is free), got {list(array.shape)}",
                reason="SHAPE_MISMATCH",
                metadata={"input": spec.name},
            )


def fill_response(response: oip.ModelInferResponse, outputs: Sequence[tuple[str, np.ndarray]]) -> None:
    """Append output tensors to the response, all data in raw_output_contents."""
    for name, array in outputs:
        datatype = datatype_of_array(array)
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        if datatype == "BYTES":
            response.raw_output_contents.append(encode_bytes(array))
        else:
            response.raw_output_contents.append(np.ascontiguousarray(array, dtype=NUMPY_OF[datatype]).tobytes())


def parameter_value(parameter: oip.InferParameter) -> object:
    """The Python value of an InferParameter (None when unset)."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None
