"""Faults on the real local stack: SIGKILL a service in its busiest moment, `falaj stack up` again.

- ingest, in the middle of a large IngestBatches stream through the gateway: no version
  and no half-written files are left, nothing stays RUNNING, and the client's retry with
  the same request id commits exactly once.
- training, while a job trains: after the restart the job ends FAILED (worker lost) and
  its worker process is gone; it never stays RUNNING. (The restarted service marks a job
  failed once its lease is `stale_job_seconds` = 60 s old, so this test waits that long.)

The gateway killed during a burst of audited calls is covered by
tests/gateway/test_audit_log.py::test_no_acknowledged_call_loses_its_record_when_the_gateway_is_killed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from falaj.ingest.v1 import message_pb2 as im
from falaj.ingest.v1 import request_response_pb2 as ir
from falaj.ingest.v1 import service_pb2_grpc as isvc
from falaj.training.v1 import message_pb2 as tm
from falaj.training.v1 import request_response_pb2 as tr
from falaj.training.v1 import service_pb2_grpc as ts
from tests.reliability.conftest import LocalStack, stack_env
from tests.reliability.flows import (
    apply_customer_features,
    create_dataset,
    customer_table,
    ingest_customers,
    ingest_stream,
    ipc,
    training_spec,
    wait_for,
    when_reachable,
)

pytestmark = pytest.mark.slow

BATCHES, ROWS_PER_BATCH, KILL_AFTER = 120, 2_000, 40


def test_ingest_killed_mid_stream_leaves_no_version_and_the_retry_commits_once(local_stack: LocalStack) -> None:
    channel = local_stack.channel()
    stub = isvc.IngestServiceStub(channel)
    create_dataset(channel, "killed_stream")
    batches = [ipc(customer_table(i * ROWS_PER_BATCH, ROWS_PER_BATCH)) for i in range(BATCHES)]
    halfway, killed = threading.Event(), threading.Event()

    def interrupted() -> Iterator[ir.IngestBatchesRequest]:
        for index, message in enumerate(ingest_stream("datasets/killed_stream", "kill-mid-stream", batches, ROWS_PER_BATCH)):
            if index == KILL_AFTER:
                halfway.set()
                killed.wait(30)
            yield message

    call = stub.IngestBatches.future(interrupted(), timeout=120)
    assert halfway.wait(60), "the stream never got halfway"
    time.sleep(0.5)  # let the service take in what was sent
    local_stack.kill("ingest")
    killed.set()
    with pytest.raises(grpc.RpcError) as raised:
        call.result(timeout=60)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()  # type: ignore[attr-defined]

    local_stack.up()  # restarts what is not running: ingest
    listed = when_reachable(lambda: stub.ListDatasetVersions(ir.ListDatasetVersionsRequest(parent="datasets/killed_stream"), timeout=30))
    assert listed.dataset_versions == []
    ingestions = stub.ListIngestions(ir.ListIngestionsRequest(parent="datasets/killed_stream"), timeout=30).ingestions
    assert all(i.state not in (im.INGESTION_STATE_RUNNING, im.INGESTION_STATE_SUCCEEDED) for i in ingestions), ingestions
    assert list((local_stack.home / "ingest").rglob("*.parquet")) == [], "files of the killed commit are left behind"

    retried = stub.IngestBatches(ingest_stream("datasets/killed_stream", "kill-mid-stream", batches, ROWS_PER_BATCH), timeout=300)
    again = stub.IngestBatches(ingest_stream("datasets/killed_stream", "kill-mid-stream", batches, ROWS_PER_BATCH), timeout=300)
    assert retried.ingestion.state == im.INGESTION_STATE_SUCCEEDED, retried.ingestion
    assert again.ingestion.dataset_version == retried.ingestion.dataset_version == "datasets/killed_stream/versions/1"
    versions = stub.ListDatasetVersions(ir.ListDatasetVersionsRequest(parent="datasets/killed_stream"), timeout=30).dataset_versions
    assert [(v.name, v.row_count) for v in versions] == [("datasets/killed_stream/versions/1", BATCHES * ROWS_PER_BATCH)]


@pytest.fixture
def training_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A local stack whose training asks for no consent filter (the test data has no data subjects)."""
    stack = LocalStack(stack_env(tmp_path / ".falaj", FALAJ_TRAINING_CONSENT_PURPOSE=""))
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


