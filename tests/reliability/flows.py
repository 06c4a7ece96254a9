"""Small end-to-end set-ups through the gateway, shared by the fault and load tests.

A customer dataset in ingest (entity key, event time, numeric features, a 0/1 label),
a feature view and feature service over it in features, and a tiny ONNX model imported
into training and deployed by serving.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
import pyarrow as pa
from onnx import TensorProto, helper

from falaj.common.v1 import common_pb2 as common
from falaj.features.v1 import message_pb2 as fm
from falaj.features.v1 import request_response_pb2 as fr
from falaj.features.v1 import service_pb2_grpc as fs
from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.ingest.v1 import message_pb2 as im
from falaj.ingest.v1 import request_response_pb2 as ir
from falaj.ingest.v1 import service_pb2_grpc as isvc
from falaj.serving.v1 import message_pb2 as sm
from falaj.serving.v1 import request_response_pb2 as sr
from falaj.serving.v1 import service_pb2_grpc as ss
from falaj.training.v1 import message_pb2 as tm
from falaj.training.v1 import request_response_pb2 as tr
from falaj.training.v1 import service_pb2_grpc as ts

FEATURES = [f"f{i}" for i in range(4)]
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f}s"
        time.sleep(interval)


def when_reachable(call: Callable[[], T], timeout: float = 90.0) -> T:
    """`call()`, retried while the gateway answers UNAVAILABLE: after a service restarts, the gateway's
    channel to it reconnects only after grpc's reconnect backoff (see test_faults' backoff xfail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise
            time.sleep(0.2)


# -- ingest ---------------------------------------------------------------------------------------


def customer_schema() -> im.Schema:
    columns = [
        im.Column(name="customer_id", type=im.COLUMN_TYPE_INT),
        im.Column(name="event_time", type=im.COLUMN_TYPE_TIMESTAMP),
        *(im.Column(name=name, type=im.COLUMN_TYPE_FLOAT) for name in FEATURES),
        im.Column(name="churned", type=im.COLUMN_TYPE_INT, constraints=im.ColumnConstraints(range=im.RangeConstraint(min=0, max=1))),
    ]
    return im.Schema(columns=columns, entity_key_columns=["customer_id"], event_time_column="event_time")


def customer_table(first: int, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + first)
    x = rng.normal(size=(rows, len(FEATURES)))
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    data: dict[str, Any] = {
        "customer_id": pa.array(np.arange(first, first + rows), pa.int64()),
        "event_time": pa.array([start + dt.timedelta(minutes=int(i)) for i in range(first, first + rows)], pa.timestamp("us", tz="UTC")),
    }
    data |= {name: pa.array(x[:, i]) for i, name in enumerate(FEATURES)}
    data["churned"] = pa.array((x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64))
    return pa.table(data)


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def create_dataset(channel: grpc.Channel, dataset_id: str, schema: im.Schema | None = None) -> im.Dataset:
    stub = isvc.IngestServiceStub(channel)
    dataset = im.Dataset(schema=schema or customer_schema(), residency=common.Residency(region="ae-dxb"))
    request = ir.CreateDatasetRequest(dataset_id=dataset_id, dataset=dataset, request_id=f"create-{dataset_id}")
    return stub.CreateDataset(request, timeout=60).dataset


def ingest_stream(dataset: str, request_id: str, batches: list[bytes], rows_per_batch: int) -> Iterator[ir.IngestBatchesRequest]:
    yield ir.IngestBatchesRequest(header=ir.IngestStreamHeader(dataset=dataset, request_id=request_id))
    for index, batch in enumerate(batches):
        yield ir.IngestBatchesRequest(batch=common.ArrowBatch(arrow_ipc=batch, batch_id=f"{request_id}-{index}", row_count=rows_per_batch))


def ingest_customers(channel: grpc.Channel, dataset_id: str, rows: int) -> str:
    """Create the dataset and ingest `rows` customers in one stream; the version's name."""
    create_dataset(channel, dataset_id)
    stream = ingest_stream(f"datasets/{dataset_id}", f"ingest-{dataset_id}", [ipc(customer_table(0, rows))], rows)
    ingestion = isvc.IngestServiceStub(channel).IngestBatches(stream, timeout=120).ingestion
    assert ingestion.state == im.INGESTION_STATE_SUCCEEDED, ingestion
    return str(ingestion.dataset_version)


# -- features -------------------------------------------------------------------------------------


def apply_customer_features(channel: grpc.Channel, dataset_id: str, name: str, *, materialize: bool) -> None:
    """Entity, feature view (online) and feature service over the dataset; optionally materialized."""
    stub = fs.FeaturesServiceStub(channel)
    entity = fm.Entity(name="entities/customer", join_keys=[fm.JoinKey(name="customer_id", value_type=fm.VALUE_TYPE_INT64)])
    view = fm.FeatureView(
        name=f"featureViews/{name}",
        entities=[entity.name],
        source=fm.DatasetSource(dataset=f"datasets/{dataset_id}"),
        features=[fm.Feature(name=feature, value_type=fm.VALUE_TYPE_DOUBLE) for feature in FEATURES],
        online=True,
        residency=common.Residency(region="ae-dxb"),
    )
    service = fm.FeatureService(name=f"featureServices/{name}", projections=[fm.FeatureViewProjection(feature_view=view.name)])
    definitions = fm.FeatureDefinitions(entities=[entity], feature_views=[view], feature_services=[service])
    stub.ApplyFeatureDefinitions(fr.ApplyFeatureDefinitionsRequest(definitions=definitions, request_id=f"apply-{name}"), timeout=120)
    if materialize:
        run = stub.Materialize(
            fr.MaterializeRequest(feature_views=[view.name], mode=fm.MATERIALIZATION_MODE_FULL, request_id=f"materialize-{name}"),
            timeout=300,
        ).materialization
        assert run.state == fm.MATERIALIZATION_STATE_SUCCEEDED, run


