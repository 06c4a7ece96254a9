"""Serving over the platform's data, on the real platform: batch prediction jobs that read an
ingest dataset version and write their predictions back to ingest as a new version, and
feature enrichment from the real features service, checked against the offline features
of the same entities at the same time."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as feat_pb
from falaj.features.v1 import request_response_pb2 as feat_rr
from falaj.features.v1 import service_pb2_grpc as feat_service
from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.inference import open_inference_grpc_pb2_grpc as oip_grpc
from falaj.ingest.v1 import message_pb2 as ingest_pb
from falaj.ingest.v1 import request_response_pb2 as ingest_rr
from falaj.ingest.v1 import service_pb2_grpc as ingest_service
from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj.serving.v1 import service_pb2_grpc
from falaj.training.v1 import message_pb2 as train_pb
from falaj_platform.pki import PKI
from tests.gateway.conftest import Platform, stop_platform
from tests.serving.conftest import infer_request, output_array
from tests.serving.models import mlp_model
from tests.serving.platform import import_model, start_serving_platform

FEATURES = ["f0", "f1", "f2", "f3"]
VIEW = "customer_features"
CUSTOMERS = 40
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("serving-datasets")
    pki = PKI(root / "pki")
    pki.init()
    started = start_serving_platform(root / "home", pki)
    yield started
    stop_platform(started)


# -- set-up through the platform's own contracts ------------------------------------------------


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _column(name: str, kind: int, nullable: bool = True) -> ingest_pb.Column:
    return ingest_pb.Column(name=name, type=kind, nullable=nullable)  # type: ignore[arg-type]


def create_dataset(platform: Platform, dataset_id: str, columns: list[ingest_pb.Column], **schema: Any) -> str:
    stub = ingest_service.IngestServiceStub(platform.channel("root"))
    dataset = ingest_pb.Dataset(schema=ingest_pb.Schema(columns=columns, **schema), residency=common_pb2.Residency(region="ae-dxb"))
    return str(stub.CreateDataset(ingest_rr.CreateDatasetRequest(dataset_id=dataset_id, dataset=dataset), timeout=60).dataset.name)


def ingest_table(platform: Platform, dataset: str, table: pa.Table) -> str:
    stub = ingest_service.IngestServiceStub(platform.channel("root"))
    request_id = f"ingest-{dataset.rsplit('/', 1)[-1]}-{time.time_ns()}"
    messages = [
        ingest_rr.IngestBatchesRequest(header=ingest_rr.IngestStreamHeader(dataset=dataset, request_id=request_id)),
        ingest_rr.IngestBatchesRequest(batch=common_pb2.ArrowBatch(arrow_ipc=_ipc(table), batch_id="0", row_count=table.num_rows)),
    ]
    ingestion = stub.IngestBatches(iter(messages), timeout=120).ingestion
    assert ingestion.state == ingest_pb.INGESTION_STATE_SUCCEEDED, ingestion.error_message
    return str(ingestion.dataset_version)


def read_version(platform: Platform, version: str) -> pa.Table:
    stub = ingest_service.IngestServiceStub(platform.channel("root"))
    batches = []
    for message in stub.ReadDatasetVersion(ingest_rr.ReadDatasetVersionRequest(name=version), timeout=60):
        with pa.ipc.open_stream(message.batch.arrow_ipc) as reader:
            batches.extend(reader)
    return pa.Table.from_batches(batches)


def versions_of(platform: Platform, dataset: str) -> list[str]:
    stub = ingest_service.IngestServiceStub(platform.channel("root"))
    return [v.name for v in stub.ListDatasetVersions(ingest_rr.ListDatasetVersionsRequest(parent=dataset), timeout=30).dataset_versions]


def customer_table(customers: int, *, seed: int = 0) -> pa.Table:
    """Two events per customer, an hour apart, with different values: the newer one is the
    value online and the one a point-in-time read at NOW joins."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(customers), 2)
    times = [NOW - dt.timedelta(hours=2 if i % 2 == 0 else 1) for i in range(2 * customers)]
    values = rng.normal(size=(2 * customers, len(FEATURES)))
    data: dict[str, Any] = {
        "customer_id": pa.array(ids, pa.int64()),
        "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
    }
    data |= {name: pa.array(values[:, j]) for j, name in enumerate(FEATURES)}
    return pa.table(data)


