"""Training jobs through the real servicer: lifecycle, progress, cancel, reproducibility,
idempotency, bad input, ONNX parity and metrics against a reference computation."""

from __future__ import annotations

import datetime as dt
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from scipy import stats

from falaj.training.v1 import message_pb2 as pb
from falaj.training.v1 import request_response_pb2 as rr
from falaj_platform.services.training.plan import JobPlan
from falaj_platform.services.training.store import training_job_leases
from falaj_platform.services.training.worker import split_rows
from tests.conftest import caller
from tests.training.conftest import (
    ALICE,
    BOB,
    FEATURES,
    TrainingService,
    classification_table,
    create_job,
    error_reason,
    job_spec,
    regression_table,
    rpc_error,
    train,
    wait_for_job,
    write_dataset,
)

PHASE_ORDER = [
    pb.TRAINING_PHASE_PREPARING_DATA,
    pb.TRAINING_PHASE_TRAINING,
    pb.TRAINING_PHASE_EVALUATING,
    pb.TRAINING_PHASE_EXPORTING,
    pb.TRAINING_PHASE_CHECKING_PARITY,
    pb.TRAINING_PHASE_REGISTERING,
]


def download(service: TrainingService, name: str, offset: int = 0, chunk: int = 0) -> tuple[rr.ArtifactHeader, bytes]:
    messages = list(
        service.stub.DownloadModelArtifact(
            rr.DownloadModelArtifactRequest(name=name, start_offset=offset, chunk_size_bytes=chunk), metadata=caller(ALICE), timeout=10
        )
    )
    return messages[0].header, b"".join(m.chunk.data for m in messages[1:])


def get_version(service: TrainingService, name: str) -> pb.ModelVersion:
    return service.stub.GetModelVersion(rr.GetModelVersionRequest(name=name), metadata=caller(ALICE), timeout=10).model_version


