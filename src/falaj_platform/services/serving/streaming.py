"""StreamPredict: batch inference over a stream of Arrow record batches.

The first message says what answers (a deployment's split, shadows excluded, or one
model version); every later message is an Arrow IPC batch whose columns are the model
inputs by name: a column per input (lists for inputs wider than one value), or one
column per element named `{input}_{j}`, or the feature names of the input's feature
references. Each batch is answered with one output batch, in order, with the same
batch_id, the passthrough columns and one column per output element.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from falaj.common.v1 import common_pb2
from falaj.serving.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.services.serving.engine import InferenceEngine
from falaj_platform.services.serving.models import LoadedModel, require_ready
from falaj_platform.services.serving.tensors import NUMPY_OF, TensorSpec, check_against

MAX_BATCH_ROWS = 1_000_000


def _read(batch: common_pb2.ArrowBatch) -> pa.Table:
    try:
        with pa.ipc.open_stream(pa.BufferReader(batch.arrow_ipc)) as reader:
            table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgument(
            f"batch {batch.batch_id!r} is not an Arrow IPC stream: {str(error)[:200]}", reason="BAD_ARROW_BATCH"
        ) from None
    if table.num_rows > MAX_BATCH_ROWS:
        raise InvalidArgument(f"batch {batch.batch_id!r} holds more than {MAX_BATCH_ROWS} rows; split it", reason="BATCH_TOO_LARGE")
    return table


def input_column_names(spec: TensorSpec, names: Sequence[str]) -> list[str]:
    """The columns an input is read from: its own name, its feature names, or `{input}_{j}`."""
    if spec.name in names:
        return [spec.name]
    width = spec.shape[-1] if len(spec.shape) >= 2 and spec.shape[-1] > 0 else 1
    labels = [r.split(":", 1)[-1] for r in spec.feature_references] or [f"{spec.name}_{j}" for j in range(width)]
    missing = [label for label in labels if label not in names]
    if missing:
        raise InvalidArgument(
            f"the batch has no column {missing[0]!r} for input {spec.name!r}", reason="MISSING_INPUT", metadata={"input": spec.name}
        )
    return labels


def input_array(table: pa.Table, spec: TensorSpec) -> np.ndarray:
    """One model input from the batch's columns (see input_column_names)."""
    dtype = NUMPY_OF[spec.datatype]
    names = table.column_names
    if spec.name in names:
        column = table.column(spec.name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
            values = np.asarray(column.flatten().to_numpy(zero_copy_only=False))
            array = values.reshape(table.num_rows, -1)
        else:
            array = np.asarray(column.to_numpy(zero_copy_only=False)).reshape(table.num_rows, *([1] * (len(spec.shape) - 1)))
    else:
        labels = input_column_names(spec, names)
        array = np.column_stack([np.asarray(table.column(label).to_numpy(zero_copy_only=False)) for label in labels])
    if spec.datatype == "BYTES":
        return array.astype(object)
    try:
        return array.astype(dtype)
    except (TypeError, ValueError):
        raise InvalidArgument(f"input {spec.name!r} values are not {spec.datatype}", reason="DATATYPE_MISMATCH") from None


def output_columns(names: list[str], outputs: list[np.ndarray], rows: int) -> dict[str, pa.Array]:
    """One column per output, or `{output}_{j}` per element of a wider output."""
    columns: dict[str, pa.Array] = {}
    for name, output in zip(names, outputs, strict=True):
        flat = output.reshape(rows, -1)
        if flat.shape[1] == 1:
            columns[name] = pa.array(flat[:, 0])
        else:
            for j in range(flat.shape[1]):
                columns[f"{name}_{j}"] = pa.array(flat[:, j])
    return columns


class StreamPredictor:
    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    def _model(self, config: rr.StreamPredictConfig) -> LoadedModel:
        which = config.WhichOneof("target")
        if which == "deployment":
            deployment = self.engine.deployment(config.deployment.removeprefix("deployments/"))
            if deployment.strategy == "ab_test":
                version = deployment.default_version
            else:
                version = deployment.choose("", lambda name: "", None).route.model_version
            return require_ready(self.engine.manager.get(version), version)
        if which == "model_version":
            return require_ready(self.engine.manager.get(config.model_version), config.model_version)
        raise InvalidArgument("the config needs a deployment or a model_version", reason="NO_TARGET")

    def predict(self, requests: Iterator[rr.StreamPredictRequest]) -> Iterator[rr.StreamPredictResponse]:
        first = next(requests, None)
        if first is None or first.WhichOneof("payload") != "config":
            raise InvalidArgument("the first message of StreamPredict must be its config", reason="CONFIG_MISSING")
        config = first.config
        model = self._model(config)
        wanted = list(config.output_names) or model.output_names
        unknown = [name for name in wanted if name not in model.output_names]
        if unknown:
            raise InvalidArgument(f"output {unknown[0]!r} is not an output of {model.model_version}", reason="UNKNOWN_OUTPUT")
        for message in requests:
            if message.WhichOneof("payload") != "batch":
                raise InvalidArgument("only the first message of StreamPredict may be a config", reason="CONFIG_REPEATED")
            table = _read(message.batch)
            rows = table.num_rows
            arrays = {spec.name: input_array(table, spec) for spec in model.inputs}
            check_against(arrays, {}, model.inputs)
            if not model.acquire():
                raise InvalidArgument(f"{model.model_version} is unloading", reason="MODEL_UNLOADING")
            try:
                outputs = list(model.infer(arrays, rows)) if rows else [np.empty((0,)) for _ in model.output_names]
            finally:
                model.release()
            by_name = dict(zip(model.output_names, outputs, strict=True))
            columns: dict[str, pa.Array] = {}
            for name in config.passthrough_columns:
                if name not in table.column_names:
                    raise InvalidArgument(f"passthrough column {name!r} is not in the batch", reason="MISSING_PASSTHROUGH")
                columns[name] = table.column(name).combine_chunks()
            columns.update(output_columns(wanted, [by_name[n] for n in wanted], rows))
            answer = pa.table(columns)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, answer.schema) as writer:
                writer.write_table(answer)
            yield rr.StreamPredictResponse(
                batch=common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes(), batch_id=message.batch.batch_id, row_count=rows),
                model_version=model.model_version,
            )