@pytest.fixture(scope="module")
def world(platform: Platform) -> dict[str, Any]:
    """Customers in ingest, their features in the features service (materialized online), and
    one model version deployed twice: taking features, and taking customer ids (enriched)."""
    columns = [_column("customer_id", ingest_pb.COLUMN_TYPE_INT, nullable=False), _column("event_time", ingest_pb.COLUMN_TYPE_TIMESTAMP)]
    columns += [_column(name, ingest_pb.COLUMN_TYPE_FLOAT) for name in FEATURES]
    customers = create_dataset(platform, "customers", columns, entity_key_columns=["customer_id"], event_time_column="event_time")
    table = customer_table(CUSTOMERS)
    version = ingest_table(platform, customers, table)

    features = feat_service.FeaturesServiceStub(platform.channel("root"))
    entity = feat_pb.Entity(name="entities/customer", join_keys=[feat_pb.JoinKey(name="customer_id", value_type=feat_pb.VALUE_TYPE_INT64)])
    view = feat_pb.FeatureView(
        name=f"featureViews/{VIEW}",
        entities=[entity.name],
        source=feat_pb.DatasetSource(dataset=customers),
        features=[feat_pb.Feature(name=name, value_type=feat_pb.VALUE_TYPE_DOUBLE) for name in FEATURES],
        online=True,
        residency=common_pb2.Residency(region="ae-dxb"),
    )
    service = feat_pb.FeatureService(name=f"featureServices/{VIEW}", projections=[feat_pb.FeatureViewProjection(feature_view=view.name)])
    definitions = feat_pb.FeatureDefinitions(entities=[entity], feature_views=[view], feature_services=[service])
    features.ApplyFeatureDefinitions(feat_rr.ApplyFeatureDefinitionsRequest(definitions=definitions), timeout=120)
    run = features.Materialize(
        feat_rr.MaterializeRequest(feature_views=[view.name], mode=feat_pb.MATERIALIZATION_MODE_FULL), timeout=300
    ).materialization
    assert run.state == feat_pb.MATERIALIZATION_STATE_SUCCEEDED, run.error_message

    references = [f"{VIEW}:{name}" for name in FEATURES]
    signature = train_pb.ModelSignature(
        inputs=[train_pb.TensorSpec(name="input", feature_references=references)], feature_service=service.name
    )
    path = mlp_model(platform.home / "scorer.onnx", seed=3, inputs=len(FEATURES), hidden=16, outputs=2)
    model_version = import_model(platform, "scorer", path, train_pb.TASK_TYPE_REGRESSION, signature)
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    single = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=model_version))
    enrichment = pb.FeatureEnrichmentConfig(
        feature_service=service.name, entity_keys=[pb.EntityKeyBinding(join_key="customer_id", input_tensor="customer_id")]
    )
    for deployment_id, config in (("scorer", None), ("scorer-online", enrichment)):
        deployment = pb.Deployment(model="models/scorer", traffic_split=single, feature_enrichment=config)
        created = serving.CreateDeployment(rr.CreateDeploymentRequest(deployment_id=deployment_id, deployment=deployment), timeout=120)
        assert created.deployment.state == pb.DEPLOYMENT_STATE_READY, created.deployment.state_reason
    return {"customers": customers, "version": version, "table": table, "model_version": model_version}


def newest_features(table: pa.Table, customers: list[int]) -> np.ndarray:
    """The features of each customer's newer event (rows 2c and 2c + 1 of customer_table are customer c's)."""
    rows = table.take(pa.array([2 * customer + 1 for customer in customers]))
    return np.column_stack([rows.column(name).to_numpy() for name in FEATURES]).astype(np.float32)


def infer_features(platform: Platform, x: np.ndarray) -> oip.ModelInferResponse:
    stub = oip_grpc.GRPCInferenceServiceStub(platform.channel("root"))
    return stub.ModelInfer(infer_request("scorer", x, input_name="input"), timeout=30)


def output_dataset(platform: Platform, dataset_id: str, *, error_column: bool = True) -> str:
    columns = [_column("customer_id", ingest_pb.COLUMN_TYPE_INT, nullable=False)]
    columns += [_column(f"output_{j}", ingest_pb.COLUMN_TYPE_FLOAT) for j in range(2)]
    if error_column:
        columns.append(_column("prediction_error", ingest_pb.COLUMN_TYPE_STRING))
    return create_dataset(platform, dataset_id, columns)


