"""Fixtures of the training tests: the real training service in-process over mTLS.

The service runs with its real SQLite store, artifact store, job runner and worker
processes. Two seams are set here: training data comes from Parquet files
(`ArrowFileDataSource`) instead of the features service, and audit events go to a
recording sink. `test_gateway_flow.py` runs the production wiring instead: training data
through the real gateway and audit events into the gateway's real audit log.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from falaj.training.v1 import message_pb2 as pb
from falaj.training.v1 import request_response_pb2 as rr
from falaj.training.v1 import service_pb2_grpc
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.server import RunningServer
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import load_settings
from falaj_platform.services.training.api import TrainingApi
from falaj_platform.services.training.config import TrainingConfig
from falaj_platform.services.training.data import ArrowFileDataSource
from falaj_platform.services.training.server import build_spec
from tests.backends import RUN, backend_env
from tests.conftest import POSTGRES_URL, caller, identity, missing_service

FINAL_STATES = (pb.TRAINING_JOB_STATE_SUCCEEDED, pb.TRAINING_JOB_STATE_FAILED, pb.TRAINING_JOB_STATE_CANCELLED)
ALICE, BOB = "alice", "bob"
FEATURES = ("customer:tenure", "customer:spend", "customer:visits")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


@dataclass
class RecordingAudit:
    """An audit sink that keeps what it is told (the gateway's audit log is tested in test_gateway_flow)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    fail: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, event_type: Any, *, resource: str, action: str, allowed: bool = True, **extra: Any) -> object:
        if self.fail:
            from falaj_platform.runtime.errors import Unavailable

            raise Unavailable("the audit log is unavailable")
        from falaj_platform.runtime.interceptors import current_caller

        with self.lock:
            self.events.append(
                {
                    "type": event_type,
                    "resource": resource,
                    "action": action,
                    "allowed": allowed,
                    "caller": extra.get("caller") or current_caller(),
                    **extra,
                }
            )
        return None

    def of_type(self, event_type: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [event for event in self.events if event["type"] == event_type]


@dataclass
class TrainingService:
    running: RunningServer
    database: Database
    channel: grpc.Channel
    api: TrainingApi
    audit: RecordingAudit
    data_root: Path
    data_dir: Path

    @property
    def stub(self) -> service_pb2_grpc.TrainingServiceStub:
        return service_pb2_grpc.TrainingServiceStub(self.channel)

    def close(self) -> None:
        self.api.close()
        self.channel.close()
        self.running.stop(0)
        self.database.dispose()


def start_training_service(
    root: Path, pki: PKI, config: TrainingConfig | None = None, cuda_devices: Callable[[], int] = lambda: 0, database_url: str = ""
) -> TrainingService:
    data_root = root / "datasets"
    data_root.mkdir(parents=True, exist_ok=True)
    audit = RecordingAudit()
    holder: dict[str, TrainingApi] = {}
    spec = build_spec(
        config=config or TrainingConfig(custom_module_submitters=frozenset({caller(ALICE)[0][1]}), prewarm_workers=2),
        data_source=lambda _settings: ArrowFileDataSource(data_root),
        audit=lambda _settings: audit,
        on_api=lambda api: holder.setdefault("api", api),
        cuda_devices=cuda_devices,
    )
    env = {**backend_env(root / "home"), "FALAJ_HOME": str(root / "home"), "FALAJ_PKI_DIR": str(pki.root), "FALAJ_LOG_LEVEL": "warning"}
    if database_url:
        env["FALAJ_TRAINING_DATABASE_URL"] = database_url
    settings = load_settings("training", env=env)
    running, database = start_service(spec, settings, listen_addr="127.0.0.1:0")
    channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
    return TrainingService(running, database, channel, holder["api"], audit, data_root, settings.data_dir)


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[TrainingService]:
    """One training service per test module (its warm workers then serve the module's jobs)."""
    service = start_training_service(tmp_path_factory.mktemp("training"), pki)
    yield service
    service.close()


@contextmanager
def fresh_database(backend: str, root: Path) -> Iterator[str]:
    """An empty SQLite file, or a fresh PostgreSQL database when FALAJ_TEST_POSTGRES_URL is set."""
    if backend == "sqlite":
        yield f"sqlite:///{root / 'training.db'}"
        return
    if not POSTGRES_URL:
        missing_service("FALAJ_TEST_POSTGRES_URL is not set")
    admin_url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"{RUN}_training_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        admin.dispose()
        missing_service(f"PostgreSQL at {POSTGRES_URL} is not reachable: {error.orig}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def training_on_each_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[TrainingService]:
    """The training service on its embedded store and on PostgreSQL (when a URL is given)."""
    root = tmp_path_factory.mktemp(f"training-{request.param}")
    with fresh_database(request.param, root) as url:
        service = start_training_service(root, pki, database_url=url)
        try:
            yield service
        finally:
            service.close()


# -- data -----------------------------------------------------------------------------------


def classification_table(rows: int = 240, seed: int = 0, classes: int = 2) -> pa.Table:
    """Separable-ish tabular data: label from a noisy linear score of three features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    score = 1.5 * x[:, 0] - 1.0 * x[:, 1] + 0.3 * rng.normal(size=rows)
    if classes == 2:
        label = (score > 0).astype(np.int64)
    else:
        label = np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])).astype(np.int64)
    stamps = pa.array(np.arange(rows, dtype="int64") * 3_600_000_000, pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            "customer_id": pa.array(np.arange(rows)),
            "event_timestamp": stamps,
            "customer__tenure": x[:, 0],
            "customer__spend": x[:, 1],
            "customer__visits": x[:, 2],
            "churned": label,
        }
    )


def regression_table(rows: int = 240, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    target = 3.0 * x[:, 0] - 2.0 * x[:, 1] + 0.5 * x[:, 2] + 10.0 + 0.1 * rng.normal(size=rows)
    return pa.table(
        {
            "customer_id": pa.array(np.arange(rows)),
            "customer__tenure": x[:, 0],
            "customer__spend": x[:, 1],
            "customer__visits": x[:, 2],
            "lifetime_value": target,
        }
    )


def write_dataset(service: TrainingService, name: str, table: pa.Table, version: str = "1") -> str:
    folder = service.data_root / name
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"{version}.parquet")
    return f"datasets/{name}/versions/{version}"


# -- specs and calls ------------------------------------------------------------------------


def job_spec(
    dataset_version: str,
    model: str,
    *,
    task: int = pb.TASK_TYPE_BINARY_CLASSIFICATION,
    family: int = pb.MODEL_FAMILY_LOGISTIC_REGRESSION,
    label: str = "churned",
    features: tuple[str, ...] = FEATURES,
    epochs: int = 5,
    seed: int = 7,
) -> pb.TrainingJobSpec:
    spec = pb.TrainingJobSpec(
        data=pb.TrainingDataSpec(
            feature_list=pb.FeatureList(references=features),
            entities=pb.EntityFrame(dataset_version=dataset_version),
            label_column=label,
            preprocessing=pb.Preprocessing(standardize_numeric=True),
        ),
        task=task,  # type: ignore[arg-type]
        model=pb.ModelSpec(family=family),  # type: ignore[arg-type]
        hyperparameters=pb.Hyperparameters(learning_rate=0.05, epochs=epochs, batch_size=32),
        seed=seed,
        registration=pb.RegistrationSpec(registered_model=f"models/{model}"),
        code_version="git:abc123",
    )
    return spec


def create_job(
    service: TrainingService, spec: pb.TrainingJobSpec, *, who: str = ALICE, request_id: str = "", job_id: str = ""
) -> pb.TrainingJob:
    request = rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=spec), request_id=request_id, training_job_id=job_id)
    return service.stub.CreateTrainingJob(request, metadata=caller(who), timeout=10).training_job


def wait_for_job(service: TrainingService, name: str, timeout: float = 60.0) -> pb.TrainingJob:
    deadline = time.monotonic() + timeout
    while True:
        job = service.stub.GetTrainingJob(rr.GetTrainingJobRequest(name=name), metadata=caller(ALICE), timeout=10).training_job
        if job.state in FINAL_STATES:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not finish in {timeout} s: {pb.TrainingJobState.Name(job.state)}")
        time.sleep(0.1)


def train(service: TrainingService, spec: pb.TrainingJobSpec, *, who: str = ALICE, timeout: float = 60.0) -> pb.TrainingJob:
    return wait_for_job(service, create_job(service, spec, who=who).name, timeout)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def error_reason(error: grpc.RpcError) -> str:
    from falaj.sdk.errors import from_rpc_error

    return from_rpc_error(error).reason
