"""Where CUDA is present the same job runs on the GPU (skipped without CUDA; CPU is the default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from falaj.training.v1 import message_pb2 as pb
from falaj_platform.pki import PKI
from falaj_platform.services.training.config import TrainingConfig
from falaj_platform.services.training.plan import JobPlan
from falaj_platform.services.training.server import cuda_device_count
from falaj_platform.services.training.worker import Columns, run_job
from tests.training.conftest import TrainingService, classification_table, job_spec, start_training_service, train, write_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; CPU stays the default"),
]


@pytest.fixture(scope="module")
def gpu_training(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[TrainingService]:
    service = start_training_service(tmp_path_factory.mktemp("gpu"), pki, TrainingConfig(prewarm_workers=0), cuda_devices=cuda_device_count)
    yield service
    service.close()


def test_a_cuda_job_trains_on_the_gpu_and_registers_a_portable_onnx_model(gpu_training: TrainingService) -> None:
    spec = job_spec(write_dataset(gpu_training, "churn-gpu", classification_table()), "churn-gpu", family=pb.MODEL_FAMILY_MLP)
    spec.resources.device = pb.DEVICE_TYPE_CUDA
    job = train(gpu_training, spec, timeout=120)
    assert job.state == pb.TRAINING_JOB_STATE_SUCCEEDED, job.failure
    assert job.environment.cuda_version and job.environment.devices[0] != "cpu"
    assert job.workers[0].device == "cuda:0"
    assert job.export_result.parity.passed and job.evaluation.classification.roc_auc > 0.9


def test_the_worker_pipeline_runs_on_cuda(tmp_path: Path) -> None:
    table = classification_table()
    features = np.column_stack([table.column(f"customer__{n}").to_numpy() for n in ("tenure", "spend", "visits")])
    plan = JobPlan(
        job_id="gpu",
        task="BINARY_CLASSIFICATION",
        family="MLP",
        device="cuda",
        epochs=5,
        batch_size=32,
        seed=3,
        standardize=True,
        feature_references=("customer:tenure", "customer:spend", "customer:visits"),
        label_column="churned",
        gate_metric="roc_auc",
    )
    events: list[dict[str, object]] = []
    run_job(plan, Columns(features, table.column("churned").to_numpy(), None), tmp_path, events.append)
    assert events[-1] == {"type": "result"}
    assert (tmp_path / "model.onnx").exists()
