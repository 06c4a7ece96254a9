"""Batch prediction jobs: a model run over an ingest dataset version, written back to ingest
as a new version of an output dataset, outside the request path.

CreateBatchPredictionJob checks up front what a job needs (the names, the target ready on
this replica, the input version and the output dataset in ingest, their regions and the
columns on both sides), stores the job QUEUED and answers. A runner thread claims it
(QUEUED -> RUNNING, atomically, so one replica runs it), reads the input as ingest's
stream of Arrow batches of `batch_size` rows, runs every batch through the same loaded
ONNX Runtime session, dynamic batcher and feature enrichment that answer online
requests, and streams the output batches to ingest's IngestBatches. Ingest commits the
output as one new version only when the job closes that stream; a job that fails or is
cancelled cuts it, so nothing is half-written.

While it runs, the job writes its progress and renews a heartbeat in serving's store; a
cancel is seen at the next batch on this replica, within a progress interval on another.
A RUNNING job whose heartbeat stopped (its replica died) is failed by any replica.
"""

from __future__ import annotations

import datetime as dt
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import AlreadyExists, FailedPrecondition, FalajError, InvalidArgument, NotFound
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.serving import convert
from falaj_platform.services.serving.config import ServingConfig
from falaj_platform.services.serving.engine import InferenceEngine
from falaj_platform.services.serving.enrichment import Enricher
from falaj_platform.services.serving.ingest_client import DatasetInfo, DatasetWriter, IngestDatasets, VersionInfo
from falaj_platform.services.serving.models import LoadedModel
from falaj_platform.services.serving.sources import NUMBERED_VERSION_PATTERN
from falaj_platform.services.serving.store import BatchJobRow, ServingStore, request_log
from falaj_platform.services.serving.streaming import input_array, input_column_names, output_columns
from falaj_platform.services.serving.tensors import TensorSpec, check_against

log = get_logger()
SERVICE = "/falaj.serving.v1.ServingService/"
SERVING_IDENTITY = "spiffe://falaj.local/service/serving"
JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DATASET = re.compile(r"^datasets/[a-z][a-z0-9_-]{0,62}$")
DATASET_VERSION = re.compile(r"^datasets/[a-z][a-z0-9_-]{0,62}/versions/([1-9][0-9]{0,17}|latest)$")
DEPLOYMENT = re.compile(r"^deployments/[a-z0-9][a-z0-9-]{0,62}$")
ERROR_COLUMN = "prediction_error"
MAX_BATCH_SIZE = 65_536
# Failures that belong to a row's values, not to the job: the row is written with its
# reason (or fails the job when the output has no error column); any other error fails
# the job.
ROW_FAILURE_REASONS = frozenset({"DATATYPE_MISMATCH", "BYTES_NOT_UTF8", "FEATURE_VALUE_MISSING", "BAD_ENTITY_KEYS"})
# Arrow type of each output column by OIP datatype (what ingest's FLOAT, INT, BOOL and
# STRING columns hold), the same for every batch of the stream; integers are INT64.
ARROW_OF_DATATYPE = {"BOOL": pa.bool_(), "FP16": pa.float64(), "FP32": pa.float64(), "FP64": pa.float64(), "BYTES": pa.string()}


class Auditor(Protocol):
    def report(
        self, event: str, *, resource: str, action: str, allowed: bool = True, detail: str = "", attributes: dict[str, str] | None = None
    ) -> None: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def job_state_name(value: int) -> str:
    """`RUNNING` for JOB_STATE_RUNNING (the stored form); INVALID_ARGUMENT for an unknown number."""
    try:
        return str(pb.JobState.Name(value)).removeprefix("JOB_STATE_")  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument(f"state {value} is not a JobState", reason="INVALID_ENUM", metadata={"field": "state"}) from None


def _job_id(name: str) -> str:
    job_id = name.removeprefix("batchPredictionJobs/")
    if not name.startswith("batchPredictionJobs/") or not JOB_ID.match(job_id):
        raise InvalidArgument(
            f"name must be batchPredictionJobs/{{job_id}}, got {name!r}", reason="INVALID_NAME", metadata={"field": "name"}
        )
    return job_id