def _worker_pids(home: Path) -> set[int]:
    """Training worker processes started for this FALAJ_HOME."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "falaj_platform.services.training.worker" in cmdline and "--job-dir" in cmdline and str(home) in cmdline:
            found.add(int(proc.name))
    return found


def test_training_killed_mid_job_ends_the_job_failed_worker_lost(training_stack: LocalStack) -> None:
    channel = training_stack.channel()
    version = ingest_customers(channel, "churn_kill", rows=4_000)
    apply_customer_features(channel, "churn_kill", "churn_kill", materialize=False)
    stub = ts.TrainingServiceStub(channel)
    spec = training_spec(version, "featureServices/churn_kill", "churn-kill", epochs=500)
    job = stub.CreateTrainingJob(
        tr.CreateTrainingJobRequest(training_job=tm.TrainingJob(spec=spec), training_job_id="killed", request_id="kill-job"), timeout=60
    ).training_job

    def training() -> tm.TrainingJob | None:
        current = stub.GetTrainingJob(tr.GetTrainingJobRequest(name=job.name), timeout=30).training_job
        assert current.state not in (tm.TRAINING_JOB_STATE_FAILED, tm.TRAINING_JOB_STATE_SUCCEEDED), current
        return current if current.state == tm.TRAINING_JOB_STATE_RUNNING and current.phase == tm.TRAINING_PHASE_TRAINING else None

    wait_for("the job training", training, timeout=180)
    workers = _worker_pids(training_stack.home)
    assert workers, "no worker process for the running job"
    training_stack.kill("training")
    wait_for("the orphaned worker exiting", lambda: not (_worker_pids(training_stack.home) & workers), timeout=30)
    training_stack.up()

    def finished() -> tm.TrainingJob | None:
        try:
            current = stub.GetTrainingJob(tr.GetTrainingJobRequest(name=job.name), timeout=30).training_job
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # type: ignore[attr-defined]
            return None  # the gateway reconnects to the restarted service after its backoff
        return current if current.state not in (tm.TRAINING_JOB_STATE_RUNNING, tm.TRAINING_JOB_STATE_QUEUED) else None

    # Lease stale after 60 s; the restarted service's monitor looks every 30 s.
    ended = wait_for("the job leaving RUNNING", finished, timeout=150, interval=1.0)
    assert ended.state == tm.TRAINING_JOB_STATE_FAILED, ended
    assert ended.failure.reason == tm.FAILURE_REASON_WORKER_LOST, ended.failure
    assert "submit the job again" in ended.failure.message


OUTAGE_S = 45.0


def test_the_gateway_reaches_a_restarted_service_within_seconds(local_stack: LocalStack) -> None:
    stub = isvc.IngestServiceStub(local_stack.channel())
    stub.ListDatasets(ir.ListDatasetsRequest(), timeout=10)
    local_stack.kill("ingest")
    down = time.monotonic()
    while time.monotonic() - down < OUTAGE_S:  # clients keep calling during the outage, as they do
        try:
            stub.ListDatasets(ir.ListDatasetsRequest(), timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        time.sleep(0.5)
    local_stack.up()
    assert local_stack.health("ingest") == "SERVING"
    back = time.monotonic()
    while True:
        try:
            stub.ListDatasets(ir.ListDatasetsRequest(), timeout=5)
            break
        except grpc.RpcError:
            time.sleep(0.1)
    waited = time.monotonic() - back
    print(f"the gateway forwarded to the restarted ingest {waited:.1f}s after it was SERVING (outage {OUTAGE_S:.0f}s)")
    assert waited < 5.0, f"UNAVAILABLE for {waited:.1f}s after ingest was back"
