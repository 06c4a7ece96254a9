"""Batch prediction jobs on one serving replica over mTLS, with ingest as an in-memory double
of its contract: the cases the real platform cannot easily stage (another region's data, a
model that breaks mid-job, a replica that died). The whole path through the real ingest
service and gateway is in test_platform_datasets.py."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pyarrow as pa
import pytest

from falaj.ingest.v1 import message_pb2 as ingest_pb
from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import NotFound
from falaj_platform.services.serving.ingest_client import DatasetColumn, DatasetInfo, VersionInfo, WrittenVersion
from tests.conftest import caller
from tests.serving.conftest import Serving
from tests.serving.models import fragile_model, scaled_model

FLOAT, STRING, INT = ingest_pb.COLUMN_TYPE_FLOAT, ingest_pb.COLUMN_TYPE_STRING, ingest_pb.COLUMN_TYPE_INT


class MemoryIngest:
    """The part of the ingest contract batch jobs use, over Arrow tables in memory."""

    def __init__(self) -> None:
        self.datasets: dict[str, DatasetInfo] = {}
        self.versions: dict[str, tuple[VersionInfo, pa.Table]] = {}
        self.committed: list[tuple[str, pa.Table]] = []
        self.aborted: list[str] = []
        self._lock = threading.Lock()

    def add_dataset(self, dataset_id: str, columns: Sequence[tuple[str, int, bool]], region: str = "ae-dxb") -> str:
        name = f"datasets/{dataset_id}"
        self.datasets[name] = DatasetInfo(name, region, tuple(DatasetColumn(*column) for column in columns))
        return name

    def add_version(self, dataset: str, table: pa.Table) -> str:
        name = f"{dataset}/versions/{sum(1 for v in self.versions if v.startswith(dataset + '/')) + 1}"
        info = VersionInfo(name, dataset, table.num_rows, f"hash-of-{name}", self.datasets[dataset].residency_region)
        self.versions[name] = (info, table)
        return name

    def get_dataset(self, dataset: str) -> DatasetInfo:
        if dataset not in self.datasets:
            raise NotFound(f"{dataset} does not exist")
        return self.datasets[dataset]

    def get_version(self, version: str) -> VersionInfo:
        if version not in self.versions:
            raise NotFound(f"{version} does not exist")
        return self.versions[version][0]

    def read_version(self, version: str, columns: Sequence[str], content_hash: str, max_rows_per_batch: int) -> Iterator[pa.RecordBatch]:
        info, table = self.versions[version]
        assert content_hash == info.content_hash
        yield from table.select(list(columns)).to_batches(max_chunksize=max_rows_per_batch)

    def open_writer(self, dataset: str, request_id: str, source_description: str) -> MemoryWriter:
        return MemoryWriter(self, dataset)


class MemoryWriter:
    def __init__(self, ingest: MemoryIngest, dataset: str):
        self.ingest = ingest
        self.dataset = dataset
        self.tables: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self.tables.append(table)

    def commit(self) -> WrittenVersion:
        table = pa.concat_tables(self.tables)
        with self.ingest._lock:
            self.ingest.committed.append((self.dataset, table))
        return WrittenVersion(self.ingest.add_version(self.dataset, table), table.num_rows, 0)

    def abort(self) -> None:
        self.ingest.aborted.append(self.dataset)


def _inputs(rows: list[list[Any]], kind: pa.DataType | None = None) -> pa.Table:
    columns = {f"x_{j}": pa.array([r[j] for r in rows], kind or pa.float64()) for j in range(4)}
    return pa.table({"id": pa.array(range(len(rows)), pa.int64()), **columns})


def _start(start_serving: Callable[..., Serving], model: Callable[..., Any] = scaled_model) -> tuple[Serving, MemoryIngest, str]:
    ingest = MemoryIngest()
    serving = start_serving(ingest=ingest, batch_job_poll_interval_s=0.1, batch_job_stale_s=0.5)
    path = model(serving.models_dir / "m.onnx", 2.0) if model is scaled_model else model(serving.models_dir / "m.onnx")
    version = serving.register("models/m/versions/1", path)
    serving.api.LoadModel(rr.LoadModelRequest(model_version=version, wait_until_ready=True), timeout=30, metadata=caller())
    return serving, ingest, version


def _output(ingest: MemoryIngest, name: str, *, error_column: bool = True) -> str:
    columns = [("id", INT, False), *((f"y_{j}", FLOAT, True) for j in range(4))]
    return ingest.add_dataset(name, columns + ([("prediction_error", STRING, True)] if error_column else []))


def _create(serving: Serving, **fields: Any) -> pb.BatchPredictionJob:
    request = rr.CreateBatchPredictionJobRequest(job=pb.BatchPredictionJob(**fields))
    return serving.api.CreateBatchPredictionJob(request, timeout=30, metadata=caller()).job


def _finished(serving: Serving, name: str, timeout: float = 30.0) -> pb.BatchPredictionJob:
    deadline = time.monotonic() + timeout
    while True:
        job = serving.api.GetBatchPredictionJob(rr.GetBatchPredictionJobRequest(name=name), timeout=10, metadata=caller()).job
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            return job
        assert time.monotonic() < deadline, f"{name} is still {pb.JobState.Name(job.state)}"
        time.sleep(0.05)


def test_a_malformed_value_fails_only_its_row_which_carries_the_reason(start_serving: Callable[..., Serving]) -> None:
    serving, ingest, version = _start(start_serving)
    source = ingest.add_dataset("readings", [("id", INT, False), *((f"x_{j}", STRING, True) for j in range(4))])
    rows = [["1", "2", "3", "4"], ["5", "six", "7", "8"], ["0.5", "1", "1", "1"]]
    inputs = ingest.add_version(source, _inputs(rows, pa.string()))
    job = _create(
        serving, model_version=version, input_dataset_version=inputs, output_dataset=_output(ingest, "out"), passthrough_columns=["id"]
    )
    job = _finished(serving, job.name)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
    assert (job.processed_rows, job.failed_rows) == (3, 1)
    ((_, written),) = ingest.committed
    assert written.column("y_0").to_pylist() == [2.0, None, 1.0]
    assert written.column("y_3").to_pylist() == [8.0, None, 2.0]
    errors = written.column("prediction_error").to_pylist()
    assert errors[0] is None and errors[2] is None and "'x'" in errors[1] and "FP32" in errors[1]


def test_data_of_another_region_is_refused_and_audited(start_serving: Callable[..., Serving]) -> None:
    serving, ingest, version = _start(start_serving)
    source = ingest.add_dataset("auh_readings", [("id", INT, False), *((f"x_{j}", FLOAT, True) for j in range(4))], region="ae-auh")
    inputs = ingest.add_version(source, _inputs([[1.0, 2.0, 3.0, 4.0]]))
    with pytest.raises(grpc.RpcError) as refused:
        _create(
            serving, model_version=version, input_dataset_version=inputs, output_dataset=_output(ingest, "out"), passthrough_columns=["id"]
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "ae-auh" in refused.value.details()
    (event,) = [e for e in serving.auditor.events if e["event"] == "CROSS_REGION_ACCESS"]
    assert event["resource"] == inputs and event["allowed"] is False
    assert ingest.committed == []


def test_a_model_that_breaks_mid_job_fails_the_job_with_the_reason_and_commits_nothing(start_serving: Callable[..., Serving]) -> None:
    serving, ingest, version = _start(start_serving, fragile_model)
    source = ingest.add_dataset("readings", [("id", INT, False), *((f"x_{j}", FLOAT, True) for j in range(4))])
    inputs = ingest.add_version(source, _inputs([[0.0, 1.0, 1.0, 1.0]] * 5 + [[9.0, 1.0, 1.0, 1.0]]))
    job = _create(
        serving,
        model_version=version,
        input_dataset_version=inputs,
        output_dataset=_output(ingest, "out"),
        passthrough_columns=["id"],
        batch_size=2,
    )
    job = _finished(serving, job.name)
    assert job.state == pb.JOB_STATE_FAILED
    assert "models/m/versions/1 failed to run" in job.error_message
    assert job.processed_rows == 4 and job.output_dataset_version == ""
    assert ingest.committed == [] and ingest.aborted == ["datasets/out"]


def test_a_job_whose_replica_stopped_is_failed_and_a_cancelling_one_ends_cancelled(start_serving: Callable[..., Serving]) -> None:
    serving, ingest, _ = _start(start_serving)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with serving.context.store.transaction() as session:
        for job_id, state in (("lost", "RUNNING"), ("lost-cancelling", "CANCELLING")):
            serving.context.store.insert_batch_job(
                session,
                {
                    "id": job_id,
                    "spec_json": "{}",
                    "residency_region": "ae-dxb",
                    "state": state,
                    "runner_id": "a-replica-that-died",
                    "heartbeat_at": long_ago,
                    "created_by": "test",
                    "created_at": long_ago,
                    "start_time": long_ago,
                },
            )
    lost = _finished(serving, "batchPredictionJobs/lost")
    assert lost.state == pb.JOB_STATE_FAILED and "replica running the job stopped" in lost.error_message
    assert _finished(serving, "batchPredictionJobs/lost-cancelling").state == pb.JOB_STATE_CANCELLED