def online_request(name: str, customer_ids: list[int]) -> fr.GetOnlineFeaturesRequest:
    references = [f"{name}:{feature}" for feature in FEATURES]
    return fr.GetOnlineFeaturesRequest(
        features=fm.FeatureSelection(features=fm.FeatureReferences(references=references)),
        entities={"customer_id": fm.ValueColumn(values=[fm.Value(int64_value=i) for i in customer_ids])},
    )


def online_values(channel: grpc.Channel, name: str, customer_ids: list[int]) -> dict[int, tuple[float, ...] | None]:
    """Each customer's online feature values of view `name` through the gateway; None where none is stored."""
    response = fs.FeaturesServiceStub(channel).GetOnlineFeatures(online_request(name, customer_ids), timeout=30)
    found: dict[int, tuple[float, ...] | None] = {}
    for row, customer in enumerate(customer_ids):
        statuses = {column.statuses[row] for column in response.columns}
        if statuses == {fm.FIELD_STATUS_NOT_FOUND}:
            found[customer] = None
        else:
            assert statuses == {fm.FIELD_STATUS_PRESENT}, f"customer {customer}: feature statuses {statuses}"
            found[customer] = tuple(column.values[row].double_value for column in response.columns)
    return found


def expected_values(table: pa.Table, customer_ids: list[int]) -> dict[int, tuple[float, ...] | None]:
    """What online_values should answer once `table` (one row per customer) is materialized."""
    rows = {customer: index for index, customer in enumerate(table.column("customer_id").to_pylist())}
    columns = [table.column(feature).to_pylist() for feature in FEATURES]
    return {c: tuple(column[rows[c]] for column in columns) if c in rows else None for c in customer_ids}


# -- training ------------------------------------------------------------------------------------


def training_spec(dataset_version: str, feature_service: str, model: str, *, epochs: int) -> tm.TrainingJobSpec:
    return tm.TrainingJobSpec(
        data=tm.TrainingDataSpec(
            feature_service=feature_service,
            entities=tm.EntityFrame(dataset_version=dataset_version),
            label_column="churned",
            preprocessing=tm.Preprocessing(standardize_numeric=True),
        ),
        task=tm.TASK_TYPE_BINARY_CLASSIFICATION,
        model=tm.ModelSpec(family=tm.MODEL_FAMILY_MLP, mlp=tm.MlpConfig(hidden_sizes=[256, 256])),
        hyperparameters=tm.Hyperparameters(learning_rate=0.001, epochs=epochs, batch_size=8),
        seed=7,
        resources=tm.ResourceSpec(device=tm.DEVICE_TYPE_CPU, cpu_threads_per_process=1),
        registration=tm.RegistrationSpec(registered_model=f"models/{model}"),
    )


# -- a tiny model, imported and deployed ----------------------------------------------------------


def doubling_model(path: Path, width: int = len(FEATURES)) -> Path:
    """y = 2x for a [-1, width] FP32 input named `input`."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "two"], ["output"])],
        "doubling",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def import_model_version(channel: grpc.Channel, model: str, path: Path) -> str:
    """Import an ONNX file as a new version of `models/{model}` (regression); the version's name."""
    content = path.read_bytes()
    header = tr.ImportModelVersionHeader(
        registered_model=f"models/{model}",
        residency=common.Residency(region="ae-dxb"),
        task=tm.TASK_TYPE_REGRESSION,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        import_source="tests/reliability",
    )
    messages = [tr.ImportModelVersionRequest(header=header), tr.ImportModelVersionRequest(chunk=content)]
    return str(ts.TrainingServiceStub(channel).ImportModelVersion(iter(messages), timeout=120).model_version.name)


def infer_request(model: str, x: np.ndarray) -> oip.ModelInferRequest:
    """An Open Inference Protocol request for deployment `model` with FP32 input `input`."""
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return request


def import_and_deploy(channel: grpc.Channel, model: str, path: Path) -> None:
    content = path.read_bytes()
    header = tr.ImportModelVersionHeader(
        registered_model=f"models/{model}",
        residency=common.Residency(region="ae-dxb"),
        task=tm.TASK_TYPE_REGRESSION,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        import_source="tests/reliability",
    )
    messages = [tr.ImportModelVersionRequest(header=header), tr.ImportModelVersionRequest(chunk=content)]
    version = ts.TrainingServiceStub(channel).ImportModelVersion(iter(messages), timeout=120).model_version.name
    routing = sm.TrafficSplit(single=sm.SingleVersionRouting(model_version=version))
    created = (
        ss.ServingServiceStub(channel)
        .CreateDeployment(
            sr.CreateDeploymentRequest(deployment_id=model, deployment=sm.Deployment(model=f"models/{model}", traffic_split=routing)),
            timeout=120,
        )
        .deployment
    )
    assert created.state == sm.DEPLOYMENT_STATE_READY, created