def job_to_proto(row: BatchJobRow) -> pb.BatchPredictionJob:
    job = convert.from_json(row.spec_json, pb.BatchPredictionJob)
    job.name = f"batchPredictionJobs/{row.id}"
    job.state = convert.enum_value(pb.JobState, "JOB_STATE_", row.state)
    job.error_message = row.error_message
    job.resolved_model_version = row.resolved_model_version
    job.output_dataset_version = row.output_dataset_version
    job.total_rows = row.total_rows
    job.processed_rows = row.processed_rows
    job.failed_rows = row.failed_rows
    job.residency.region = row.residency_region
    convert.stamp(job.created, row.created_by, row.created_at)
    if row.start_time is not None:
        job.start_time.FromDatetime(row.start_time)
    if row.end_time is not None:
        job.end_time.FromDatetime(row.end_time)
    return job


def validate_job(job: pb.BatchPredictionJob) -> None:
    """The checks that need nothing but the request."""
    which = job.WhichOneof("target")
    if which is None:
        raise InvalidArgument("job needs a target: a deployment or a model_version", reason="NO_TARGET", metadata={"field": "job.target"})
    if which == "deployment" and not DEPLOYMENT.match(job.deployment):
        raise InvalidArgument(
            f"job.deployment must be deployments/{{deployment_id}}, got {job.deployment!r}",
            reason="INVALID_NAME",
            metadata={"field": "job.deployment"},
        )
    if which == "model_version" and not NUMBERED_VERSION_PATTERN.match(job.model_version):
        raise InvalidArgument(
            f"job.model_version must be a numbered version models/{{model}}/versions/{{n}}, got {job.model_version!r}",
            reason="INVALID_MODEL_VERSION",
            metadata={"field": "job.model_version"},
        )
    if not DATASET_VERSION.match(job.input_dataset_version):
        raise InvalidArgument(
            f"job.input_dataset_version must be datasets/{{dataset}}/versions/{{version}}, got {job.input_dataset_version!r}",
            reason="INVALID_NAME",
            metadata={"field": "job.input_dataset_version"},
        )
    if not DATASET.match(job.output_dataset):
        raise InvalidArgument(
            f"job.output_dataset must be datasets/{{dataset}}, got {job.output_dataset!r}",
            reason="INVALID_NAME",
            metadata={"field": "job.output_dataset"},
        )
    if not 0 <= job.batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgument(
            f"job.batch_size must be within 1..{MAX_BATCH_SIZE} (0 for the default), got {job.batch_size}",
            reason="INVALID_BATCH_SIZE",
            metadata={"field": "job.batch_size"},
        )
    seen: set[str] = set()
    for name in job.passthrough_columns:
        if not name or name in seen:
            raise InvalidArgument(
                f"job.passthrough_columns must name distinct columns, got {name!r} twice or empty",
                reason="INVALID_PASSTHROUGH",
                metadata={"field": "job.passthrough_columns"},
            )
        seen.add(name)


def _spec_of(job: pb.BatchPredictionJob, default_batch_size: int) -> pb.BatchPredictionJob:
    """The fields a client sets (output-only fields dropped), with the batch size in effect."""
    spec = pb.BatchPredictionJob(
        input_dataset_version=job.input_dataset_version,
        output_dataset=job.output_dataset,
        passthrough_columns=list(job.passthrough_columns),
        batch_size=job.batch_size or default_batch_size,
    )
    if job.WhichOneof("target") == "deployment":
        spec.deployment = job.deployment
    else:
        spec.model_version = job.model_version
    return spec


def _predicted_column_names(spec: TensorSpec) -> list[str] | None:
    """Output columns of one model output (as StreamPredict names them); None when its width is dynamic."""
    if len(spec.shape) < 2:
        return [spec.name]
    width = spec.shape[-1]
    if width < 0:
        return None
    return [spec.name] if width == 1 else [f"{spec.name}_{j}" for j in range(width)]


# -- the plan of a job ------------------------------------------------------------------------