def wait_for_job(platform: Platform, name: str, *, until: tuple[int, ...] | None = None, timeout: float = 120.0) -> pb.BatchPredictionJob:
    terminal = until or (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    deadline = time.monotonic() + timeout
    while True:
        job = serving.GetBatchPredictionJob(rr.GetBatchPredictionJobRequest(name=name), timeout=10).job
        if job.state in terminal:
            return job
        assert time.monotonic() < deadline, f"{name} is still {pb.JobState.Name(job.state)} after {timeout:.0f}s"
        time.sleep(0.1)


def create_job(platform: Platform, job_id: str, **fields: Any) -> pb.BatchPredictionJob:
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    request = rr.CreateBatchPredictionJobRequest(job_id=job_id, job=pb.BatchPredictionJob(**fields))
    return serving.CreateBatchPredictionJob(request, timeout=60).job


# -- batch prediction jobs ------------------------------------------------------------------------


def test_a_batch_job_writes_the_predictions_of_an_ingest_version_as_a_new_version(platform: Platform, world: dict[str, Any]) -> None:
    output = output_dataset(platform, "scores")
    queued = create_job(
        platform,
        "score-customers",
        deployment="deployments/scorer",
        input_dataset_version=world["version"],
        output_dataset=output,
        passthrough_columns=["customer_id"],
        batch_size=7,
    )
    assert queued.name == "batchPredictionJobs/score-customers"
    assert queued.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    assert queued.total_rows == 2 * CUSTOMERS and queued.residency.region == "ae-dxb"
    job = wait_for_job(platform, queued.name)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
    assert (job.processed_rows, job.failed_rows) == (2 * CUSTOMERS, 0)
    assert job.resolved_model_version == world["model_version"]
    assert job.output_dataset_version.startswith(output + "/versions/")
    assert job.start_time.ToDatetime() <= job.end_time.ToDatetime()

    written = read_version(platform, job.output_dataset_version)
    assert written.column("prediction_error").null_count == written.num_rows
    inputs = world["table"]
    x = np.column_stack([inputs.column(name).to_numpy() for name in FEATURES]).astype(np.float32)
    online = output_array(infer_features(platform, x))
    # The same predictions as online, row for row (ingest may store the rows in another order).
    expected = sorted(zip(inputs.column("customer_id").to_pylist(), online[:, 0].tolist(), online[:, 1].tolist(), strict=True))
    got = sorted(zip(*(written.column(c).to_pylist() for c in ("customer_id", "output_0", "output_1")), strict=True))
    assert got == expected

    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    listed = serving.ListBatchPredictionJobs(rr.ListBatchPredictionJobsRequest(state=pb.JOB_STATE_SUCCEEDED), timeout=10).jobs
    assert queued.name in [j.name for j in listed]


def test_a_batch_job_over_an_enriched_deployment_reads_entity_keys_and_fetches_features_online(
    platform: Platform, world: dict[str, Any]
) -> None:
    keys_dataset = create_dataset(platform, "customer_keys", [_column("customer_id", ingest_pb.COLUMN_TYPE_INT, nullable=False)])
    keys = list(range(0, CUSTOMERS, 3))
    version = ingest_table(platform, keys_dataset, pa.table({"customer_id": pa.array(keys, pa.int64())}))
    output = output_dataset(platform, "scores_by_key")
    job = create_job(
        platform,
        "score-keys",
        deployment="deployments/scorer-online",
        input_dataset_version=version,
        output_dataset=output,
        passthrough_columns=["customer_id"],
    )
    job = wait_for_job(platform, job.name)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
    written = read_version(platform, job.output_dataset_version).sort_by("customer_id")
    assert written.column("customer_id").to_pylist() == keys
    x = newest_features(world["table"], keys)
    expected = output_array(infer_features(platform, x))
    got = np.column_stack([written.column(f"output_{j}").to_numpy() for j in range(2)])
    np.testing.assert_array_equal(got, expected.astype(np.float64))


def test_a_row_that_cannot_be_predicted_carries_its_reason_or_fails_a_job_without_an_error_column(
    platform: Platform, world: dict[str, Any]
) -> None:
    columns = [_column("customer_id", ingest_pb.COLUMN_TYPE_INT, nullable=False)]
    columns += [_column(name, ingest_pb.COLUMN_TYPE_FLOAT) for name in FEATURES]
    gappy = create_dataset(platform, "gappy_customers", columns)
    values = {name: pa.array([1.0, 2.0, 3.0, 4.0]) for name in FEATURES}
    values["f2"] = pa.array([1.0, None, 3.0, None], pa.float64())
    version = ingest_table(platform, gappy, pa.table({"customer_id": pa.array([1, 2, 3, 4], pa.int64()), **values}))

    with_errors = output_dataset(platform, "gappy_scores")
    job = create_job(
        platform,
        "gappy",
        model_version=world["model_version"],
        input_dataset_version=version,
        output_dataset=with_errors,
        passthrough_columns=["customer_id"],
    )
    job = wait_for_job(platform, job.name)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
    assert (job.processed_rows, job.failed_rows) == (4, 2)
    written = read_version(platform, job.output_dataset_version).sort_by("customer_id")
    assert written.column("prediction_error").to_pylist() == [None, "column 'f2' is null", None, "column 'f2' is null"]
    assert [v is None for v in written.column("output_0").to_pylist()] == [False, True, False, True]

    strict = output_dataset(platform, "strict_scores", error_column=False)
    job = create_job(
        platform,
        "gappy-strict",
        model_version=world["model_version"],
        input_dataset_version=version,
        output_dataset=strict,
        passthrough_columns=["customer_id"],
    )
    job = wait_for_job(platform, job.name)
    assert job.state == pb.JOB_STATE_FAILED
    assert "column 'f2' is null" in job.error_message and "prediction_error" in job.error_message
    assert job.output_dataset_version == ""
    assert versions_of(platform, strict) == [], "a failed job commits nothing"


def test_cancelling_a_running_batch_job_stops_it_and_commits_nothing(platform: Platform, world: dict[str, Any]) -> None:
    big = create_dataset(
        platform,
        "many_customers",
        [_column("customer_id", ingest_pb.COLUMN_TYPE_INT, nullable=False)]
        + [_column(name, ingest_pb.COLUMN_TYPE_FLOAT) for name in FEATURES],
    )
    rows = 20_000
    values = np.random.default_rng(1).normal(size=(rows, len(FEATURES)))
    table = pa.table({"customer_id": pa.array(np.arange(rows), pa.int64()), **{n: pa.array(values[:, j]) for j, n in enumerate(FEATURES)}})
    version = ingest_table(platform, big, table)
    output = output_dataset(platform, "many_scores")
    job = create_job(
        platform,
        "many",
        model_version=world["model_version"],
        input_dataset_version=version,
        output_dataset=output,
        passthrough_columns=["customer_id"],
        batch_size=1,
    )
    running = wait_for_job(platform, job.name, until=(pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED))
    assert running.state == pb.JOB_STATE_RUNNING, running.error_message
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    cancelled = serving.CancelBatchPredictionJob(
        rr.CancelBatchPredictionJobRequest(name=job.name, request_id="cancel-many"), timeout=10
    ).job
    assert cancelled.state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)
    final = wait_for_job(platform, job.name)
    assert final.state == pb.JOB_STATE_CANCELLED, final.error_message
    assert final.processed_rows < rows and final.output_dataset_version == ""
    assert versions_of(platform, output) == [], "a cancelled job commits nothing"
    # A finished job stays as it is; the retried cancel answers as the first did.
    again = serving.CancelBatchPredictionJob(rr.CancelBatchPredictionJobRequest(name=job.name), timeout=10).job
    assert again.state == pb.JOB_STATE_CANCELLED
    retried = serving.CancelBatchPredictionJob(rr.CancelBatchPredictionJobRequest(name=job.name, request_id="cancel-many"), timeout=10)
    assert retried.job == cancelled