def model_exists(service: TrainingService, model: str) -> bool:
    try:
        service.stub.GetRegisteredModel(rr.GetRegisteredModelRequest(name=f"models/{model}"), metadata=caller(ALICE), timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def test_a_job_is_queued_runs_outside_the_request_and_registers_a_version(training: TrainingService) -> None:
    version = write_dataset(training, "churn", classification_table())
    spec = job_spec(version, "churn-lifecycle", family=pb.MODEL_FAMILY_MLP)
    spec.model.mlp.hidden_sizes[:] = [8]
    started = time.monotonic()
    created = create_job(training, spec)
    assert time.monotonic() - started < 2.0  # returned before any training happened
    assert created.state == pb.TRAINING_JOB_STATE_QUEUED
    assert created.create_stamp.actor == caller(ALICE)[0][1]

    events = list(
        training.stub.StreamTrainingJobProgress(rr.StreamTrainingJobProgressRequest(name=created.name), metadata=caller(ALICE), timeout=60)
    )
    states = [event.state for event in events]
    assert states[-1] == pb.TRAINING_JOB_STATE_SUCCEEDED
    assert pb.TRAINING_JOB_STATE_RUNNING in states
    sequences = [event.progress.sequence for event in events]
    assert sequences == sorted(set(sequences)) and sequences[0] == 1
    epochs = [event.progress for event in events if event.progress.epoch]
    assert [p.epoch for p in epochs] == [1, 2, 3, 4, 5]
    assert all(p.total_epochs == 5 and p.train_loss > 0 and p.validation_loss > 0 for p in epochs)
    assert {"accuracy", "roc_auc", "log_loss"} <= set(epochs[-1].metrics)
    assert epochs[-1].step > epochs[0].step > 0
    phases = [event.progress.phase for event in events if event.progress.phase]
    assert [PHASE_ORDER.index(p) for p in phases] == sorted(PHASE_ORDER.index(p) for p in phases)
    assert set(PHASE_ORDER) <= set(phases)

    # Replaying after a sequence gives only the later reports.
    later = list(
        training.stub.StreamTrainingJobProgress(
            rr.StreamTrainingJobProgressRequest(name=created.name, after_sequence=sequences[-3]), metadata=caller(ALICE), timeout=10
        )
    )
    assert [event.progress.sequence for event in later] == sequences[-2:]

    job = wait_for_job(training, created.name)
    assert job.model_version == "models/churn-lifecycle/versions/1"
    assert job.data_summary.train_rows + job.data_summary.validation_rows + job.data_summary.holdout_rows == 240
    assert job.environment.package_versions["torch"].startswith("2.")
    assert job.environment.seed == 7 and job.environment.deterministic_algorithms
    assert job.export_result.parity.passed and job.export_result.parity.rows_checked == job.data_summary.holdout_rows
    assert job.start_time.ToDatetime() <= job.end_time.ToDatetime()

    registered = get_version(training, job.model_version)
    assert registered.source == pb.MODEL_VERSION_SOURCE_TRAINING_JOB
    assert registered.trained_by == caller(ALICE)[0][1]
    assert registered.lineage.training_job == created.name
    assert list(registered.lineage.dataset_versions) == [version]
    assert registered.lineage.code_version == "git:abc123"
    assert registered.lineage.training_set_content_hash == job.data_summary.training_set_content_hash
    assert registered.lineage.environment.seed == 7
    assert registered.metrics["roc_auc"] == pytest.approx(job.evaluation.classification.roc_auc)
    (features_input,) = registered.signature.inputs
    assert list(features_input.feature_references) == list(FEATURES)
    assert list(features_input.shape) == [-1, 3] and features_input.dtype == pb.TENSOR_DATA_TYPE_FLOAT32
    assert list(registered.signature.class_labels) == ["0", "1"]
    assert registered.artifact.sha256 == job.export_result.onnx_sha256
    assert registered.artifact.encryption_algorithm == pb.ENCRYPTION_ALGORITHM_AES_256_GCM

    header, content = download(training, job.model_version)
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    probability = session.run(None, {"features": np.array([[2.0, -2.0, 0.0], [-2.0, 2.0, 0.0]], dtype=np.float32)})[0]
    assert probability.shape == (2,) and probability[0] > 0.5 > probability[1]

    listed = training.stub.ListTrainingJobs(
        rr.ListTrainingJobsRequest(state=pb.TRAINING_JOB_STATE_SUCCEEDED, registered_model="models/churn-lifecycle"),
        metadata=caller(ALICE),
        timeout=10,
    ).training_jobs
    assert [j.name for j in listed] == [created.name]


def test_cancel_stops_a_running_job_and_a_queued_one_and_registers_nothing(training: TrainingService) -> None:
    version = write_dataset(training, "churn-long", classification_table(rows=400))
    running = create_job(training, job_spec(version, "churn-cancelled", epochs=5000))
    queued = create_job(training, job_spec(version, "churn-cancelled-queued"))  # one job at a time: waits
    stream = training.stub.StreamTrainingJobProgress(
        rr.StreamTrainingJobProgressRequest(name=running.name), metadata=caller(ALICE), timeout=60
    )
    for event in stream:
        if event.progress.epoch >= 2:
            break
    stream.cancel()

    cancelled_queued = training.stub.CancelTrainingJob(
        rr.CancelTrainingJobRequest(name=queued.name, reason="not needed"), metadata=caller(BOB), timeout=10
    ).training_job
    assert cancelled_queued.state == pb.TRAINING_JOB_STATE_CANCELLED
    answer = training.stub.CancelTrainingJob(
        rr.CancelTrainingJobRequest(name=running.name, reason="wrong features"), metadata=caller(ALICE), timeout=10
    ).training_job
    assert answer.state in (pb.TRAINING_JOB_STATE_CANCELLING, pb.TRAINING_JOB_STATE_CANCELLED)
    finished = wait_for_job(training, running.name, timeout=30)
    assert finished.state == pb.TRAINING_JOB_STATE_CANCELLED
    assert "wrong features" in finished.latest_progress.message
    assert finished.model_version == ""
    assert not model_exists(training, "churn-cancelled") and not model_exists(training, "churn-cancelled-queued")
    assert wait_for_job(training, queued.name).state == pb.TRAINING_JOB_STATE_CANCELLED

    error = rpc_error(
        lambda: training.stub.CancelTrainingJob(rr.CancelTrainingJobRequest(name=running.name), metadata=caller(ALICE), timeout=10)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_same_spec_on_the_same_data_gives_the_same_metrics(training: TrainingService) -> None:
    version = write_dataset(training, "churn-repro", classification_table(seed=3))
    spec = job_spec(version, "churn-repro", family=pb.MODEL_FAMILY_MLP, seed=11)
    spec.model.mlp.hidden_sizes[:] = [16, 8]
    spec.model.mlp.dropout = 0.1
    first, second = train(training, spec), train(training, spec)
    spec.seed = 12
    other = train(training, spec)
    assert first.state == second.state == other.state == pb.TRAINING_JOB_STATE_SUCCEEDED
    assert first.evaluation == second.evaluation
    assert first.export_result.onnx_sha256 == second.export_result.onnx_sha256
    assert first.data_summary.training_set_content_hash == second.data_summary.training_set_content_hash
    assert first.environment.package_versions == second.environment.package_versions
    assert other.export_result.onnx_sha256 != first.export_result.onnx_sha256
    assert other.evaluation != first.evaluation


def test_create_with_a_request_id_is_idempotent(training: TrainingService) -> None:
    version = write_dataset(training, "churn-idem", classification_table())
    spec = job_spec(version, "churn-idem", epochs=2)
    first = create_job(training, spec, request_id="create-idem-1")
    again = create_job(training, spec, request_id="create-idem-1")
    assert again.name == first.name
    listed = training.stub.ListTrainingJobs(
        rr.ListTrainingJobsRequest(registered_model="models/churn-idem"), metadata=caller(ALICE), timeout=10
    ).training_jobs
    assert [job.name for job in listed] == [first.name]
    spec.seed = 99
    error = rpc_error(lambda: create_job(training, spec, request_id="create-idem-1"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "REQUEST_ID_REUSED"
    assert wait_for_job(training, first.name).state == pb.TRAINING_JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        (lambda s: s.data.ClearField("label_column"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: s.data.ClearField("features"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: s.data.feature_list.references.append("no-view"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: setattr(s.data.entities, "dataset_version", "churn"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: setattr(s.model, "family", pb.MODEL_FAMILY_LINEAR_REGRESSION), grpc.StatusCode.INVALID_ARGUMENT, "FAMILY_TASK_MISMATCH"),
        (lambda s: setattr(s, "task", pb.TASK_TYPE_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: setattr(s.data.split, "holdout_fraction", 0.95), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: setattr(s.evaluation.gate, "metric", "rmse"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (lambda s: setattr(s.resources, "device", pb.DEVICE_TYPE_CUDA), grpc.StatusCode.FAILED_PRECONDITION, "CUDA_UNAVAILABLE"),
        (
            lambda s: setattr(s.resources.distributed, "backend", pb.DISTRIBUTED_BACKEND_NCCL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SPEC",
        ),
        (lambda s: s.registration.aliases.append("production"), grpc.StatusCode.FAILED_PRECONDITION, "PROTECTED_ALIAS"),
        (lambda s: s.registration.ClearField("registered_model"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC"),
        (
            lambda s: s.model.custom_module.CopyFrom(pb.CustomModuleConfig(module_source="x = 1", class_name="Net")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SPEC",
        ),
    ],
)
def test_bad_specs_are_refused_with_a_clear_status(training: TrainingService, change: object, code: grpc.StatusCode, reason: str) -> None:
    spec = job_spec("datasets/churn/versions/1", "churn-bad")
    change(spec)  # type: ignore[operator]
    error = rpc_error(lambda: create_job(training, spec))
    assert error.code() == code
    assert error_reason(error) == reason
    assert error.details()  # a message a person can act on
    assert not model_exists(training, "churn-bad")


def test_submission_checks_identity_names_and_validate_only(training: TrainingService) -> None:
    spec = job_spec("datasets/churn/versions/1", "churn-checks", family=pb.MODEL_FAMILY_CUSTOM_MODULE)
    spec.model.custom_module.CopyFrom(
        pb.CustomModuleConfig(module_source="import torch\nclass Net(torch.nn.Linear): pass", class_name="Net")
    )
    error = rpc_error(lambda: create_job(training, spec, who=BOB))  # bob may not run code in the service
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(error) == "CUSTOM_MODULE_NOT_ALLOWED"

    plain = job_spec("datasets/churn/versions/1", "churn-checks")
    error = rpc_error(lambda: create_job(training, plain, job_id="Bad Id"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    preview = training.stub.CreateTrainingJob(
        rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=plain), validate_only=True, training_job_id="checked-only"),
        metadata=caller(ALICE),
        timeout=10,
    ).training_job
    assert preview.name == "trainingJobs/checked-only" and preview.state == pb.TRAINING_JOB_STATE_UNSPECIFIED
    error = rpc_error(lambda: training.stub.GetTrainingJob(rr.GetTrainingJobRequest(name=preview.name), metadata=caller(ALICE), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: training.stub.GetTrainingJob(rr.GetTrainingJobRequest(name="jobs/x"), metadata=caller(ALICE), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    families = training.stub.ListModelFamilies(
        rr.ListModelFamiliesRequest(task=pb.TASK_TYPE_REGRESSION), metadata=caller(ALICE), timeout=10
    ).model_families
    assert {f.family for f in families} == {pb.MODEL_FAMILY_LINEAR_REGRESSION, pb.MODEL_FAMILY_MLP, pb.MODEL_FAMILY_CUSTOM_MODULE}


def test_bad_training_data_fails_the_job_with_its_reason_and_registers_nothing(training: TrainingService) -> None:
    table = classification_table()
    good = write_dataset(training, "churn-data", table)
    nan_labels = table.set_column(table.schema.get_field_index("churned"), "churned", [np.where(np.arange(240) % 7 == 0, np.nan, 1.0)])
    bad_labels = write_dataset(training, "churn-nan", nan_labels)
    cases = [
        (job_spec(good, "churn-unknown", features=(*FEATURES, "customer:shoe_size")), pb.FAILURE_REASON_UNKNOWN_FEATURE, "shoe_size"),
        (job_spec(good, "churn-nolabel", label="cancelled"), pb.FAILURE_REASON_MISSING_LABEL, "cancelled"),
        (job_spec(bad_labels, "churn-nanlabel"), pb.FAILURE_REASON_INVALID_LABELS, "NaN"),
        (job_spec("datasets/nowhere/versions/1", "churn-nodata"), pb.FAILURE_REASON_INSUFFICIENT_DATA, "does not exist"),
    ]
    jobs = [(create_job(training, spec), reason, needle) for spec, reason, needle in cases]
    for created, reason, needle in jobs:
        job = wait_for_job(training, created.name)
        assert job.state == pb.TRAINING_JOB_STATE_FAILED, job
        assert job.failure.reason == reason
        assert needle in job.failure.message
        assert job.model_version == ""
        assert job.latest_progress.message.startswith("failed:")
    for model in ("churn-unknown", "churn-nolabel", "churn-nanlabel", "churn-nodata"):
        assert not model_exists(training, model)


PARITY_BREAKER = '''
import torch


class Net(torch.nn.Module):
    """Answers something else while it is being exported, as data-dependent Python often does."""

    def __init__(self, num_inputs, num_outputs, width=8):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(num_inputs, width), torch.nn.ReLU(), torch.nn.Linear(width, num_outputs))

    def forward(self, x):
        out = self.body(x)
        if torch.onnx.is_in_onnx_export():
            return out + 0.5
        return out
'''


def test_a_model_that_fails_onnx_parity_is_not_registered_and_a_custom_module_that_passes_is(training: TrainingService) -> None:
    version = write_dataset(training, "churn-custom", classification_table())
    spec = job_spec(version, "churn-parity", family=pb.MODEL_FAMILY_CUSTOM_MODULE)
    spec.model.custom_module.CopyFrom(
        pb.CustomModuleConfig(module_source=PARITY_BREAKER, class_name="Net", init_kwargs_json='{"width": 4}')
    )
    broken = create_job(training, spec)
    honest = PARITY_BREAKER.replace("return out + 0.5", "return out")
    spec.model.custom_module.module_source = honest
    spec.registration.registered_model = "models/churn-custom"
    working = create_job(training, spec)

    failed = wait_for_job(training, broken.name)
    assert failed.state == pb.TRAINING_JOB_STATE_FAILED
    assert failed.failure.reason == pb.FAILURE_REASON_PARITY_FAILED
    assert failed.failure.phase == pb.TRAINING_PHASE_CHECKING_PARITY
    parity = failed.export_result.parity
    assert not parity.passed and parity.outputs[0].mismatched_elements > 0 and parity.outputs[0].max_abs_diff > 1e-3
    assert failed.model_version == "" and not model_exists(training, "churn-parity")
    assert failed.spec.model.custom_module.module_sha256  # recorded for lineage

    passed = wait_for_job(training, working.name)
    assert passed.state == pb.TRAINING_JOB_STATE_SUCCEEDED, passed.failure
    assert get_version(training, passed.model_version).lineage.custom_module_sha256 == passed.spec.model.custom_module.module_sha256


def _held_out(table_rows: int, plan: JobPlan, labels: np.ndarray | None) -> np.ndarray:
    return split_rows(plan, table_rows, labels, None)[2]


def test_held_out_metrics_match_a_reference_computation(training: TrainingService) -> None:
    classification = classification_table(rows=300, seed=5)
    regression = regression_table(rows=300)
    binary_job = create_job(training, job_spec(write_dataset(training, "churn-metrics", classification), "churn-metrics"))
    regression_spec = job_spec(
        write_dataset(training, "ltv", regression),
        "ltv",
        task=pb.TASK_TYPE_REGRESSION,
        family=pb.MODEL_FAMILY_LINEAR_REGRESSION,
        label="lifetime_value",
        epochs=30,
    )
    regression_job = create_job(training, regression_spec)
    x_class = np.column_stack([classification.column(f"customer__{n}").to_numpy() for n in ("tenure", "spend", "visits")])
    x_reg = np.column_stack([regression.column(f"customer__{n}").to_numpy() for n in ("tenure", "spend", "visits")])

    binary = wait_for_job(training, binary_job.name)
    assert binary.state == pb.TRAINING_JOB_STATE_SUCCEEDED
    y = classification.column("churned").to_numpy()
    hold = _held_out(300, JobPlan(job_id="x", task="BINARY_CLASSIFICATION", family="LOGISTIC_REGRESSION", seed=7), y)
    _, content = download(training, binary.model_version)
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    p = session.run(None, {"features": x_class[hold].astype(np.float32)})[0].astype(np.float64)
    actual, predicted = y[hold], (p >= 0.5).astype(int)
    metrics = binary.evaluation.classification
    assert binary.evaluation.rows == len(hold) == 60
    positives, negatives = p[actual == 1], p[actual == 0]
    reference_auc = stats.mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives))
    tp = int(np.sum((predicted == 1) & (actual == 1)))
    assert metrics.roc_auc == pytest.approx(reference_auc, abs=1e-6)
    assert metrics.accuracy == pytest.approx(np.mean(predicted == actual))
    assert metrics.precision == pytest.approx(tp / predicted.sum())
    assert metrics.recall == pytest.approx(tp / actual.sum())
    assert metrics.f1 == pytest.approx(2 * tp / (predicted.sum() + actual.sum()))
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    assert metrics.log_loss == pytest.approx(-np.mean(actual * np.log(clipped) + (1 - actual) * np.log(1 - clipped)), abs=1e-5)
    assert list(metrics.confusion_matrix) == [int(np.sum((actual == a) & (predicted == b))) for a in (0, 1) for b in (0, 1)]

    fitted = wait_for_job(training, regression_job.name)
    assert fitted.state == pb.TRAINING_JOB_STATE_SUCCEEDED
    target = regression.column("lifetime_value").to_numpy()
    hold = _held_out(300, JobPlan(job_id="x", task="REGRESSION", family="LINEAR_REGRESSION", seed=7), None)
    _, content = download(training, fitted.model_version)
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    prediction = session.run(None, {"features": x_reg[hold].astype(np.float32)})[0].astype(np.float64)
    error = prediction - target[hold]
    result = fitted.evaluation.regression
    assert result.rmse == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-5)
    assert result.mae == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    reference_r2 = 1 - np.sum(error**2) / np.sum((target[hold] - target[hold].mean()) ** 2)
    assert result.r2 == pytest.approx(reference_r2, abs=1e-5)
    assert result.r2 > 0.9  # a linear target is learned


def test_a_job_past_its_timeout_fails_and_registers_nothing(training: TrainingService) -> None:
    version = write_dataset(training, "churn-slow", classification_table(rows=400))
    spec = job_spec(version, "churn-timeout", epochs=100_000)
    spec.timeout.FromSeconds(1)
    job = wait_for_job(training, create_job(training, spec).name, timeout=30)
    assert job.state == pb.TRAINING_JOB_STATE_FAILED
    assert job.failure.reason == pb.FAILURE_REASON_TIMEOUT and "timeout of 1 s" in job.failure.message
    assert job.model_version == "" and not model_exists(training, "churn-timeout")


def test_a_job_whose_runner_died_is_marked_failed_as_worker_lost(training: TrainingService) -> None:
    version = write_dataset(training, "churn-orphan", classification_table())
    created = create_job(training, job_spec(version, "churn-orphan", epochs=1))
    wait_for_job(training, created.name)
    store, job_id = training.api.store, created.name.split("/")[1]
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with store.session() as session:  # as if a service process died while it ran the job
        store.update_job(session, job_id, state="RUNNING", phase="TRAINING")
        session.execute(training_job_leases.insert().values(job_id=job_id, runner_id="gone", heartbeat_at=long_ago))
    assert training.api.runner.fail_stale_jobs() == [job_id]
    job = wait_for_job(training, created.name)
    assert job.state == pb.TRAINING_JOB_STATE_FAILED and job.failure.reason == pb.FAILURE_REASON_WORKER_LOST
