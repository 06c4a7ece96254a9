"""A 2-process DDP job (torchrun, gloo on CPU) reaches the single-process result."""

from __future__ import annotations

import onnx
import pytest

from falaj.training.v1 import message_pb2 as pb
from falaj.training.v1 import request_response_pb2 as rr
from tests.conftest import caller
from tests.training.conftest import ALICE, TrainingService, classification_table, create_job, job_spec, wait_for_job, write_dataset


def initializer_shapes(service: TrainingService, version: str) -> dict[str, list[int]]:
    messages = service.stub.DownloadModelArtifact(rr.DownloadModelArtifactRequest(name=version), metadata=caller(ALICE), timeout=10)
    model = onnx.load_from_string(b"".join(m.chunk.data for m in messages if m.WhichOneof("payload") == "chunk"))
    return {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}


def test_a_two_process_job_matches_the_single_process_result(training: TrainingService) -> None:
    version = write_dataset(training, "churn-ddp", classification_table(rows=400, seed=9))
    spec = job_spec(version, "churn-ddp", family=pb.MODEL_FAMILY_MLP, epochs=8, seed=21)
    spec.model.mlp.hidden_sizes[:] = [8]
    spec.hyperparameters.batch_size = 32
    single = create_job(training, spec)
    spec.resources.processes_per_node = 2
    spec.resources.distributed.backend = pb.DISTRIBUTED_BACKEND_GLOO
    spec.hyperparameters.batch_size = 16  # per process: the same 32 rows per step overall
    distributed = create_job(training, spec)

    one = wait_for_job(training, single.name, timeout=90)
    two = wait_for_job(training, distributed.name, timeout=90)
    assert one.state == two.state == pb.TRAINING_JOB_STATE_SUCCEEDED, (one.failure, two.failure)
    assert two.environment.world_size == 2 and one.environment.world_size == 1
    assert sorted(worker.rank for worker in two.workers) == [0, 1]
    assert all(worker.state == pb.WORKER_STATE_EXITED and worker.device == "cpu" for worker in two.workers)
    assert two.export_result.parity.passed
    assert two.latest_progress.step == one.latest_progress.step  # both ran the same steps: 8 epochs of 280/32
    assert initializer_shapes(training, two.model_version) == initializer_shapes(training, one.model_version)
    a, b = one.evaluation.classification, two.evaluation.classification
    assert b.roc_auc > 0.9
    assert b.roc_auc == pytest.approx(a.roc_auc, abs=0.03)
    assert b.accuracy == pytest.approx(a.accuracy, abs=0.06)
    assert b.log_loss == pytest.approx(a.log_loss, abs=0.1)