def test_bad_batch_job_requests_get_a_clear_status_and_store_nothing(platform: Platform, world: dict[str, Any]) -> None:
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    good = {
        "model_version": world["model_version"],
        "input_dataset_version": world["version"],
        "output_dataset": output_dataset(platform, "checked_scores"),
        "passthrough_columns": ["customer_id"],
    }

    def status(job_id: str = "", **changes: Any) -> tuple[grpc.StatusCode, str]:
        fields = {**good, **changes}
        try:
            create_job(platform, job_id, **{k: v for k, v in fields.items() if v is not None})
        except grpc.RpcError as error:
            return error.code(), error.details()  # type: ignore[no-any-return, unused-ignore]
        return grpc.StatusCode.OK, ""

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status("Bad_Id")[0] == invalid
    assert status(model_version="models/scorer")[0] == invalid
    assert status(input_dataset_version="customers/versions/1")[0] == invalid
    assert status(output_dataset="datasets/")[0] == invalid
    assert status(batch_size=70_000)[0] == invalid
    assert status(passthrough_columns=["customer_id", "customer_id"])[0] == invalid
    code, details = status(model_version=None, deployment="deployments/no-such-deployment")
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-deployment" in details
    code, details = status(input_dataset_version=world["customers"] + "/versions/99")
    assert code == grpc.StatusCode.NOT_FOUND and "versions/99" in details
    code, details = status(output_dataset="datasets/no_such_output")
    assert code == grpc.StatusCode.NOT_FOUND and "no_such_output" in details
    code, details = status(model_version="models/scorer/versions/9")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in details
    code, details = status(passthrough_columns=["customer_id", "event_time"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "event_time" in details  # not declared by the output
    code, details = status(output_dataset=world["customers"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "output_0" in details
    code, details = status(passthrough_columns=[])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "customer_id" in details  # required by the output, not written
    listed = serving.ListBatchPredictionJobs(rr.ListBatchPredictionJobsRequest(page_size=1000), timeout=10).jobs
    assert not [j for j in listed if j.output_dataset == good["output_dataset"]], "refused jobs are not stored"

    request = rr.CreateBatchPredictionJobRequest(job_id="checked", job=pb.BatchPredictionJob(**good), request_id="create-checked")
    first = serving.CreateBatchPredictionJob(request, timeout=60).job
    assert serving.CreateBatchPredictionJob(request, timeout=60).job == first, "a retry answers as the first call did"
    with pytest.raises(grpc.RpcError) as raised:
        serving.CreateBatchPredictionJob(
            rr.CreateBatchPredictionJobRequest(job_id="checked", job=pb.BatchPredictionJob(**good)), timeout=60
        )
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for call, bad in (
        (serving.GetBatchPredictionJob, rr.GetBatchPredictionJobRequest(name="batchPredictionJobs/nope")),
        (serving.CancelBatchPredictionJob, rr.CancelBatchPredictionJobRequest(name="batchPredictionJobs/nope")),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(bad, timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    for bad_list in (rr.ListBatchPredictionJobsRequest(page_token="garbage"), rr.ListBatchPredictionJobsRequest(state=42)):  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as raised:
            serving.ListBatchPredictionJobs(bad_list, timeout=10)
        assert raised.value.code() == invalid
    wait_for_job(platform, first.name)


def test_list_batch_jobs_pages_newest_first(platform: Platform, world: dict[str, Any]) -> None:
    serving = service_pb2_grpc.ServingServiceStub(platform.channel("root"))
    names, token = [], ""
    while True:
        page = serving.ListBatchPredictionJobs(rr.ListBatchPredictionJobsRequest(page_size=2, page_token=token), timeout=10)
        names += [job.name for job in page.jobs]
        token = page.next_page_token
        if not token:
            break
    everything = serving.ListBatchPredictionJobs(rr.ListBatchPredictionJobsRequest(page_size=1000), timeout=10).jobs
    assert names == [job.name for job in everything]
    created = [job.created.time.ToDatetime() for job in everything]
    assert created == sorted(created, reverse=True)


# -- feature enrichment ---------------------------------------------------------------------------


def test_enriched_prediction_equals_the_prediction_on_the_offline_features_of_the_same_entities(
    platform: Platform, world: dict[str, Any]
) -> None:
    keys = [3, 17, 8]
    oip_stub = oip_grpc.GRPCInferenceServiceStub(platform.channel("root"))
    request = oip.ModelInferRequest(model_name="scorer-online")
    request.inputs.add(name="customer_id", datatype="INT64", shape=[len(keys)]).contents.int64_contents.extend(keys)
    enriched = oip_stub.ModelInfer(request, timeout=30)
    asked_at = dt.datetime.now(dt.UTC)

    # The same entities at the same time, through the offline store's point-in-time join.
    entity_rows = pa.table(
        {"customer_id": pa.array(keys, pa.int64()), "event_timestamp": pa.array([asked_at] * len(keys), pa.timestamp("us", tz="UTC"))}
    )
    features = feat_service.FeaturesServiceStub(platform.channel("root"))
    historical = feat_rr.GetHistoricalFeaturesRequest(
        features=feat_pb.FeatureSelection(feature_service=f"featureServices/{VIEW}"),
        inline_entity_rows=common_pb2.ArrowBatch(arrow_ipc=_ipc(entity_rows), row_count=len(keys)),
    )
    batches = []
    for message in features.GetHistoricalFeatures(historical, timeout=120):
        if message.HasField("batch"):
            with pa.ipc.open_stream(message.batch.arrow_ipc) as reader:
                batches.extend(reader)
    offline = pa.Table.from_batches(batches)
    assert offline.column("customer_id").to_pylist() == keys
    x = np.column_stack([offline.column(name).to_numpy() for name in FEATURES]).astype(np.float32)
    # The join picked each customer's newest event, not the older one (the test would not tell otherwise).
    np.testing.assert_array_equal(x, newest_features(world["table"], keys))

    on_offline_features = infer_features(platform, x)
    np.testing.assert_array_equal(output_array(enriched), output_array(on_offline_features))
    assert enriched.parameters["falaj.model_version"].string_param == world["model_version"]
    assert on_offline_features.parameters["falaj.model_version"].string_param == world["model_version"]