@dataclass
class Plan:
    """What a job reads, runs and writes, checked against ingest and the loaded model."""

    model: LoadedModel
    input_version: VersionInfo
    output_dataset: DatasetInfo
    passthrough: list[str]
    direct_inputs: list[TensorSpec]  # inputs read from columns
    key_columns: dict[str, str]  # enrichment: input tensor -> column with its entity keys
    enrichment: pb.FeatureEnrichmentConfig | None
    read_columns: list[str]
    value_columns: list[str]  # a null in one of these fails the row
    output_names: list[str]
    output_column_names: dict[str, list[str] | None]
    output_types: dict[str, pa.DataType]
    write_error_column: bool


@dataclass
class _Active:
    """A job running on this replica: how far it got, and whether it should stop."""

    cancel: threading.Event = field(default_factory=threading.Event)
    lost: bool = False
    processed: int = 0
    failed: int = 0


class _Cancelled(Exception):
    pass


class BatchJobService:
    """Create, get, list and cancel batch prediction jobs, and the runner threads that run them."""

    def __init__(self, store: ServingStore, config: ServingConfig, engine: InferenceEngine, ingest: IngestDatasets, auditor: Auditor):
        self.store = store
        self.config = config
        self.engine = engine
        self.ingest = ingest
        self.auditor = auditor
        self.runner_id = secrets.token_hex(8)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- API --------------------------------------------------------------------------------
    def create_job(self, request: rr.CreateBatchPredictionJobRequest) -> rr.CreateBatchPredictionJobResponse:
        job_id = request.job_id or f"bp-{uuid.uuid4().hex[:16]}"
        if not JOB_ID.match(job_id):
            raise InvalidArgument(
                f"job_id must be lower-case letters, digits or '-', at most 63 characters, got {job_id!r}",
                reason="INVALID_ID",
                metadata={"field": "job_id"},
            )
        method = SERVICE + "CreateBatchPredictionJob"
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CreateBatchPredictionJobResponse)
            existing = self.store.get_batch_job(session, job_id)
        if replayed is not None:
            return replayed
        if existing is not None:
            raise AlreadyExists(f"batchPredictionJobs/{job_id} already exists", reason="JOB_EXISTS", metadata={"job_id": job_id})
        validate_job(request.job)
        spec = _spec_of(request.job, self.config.batch_job_default_batch_size)
        plan = self.plan(spec, f"batchPredictionJobs/{job_id}")
        # `latest` is resolved now: the job predicts the version that was latest when it was made.
        spec.input_dataset_version = plan.input_version.name
        now = _now()
        with self.store.transaction() as session:
            self.store.insert_batch_job(
                session,
                {
                    "id": job_id,
                    "spec_json": convert.to_json(spec),
                    "residency_region": plan.input_version.residency_region,
                    "state": "QUEUED",
                    "total_rows": plan.input_version.row_count,
                    "created_by": current_caller() or SERVING_IDENTITY,
                    "created_at": now,
                },
            )
            row = self.store.get_batch_job(session, job_id)
            assert row is not None
            response = rr.CreateBatchPredictionJobResponse(job=job_to_proto(row))
            remember(session, request_log, method, request, response)
        log.info("batch prediction job queued", job_id=job_id, model_version=plan.model.model_version, input=spec.input_dataset_version)
        self.submit(job_id)
        return response

    def get_job(self, name: str) -> pb.BatchPredictionJob:
        job_id = _job_id(name)
        with self.store.transaction() as session:
            row = self.store.get_batch_job(session, job_id)
        if row is None:
            raise NotFound(f"{name} does not exist", reason="JOB_NOT_FOUND", metadata={"job_id": job_id})
        return job_to_proto(row)

    def list_jobs(self, request: rr.ListBatchPredictionJobsRequest) -> rr.ListBatchPredictionJobsResponse:
        size = convert.page_size(request.page_size)
        state = job_state_name(request.state) if request.state else ""
        token = convert.decode_token(request.page_token, "batchPredictionJobs")
        after = None
        if token is not None:
            created_at, _, job_id = str(token).partition("|")
            try:
                after = (dt.datetime.fromisoformat(created_at), job_id)
            except ValueError:
                raise InvalidArgument("page_token is not one this list returned", reason="INVALID_PAGE_TOKEN") from None
        with self.store.transaction() as session:
            rows = self.store.list_batch_jobs(session, after=after, limit=size + 1, state=state)
        response = rr.ListBatchPredictionJobsResponse(jobs=[job_to_proto(row) for row in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = convert.encode_token("batchPredictionJobs", f"{last.created_at.isoformat()}|{last.id}")
        return response

    def cancel_job(self, request: rr.CancelBatchPredictionJobRequest) -> rr.CancelBatchPredictionJobResponse:
        job_id = _job_id(request.name)
        method = SERVICE + "CancelBatchPredictionJob"
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CancelBatchPredictionJobResponse)
            if replayed is not None:
                return replayed
            if self.store.get_batch_job(session, job_id) is None:
                raise NotFound(f"{request.name} does not exist", reason="JOB_NOT_FOUND", metadata={"job_id": job_id})
            now = _now()
            # A queued job stops here; a running one is told, and stops at its next batch.
            if not self.store.update_batch_job(
                session, job_id, {"state": "CANCELLED", "end_time": now, "error_message": "cancelled before it ran"}, only_from=("QUEUED",)
            ):
                self.store.update_batch_job(session, job_id, {"state": "CANCELLING"}, only_from=("RUNNING",))
            row = self.store.get_batch_job(session, job_id)
            assert row is not None
            response = rr.CancelBatchPredictionJobResponse(job=job_to_proto(row))
            remember(session, request_log, method, request, response)
        with self._lock:
            active = self._active.get(job_id)
        if active is not None:
            active.cancel.set()
        log.info("batch prediction job cancel requested", job_id=job_id, state=row.state)
        return response

    # -- planning ---------------------------------------------------------------------------
    def _target(self, spec: pb.BatchPredictionJob) -> tuple[LoadedModel, pb.FeatureEnrichmentConfig | None]:
        enrichment = None
        if spec.WhichOneof("target") == "deployment":
            deployment_id = spec.deployment.removeprefix("deployments/")
            active = self.engine.deployments.get(deployment_id)
            if active is None:
                with self.store.transaction() as session:
                    stored = self.store.get_deployment(session, deployment_id)
                if stored is None:
                    raise NotFound(f"{spec.deployment} does not exist", reason="DEPLOYMENT_NOT_FOUND", metadata={"field": "job.deployment"})
                raise FailedPrecondition(
                    f"{spec.deployment} takes no traffic on this replica ({stored.state}: {stored.state_reason or 'no reason given'})",
                    reason="DEPLOYMENT_NOT_ACTIVE",
                )
            version = active.default_version
            enrichment = active.enrichment
        else:
            version = spec.model_version
        model = self.engine.manager.get(version)
        if model is None or model.state != pb.SERVED_MODEL_STATE_READY:
            raise FailedPrecondition(
                f"{version} is not loaded on this replica; load it with LoadModel (or deploy it) before predicting a dataset",
                reason="MODEL_NOT_LOADED",
                metadata={"model_version": version},
            )
        if enrichment is not None and self.engine.enricher is None:
            raise FailedPrecondition("feature enrichment is not available on this replica", reason="ENRICHMENT_UNAVAILABLE")
        return model, enrichment

    def _check_region(self, region: str, resource: str, job: str) -> None:
        if region == self.config.region or region in self.config.allowed_foreign_regions:
            return
        self.auditor.report(
            "CROSS_REGION_ACCESS",
            resource=resource,
            action="batch_predict",
            allowed=False,
            detail=f"{job}: data of region {region} refused by a serving replica of region {self.config.region}",
            attributes={"residency_region": region, "serving_region": self.config.region},
        )
        raise FailedPrecondition(
            f"{resource} must stay in region {region}; this service runs in {self.config.region} and no policy allows {region} here",
            reason="RESIDENCY_VIOLATION",
            metadata={"residency_region": region},
        )

    def plan(self, spec: pb.BatchPredictionJob, job: str) -> Plan:
        """Check the job against the loaded model and ingest; FAILED_PRECONDITION names what does not fit."""
        model, enrichment = self._target(spec)
        version = self.ingest.get_version(spec.input_dataset_version)
        self._check_region(version.residency_region, version.name, job)
        source = self.ingest.get_dataset(version.dataset)
        output = self.ingest.get_dataset(spec.output_dataset)
        if output.residency_region != version.residency_region:
            raise FailedPrecondition(
                f"{output.name} lives in region {output.residency_region}; the output of {version.name} must stay in "
                f"{version.residency_region}",
                reason="OUTPUT_REGION_MISMATCH",
            )
        names = [column.name for column in source.columns]
        direct = list(model.inputs)
        key_columns: dict[str, str] = {}
        if enrichment is not None:
            target = Enricher.target_of(enrichment, model.inputs)
            direct = [spec_ for spec_ in model.inputs if spec_.name != target.name]
            for binding in enrichment.entity_keys:
                column = binding.input_tensor if binding.input_tensor in names else binding.join_key
                if column not in names:
                    raise FailedPrecondition(
                        f"{version.name} has no column {binding.input_tensor!r} (or {binding.join_key!r}) with the entity keys "
                        f"{spec.deployment} is enriched by",
                        reason="MISSING_INPUT_COLUMN",
                        metadata={"column": binding.input_tensor},
                    )
                key_columns[binding.input_tensor] = column
        value_columns: list[str] = list(key_columns.values())
        for tensor in direct:
            try:
                value_columns += input_column_names(tensor, names)
            except InvalidArgument as error:
                raise FailedPrecondition(
                    f"{version.name} has no column for model input {tensor.name!r}: {error.message}",
                    reason="MISSING_INPUT_COLUMN",
                    metadata={"input": tensor.name},
                ) from None
        for name in spec.passthrough_columns:
            if name not in names:
                raise FailedPrecondition(
                    f"passthrough column {name!r} is not a column of {version.name}",
                    reason="MISSING_PASSTHROUGH",
                    metadata={"column": name},
                )
        outputs = {tensor.name: _predicted_column_names(tensor) for tensor in model.outputs}
        written = list(spec.passthrough_columns)
        for columns in outputs.values():
            written += columns or []
        clashes = sorted({name for name in written if written.count(name) > 1})
        if clashes:
            raise InvalidArgument(f"passthrough column {clashes[0]!r} has the name of a model output column", reason="COLUMN_NAME_CLASH")
        for name in written:
            if output.column(name) is None:
                raise FailedPrecondition(
                    f"{output.name} declares no column {name!r}; its schema needs the passthrough columns and one column per "
                    f"model output ({', '.join(n for c in outputs.values() for n in (c or []))})",
                    reason="OUTPUT_COLUMN_MISSING",
                    metadata={"column": name},
                )
        write_error_column = output.column(ERROR_COLUMN) is not None
        produced = set(written) | ({ERROR_COLUMN} if write_error_column else set())
        for declared in output.columns:
            if declared.name not in produced and not declared.nullable:
                raise FailedPrecondition(
                    f"{output.name} requires column {declared.name!r}, which the job does not write; pass it through or make it nullable",
                    reason="OUTPUT_COLUMN_NOT_WRITTEN",
                    metadata={"column": declared.name},
                )
        read = list(dict.fromkeys([*value_columns, *spec.passthrough_columns]))
        return Plan(
            model=model,
            input_version=version,
            output_dataset=output,
            passthrough=list(spec.passthrough_columns),
            direct_inputs=direct,
            key_columns=key_columns,
            enrichment=enrichment,
            read_columns=read,
            value_columns=list(dict.fromkeys(value_columns)),
            output_names=list(model.output_names),
            output_column_names=outputs,
            output_types={tensor.name: ARROW_OF_DATATYPE.get(tensor.datatype, pa.int64()) for tensor in model.outputs},
            write_error_column=write_error_column,
        )

    # -- runner -----------------------------------------------------------------------------
    def start(self) -> None:
        for index in range(max(self.config.batch_job_workers, 1)):
            thread = threading.Thread(target=self._work, name=f"batch-job-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        monitor = threading.Thread(target=self._monitor, name="batch-job-monitor", daemon=True)
        monitor.start()
        self._threads.append(monitor)

    def stop(self) -> None:
        """Stop taking jobs; running ones are cut (nothing committed) and failed with the reason."""
        self._stop.set()
        with self._lock:
            for active in self._active.values():
                active.lost = True
                active.cancel.set()
        for _ in range(max(self.config.batch_job_workers, 1)):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._queued or job_id in self._active:
                return
            self._queued.add(job_id)
        self._queue.put(job_id)

    def _work(self) -> None:
        while not self._stop.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                self._queued.discard(job_id)
            try:
                self._run(job_id)
            except Exception:
                log.exception("batch prediction runner failed", job_id=job_id)

    def _monitor(self) -> None:
        while not self._stop.wait(self.config.batch_job_poll_interval_s):
            try:
                self.fail_stale_jobs()
                with self.store.transaction() as session:
                    queued = self.store.queued_batch_job_ids(session)
                for job_id in queued:
                    self.submit(job_id)
            except Exception as error:  # noqa: BLE001 - retried at the next interval
                log.warning("batch prediction job check failed", error=str(error))

    def fail_stale_jobs(self) -> list[str]:
        """Fail the jobs whose replica stopped renewing their heartbeat (cancelling ones end CANCELLED)."""
        cutoff = _now() - dt.timedelta(seconds=self.config.batch_job_stale_s)
        with self._lock:
            local = set(self._active)
        with self.store.transaction() as session:
            stale = [row for row in self.store.stale_batch_jobs(session, cutoff) if row.id not in local]
            for row in stale:
                cancelling = row.state == "CANCELLING"
                message = (
                    ""
                    if cancelling
                    else f"the serving replica running the job stopped (no heartbeat for {self.config.batch_job_stale_s:.0f}s); "
                    "nothing was committed; create the job again"
                )
                self.store.update_batch_job(
                    session,
                    row.id,
                    {"state": "CANCELLED" if cancelling else "FAILED", "error_message": message, "end_time": _now()},
                    only_from=(row.state,),
                )
        for row in stale:
            log.warning("batch prediction job lost its replica", job_id=row.id, state=row.state)
        return [row.id for row in stale]

    def _ready_here(self, row: BatchJobRow) -> bool:
        """Whether this replica should take a queued job: its target is ready here, or no replica
        took it within the stale interval (then the run fails, saying why)."""
        try:
            self._target(convert.from_json(row.spec_json, pb.BatchPredictionJob))
        except FalajError:
            # Replicas load what the store says within a sync interval: leave it to one that has.
            return _now() - row.created_at > dt.timedelta(seconds=self.config.batch_job_stale_s)
        return True

    def _run(self, job_id: str) -> None:
        with self.store.transaction() as session:
            queued = self.store.get_batch_job(session, job_id)
        if queued is None or queued.state != "QUEUED" or not self._ready_here(queued):
            return
        now = _now()
        active = _Active()
        with self._lock:
            self._active[job_id] = active
        try:
            with self.store.transaction() as session:
                claimed = self.store.update_batch_job(
                    session,
                    job_id,
                    {"state": "RUNNING", "runner_id": self.runner_id, "heartbeat_at": now, "start_time": now},
                    only_from=("QUEUED",),
                )
                row = self.store.get_batch_job(session, job_id)
            if not claimed or row is None:
                return  # cancelled while queued, or another replica took it
            log.info("batch prediction job started", job_id=job_id)
            self._execute(row, active)
        except _Cancelled:
            if active.lost:
                self._finish(job_id, "FAILED", "serving stopped while the job ran; nothing was committed; create the job again", active)
            else:
                self._finish(job_id, "CANCELLED", "cancelled while running; nothing was committed", active)
        except FalajError as error:
            if active.cancel.is_set() and not active.lost:
                self._finish(job_id, "CANCELLED", "cancelled while running; nothing was committed", active)
            else:
                self._finish(job_id, "FAILED", error.message, active)
        except Exception as error:
            log.exception("batch prediction job failed unexpectedly", job_id=job_id)
            self._finish(job_id, "FAILED", f"internal error ({type(error).__name__}); see the serving log for job {job_id}", active)
        finally:
            with self._lock:
                self._active.pop(job_id, None)

    def _finish(self, job_id: str, state: str, message: str, active: _Active, **values: Any) -> None:
        now = _now()
        values = {"processed_rows": active.processed, "failed_rows": active.failed, **values}
        with self.store.transaction() as session:
            self.store.update_batch_job(
                session,
                job_id,
                {"state": state, "error_message": message, "end_time": now, "heartbeat_at": now, **values},
                only_from=("RUNNING", "CANCELLING"),
            )
        log.info("batch prediction job finished", job_id=job_id, state=state, reason=message)

    def _execute(self, row: BatchJobRow, active: _Active) -> None:
        spec = convert.from_json(row.spec_json, pb.BatchPredictionJob)
        job = f"batchPredictionJobs/{row.id}"
        plan = self.plan(spec, job)
        if plan.input_version.name != spec.input_dataset_version:
            raise FailedPrecondition(f"{spec.input_dataset_version} is no longer readable as such", reason="INPUT_CHANGED")
        progress = _Progress(self, row.id, active)
        progress.save(resolved_model_version=plan.model.model_version, total_rows=plan.input_version.row_count)
        writer: DatasetWriter = self.ingest.open_writer(
            spec.output_dataset,
            # One stream per run: a job is never re-run, so no retry should find an earlier one.
            request_id=f"batch-prediction-{row.id}-{secrets.token_hex(4)}",
            source_description=f"serving {job}: {plan.model.model_version} over {plan.input_version.name}",
        )
        batches = self.ingest.read_version(
            plan.input_version.name, plan.read_columns, plan.input_version.content_hash, spec.batch_size or MAX_BATCH_SIZE
        )
        try:
            for batch in batches:
                progress.check()
                table = pa.Table.from_batches([batch])
                output, failures = self._predict(plan, table)
                if failures and not plan.write_error_column:
                    index = min(failures)
                    raise FailedPrecondition(
                        f"row {progress.processed + index} of {plan.input_version.name} could not be predicted: {failures[index]}; declare a "
                        f"nullable STRING column {ERROR_COLUMN!r} in {plan.output_dataset.name} to write such rows with their reason",
                        reason="ROW_NOT_PREDICTED",
                    )
                writer.write(output)
                progress.advance(table.num_rows, len(failures))
            progress.check(force=True)
            written = writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            batches.close()
        self._finish(
            row.id,
            "SUCCEEDED",
            "",
            active,
            output_dataset_version=written.dataset_version,
            # Rows ingest quarantined did not make it into the output either.
            failed_rows=active.failed + written.rows_quarantined,
        )

    # -- prediction -------------------------------------------------------------------------
    def _run_model(self, plan: Plan, table: pa.Table) -> list[np.ndarray]:
        """Every output for every row of `table`, in plan.output_names order."""
        arrays: dict[str, np.ndarray] = {}
        for tensor, column in plan.key_columns.items():
            arrays[tensor] = np.asarray(table.column(column).to_numpy(zero_copy_only=False))
        for spec in plan.direct_inputs:
            arrays[spec.name] = input_array(table, spec)
        model = plan.model
        if plan.enrichment is not None:
            assert self.engine.enricher is not None
            arrays = self.engine.enricher.enrich(plan.enrichment, model.inputs, arrays).arrays
        check_against(arrays, {}, model.inputs)
        if not model.acquire():
            raise FailedPrecondition(f"{model.model_version} was unloaded while the job ran", reason="MODEL_UNLOADED")
        try:
            if model.batchable:
                return list(model.infer(arrays, table.num_rows))
            # Fixed batch dimension: one row per call, as the online path runs such models.
            rows = [model.infer({name: array[i : i + 1] for name, array in arrays.items()}, 1) for i in range(table.num_rows)]
            return [np.concatenate([row[k] for row in rows]) for k in range(len(plan.output_names))]
        finally:
            model.release()

    def _predict(self, plan: Plan, table: pa.Table) -> tuple[pa.Table, dict[int, str]]:
        """The output rows of one input batch, and the reason of each row that could not be predicted."""
        rows = table.num_rows
        failures: dict[int, str] = {}
        for column in plan.value_columns:
            nulls = np.asarray(table.column(column).is_null().to_numpy(zero_copy_only=False), dtype=bool)
            for index in np.flatnonzero(nulls):
                failures.setdefault(int(index), f"column {column!r} is null")
        good = _kept(rows, failures)
        outputs: list[np.ndarray] | None = None
        if len(good):
            subset = table.take(pa.array(good)) if failures else table
            try:
                outputs = self._run_model(plan, subset)
            except FalajError as error:
                if error.reason not in ROW_FAILURE_REASONS:
                    raise
                # A bad value somewhere in the batch: find the rows, one at a time.
                outputs, bad = self._one_by_one(plan, subset)
                for position, reason in bad.items():
                    failures[int(good[position])] = reason
                good = _kept(rows, failures)
        columns: dict[str, pa.Array | pa.ChunkedArray] = {name: table.column(name) for name in plan.passthrough}
        failed_mask = np.zeros(rows, dtype=bool)
        failed_mask[list(failures)] = True
        if outputs is not None and len(good):
            for name, output in zip(plan.output_names, outputs, strict=True):
                predicted = output_columns([name], [output], len(good))
                if failures:
                    positions = np.zeros(rows, dtype=np.int64)
                    positions[~failed_mask] = np.arange(len(good))
                    take = pa.array(positions, mask=failed_mask)
                    predicted = {column: values.take(take) for column, values in predicted.items()}
                columns.update({column: _cast(values, plan.output_types[name], column) for column, values in predicted.items()})
        else:
            for name in plan.output_names:
                for column in plan.output_column_names[name] or [name]:
                    columns[column] = pa.nulls(rows, plan.output_types[name])
        if plan.write_error_column:
            reasons = pa.array([failures.get(i) for i in range(rows)], pa.string()) if failures else pa.nulls(rows, pa.string())
            columns[ERROR_COLUMN] = reasons
        return pa.table(columns), failures

    def _one_by_one(self, plan: Plan, table: pa.Table) -> tuple[list[np.ndarray] | None, dict[int, str]]:
        bad: dict[int, str] = {}
        results: list[list[np.ndarray]] = []
        for index in range(table.num_rows):
            try:
                results.append(self._run_model(plan, table.slice(index, 1)))
            except FalajError as error:
                if error.reason not in ROW_FAILURE_REASONS:
                    raise
                bad[index] = error.message
        if not results:
            return None, bad
        return [np.concatenate([result[k] for result in results]) for k in range(len(plan.output_names))], bad


def _kept(rows: int, failures: dict[int, str]) -> np.ndarray:
    """Positions of the rows not (yet) failed."""
    if not failures:
        return np.arange(rows, dtype=np.int64)
    return np.setdiff1d(np.arange(rows, dtype=np.int64), np.fromiter(failures, dtype=np.int64))


def _cast(values: pa.Array, target: pa.DataType, column: str) -> pa.Array:
    try:
        return values.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise FailedPrecondition(f"output column {column!r} does not fit {target}: {str(error)[:200]}", reason="OUTPUT_TYPE") from None


class _Progress:
    """Progress of a running job: saved, with the heartbeat, at most once per progress interval;
    every save also learns whether the job was cancelled from another replica."""

    def __init__(self, service: BatchJobService, job_id: str, active: _Active):
        self.service = service
        self.job_id = job_id
        self.active = active
        self._saved_at = time.monotonic()

    @property
    def processed(self) -> int:
        return self.active.processed

    def advance(self, rows: int, failed: int) -> None:
        self.active.processed += rows
        self.active.failed += failed
        self.check()

    def check(self, *, force: bool = False) -> None:
        if self.active.cancel.is_set():
            raise _Cancelled()
        if force or time.monotonic() - self._saved_at >= self.service.config.batch_job_progress_interval_s:
            self.save()

    def save(self, **values: Any) -> None:
        store = self.service.store
        with store.transaction() as session:
            still_running = store.update_batch_job(
                session,
                self.job_id,
                {"processed_rows": self.active.processed, "failed_rows": self.active.failed, "heartbeat_at": _now(), **values},
                only_from=("RUNNING",),
            )
            row = None if still_running else store.get_batch_job(session, self.job_id)
        self._saved_at = time.monotonic()
        if not still_running:
            # CANCELLING (asked on another replica), or taken from us (failed as stale).
            if row is not None and row.state == "CANCELLING":
                self.active.cancel.set()
                raise _Cancelled()
            raise FailedPrecondition(
                f"batchPredictionJobs/{self.job_id} is {row.state if row else 'gone'}; this replica stopped it", reason="JOB_TAKEN"
            )
