"""Thin gRPC servicer of `falaj.training.v1.TrainingService`: proto -> domain -> proto.

Jobs are stored QUEUED and handed to the `JobRunner`, which trains them in worker
processes outside the request path. Registry writes are one transaction each, holding
their idempotency record and, for promotions, the audit reports: if the audit log cannot
record an approval, the alias does not move.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from falaj.training.v1 import message_pb2 as pb
from falaj.training.v1 import request_response_pb2 as rr
from falaj.training.v1 import service_pb2_grpc
from falaj_platform.runtime.audit import SecurityEvent
from falaj_platform.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.settings import Settings
from falaj_platform.runtime.validate import enum_name
from falaj_platform.services.training import convert, names
from falaj_platform.services.training.artifacts import ArtifactStore
from falaj_platform.services.training.config import TrainingConfig
from falaj_platform.services.training.data import TrainingDataSource
from falaj_platform.services.training.errors import ArtifactIntegrityError
from falaj_platform.services.training.onnx_files import inspect_onnx, merge_signature
from falaj_platform.services.training.registry import (
    AuditSink,
    NewVersion,
    Registry,
    check_etag,
    check_separation_of_duties,
    new_etag,
    report_digest_mismatch,
)
from falaj_platform.services.training.runner import JobRunner, ProgressHub, utc_now
from falaj_platform.services.training.spec import TASKS, model_families, resolve_spec
from falaj_platform.services.training.store import FINAL_JOB_STATES, ModelVersionRecord, TrainingStore, request_log

SERVICE = "/falaj.training.v1.TrainingService/"
MAX_IMPORT_CHUNK = 1024 * 1024
DEFAULT_DOWNLOAD_CHUNK = 1024 * 1024
MAX_DOWNLOAD_CHUNK = 4 * 1024 * 1024
STREAM_POLL_SECONDS = 0.5

log = get_logger()


def _state_name(enum: Any, prefix: str, value: int, field: str) -> str:
    return "" if value == 0 else enum_name(enum, value, field, prefix=prefix)


class TrainingApi(service_pb2_grpc.TrainingServiceServicer):
    def __init__(
        self,
        store: TrainingStore,
        settings: Settings,
        *,
        config: TrainingConfig,
        artifacts: ArtifactStore,
        data_source: TrainingDataSource,
        audit: AuditSink,
        cuda_devices: Callable[[], int],
        clock: Callable[[], dt.datetime] = utc_now,
    ):
        self.store = store
        self.settings = settings
        self.config = config
        self.artifacts = artifacts
        self.audit = audit
        self.cuda_devices = cuda_devices
        self.clock = clock
        self.registry = Registry(store, artifacts, settings.region, config.protected_aliases)
        self.hub = ProgressHub()
        self.imports_dir = settings.data_dir / "imports"
        self.runner = JobRunner(
            store=store,
            registry=self.registry,
            data_source=data_source,
            audit=audit,
            config=config,
            region=settings.region,
            work_root=settings.data_dir / "jobs",
            hub=self.hub,
            cuda_devices=cuda_devices,
            clock=clock,
        )

    def start(self) -> None:
        self.runner.start()

    def close(self) -> None:
        self.runner.stop()

    # -- model families -----------------------------------------------------------------
    def ListModelFamilies(self, request: rr.ListModelFamiliesRequest, context: grpc.ServicerContext) -> rr.ListModelFamiliesResponse:
        return rr.ListModelFamiliesResponse(model_families=model_families(request.task))

    # -- training jobs ------------------------------------------------------------------
    def CreateTrainingJob(self, request: rr.CreateTrainingJobRequest, context: grpc.ServicerContext) -> rr.CreateTrainingJobResponse:
        method = SERVICE + "CreateTrainingJob"
        caller = current_caller()
        job_id = names.check_id(request.training_job_id, "training job", "training_job_id") if request.training_job_id else ""
        job_id = job_id or f"job-{secrets.token_hex(8)}"
        spec = request.training_job.spec
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CreateTrainingJobResponse)
        if replayed is not None:
            return replayed
        seed = spec.seed or secrets.randbelow(2**31 - 1) + 1
        resolved = resolve_spec(spec, job_id=job_id, seed=seed, config=self.config, cuda_devices=self.cuda_devices, caller=caller)
        stored_spec = pb.TrainingJobSpec()
        stored_spec.CopyFrom(spec)
        if resolved.custom_module_sha256:
            stored_spec.model.custom_module.module_sha256 = resolved.custom_module_sha256
        status = pb.TrainingJob(environment=pb.RunEnvironment(seed=resolved.plan.seed, world_size=resolved.plan.world_size))
        now = self.clock()
        row = {
            "id": job_id,
            "display_name": request.training_job.display_name,
            "spec_json": convert.to_json(stored_spec),
            "state": "QUEUED",
            "phase": "UNSPECIFIED",
            "residency_region": self.settings.region,
            "target_model": resolved.registration.model,
            "status_json": convert.to_json(status),
            "labels_json": json.dumps(dict(request.training_job.labels), sort_keys=True),
            "request_id": request.request_id or None,
            "created_by": caller,
            "created_at": now,
        }
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CreateTrainingJobResponse)
            if replayed is not None:
                return replayed
            model = self.store.get_model(session, resolved.registration.model)
            if model is not None:
                if model.task != resolved.plan.task:
                    raise FailedPrecondition(
                        f"models/{model.name} is a {model.task} model; the job trains {resolved.plan.task}", reason="TASK_MISMATCH"
                    )
                if model.residency_region != self.settings.region:
                    raise FailedPrecondition(
                        f"models/{model.name} lives in region {model.residency_region}; this service trains on {self.settings.region} data",
                        reason="RESIDENCY_MISMATCH",
                    )
            if request.validate_only:
                preview = pb.TrainingJob(name=names.job_name(job_id), display_name=request.training_job.display_name, spec=stored_spec)
                preview.residency.region = self.settings.region
                return rr.CreateTrainingJobResponse(training_job=preview)
            if self.store.get_job(session, job_id) is not None:
                raise AlreadyExists(f"training job {names.job_name(job_id)} already exists", reason="JOB_EXISTS")
            self.store.insert_job(session, **row)
            queued = pb.TrainingProgress(sequence=1, message="queued", time=convert.timestamp(now))
            self.store.append_progress(session, job_id, convert.to_json(queued), now, 1)
            status.latest_progress.CopyFrom(queued)
            self.store.update_job(session, job_id, status_json=convert.to_json(status))
            record = self.store.get_job(session, job_id)
            assert record is not None
            response = rr.CreateTrainingJobResponse(training_job=convert.job_to_proto(record))
            remember(session, request_log, method, request, response)
        self.runner.submit(job_id)
        return response

    def GetTrainingJob(self, request: rr.GetTrainingJobRequest, context: grpc.ServicerContext) -> rr.GetTrainingJobResponse:
        job_id = names.job_id_of(request.name)
        with self.store.session() as session:
            record = self.store.get_job(session, job_id)
        if record is None:
            raise NotFound(f"training job {request.name} does not exist", reason="JOB_NOT_FOUND")
        return rr.GetTrainingJobResponse(training_job=convert.job_to_proto(record))

    def ListTrainingJobs(self, request: rr.ListTrainingJobsRequest, context: grpc.ServicerContext) -> rr.ListTrainingJobsResponse:
        size = names.page_size(request.page_size)
        state = _state_name(pb.TrainingJobState, "TRAINING_JOB_STATE_", request.state, "state")
        model = names.model_id_of(request.registered_model, "registered_model") if request.registered_model else ""
        query = [state, model, request.submitted_by]
        position = names.decode_page_token(request.page_token, "jobs", query)
        after = (dt.datetime.fromisoformat(position[0]), str(position[1])) if position else None
        with self.store.session() as session:
            records = self.store.list_jobs(
                session, limit=size + 1, after=after, state=state, target_model=model, created_by=request.submitted_by
            )
        page, more = records[:size], len(records) > size
        token = names.encode_page_token("jobs", [page[-1].created_at.isoformat(), page[-1].id], query) if more else ""
        return rr.ListTrainingJobsResponse(training_jobs=[convert.job_to_proto(r) for r in page], next_page_token=token)

    def CancelTrainingJob(self, request: rr.CancelTrainingJobRequest, context: grpc.ServicerContext) -> rr.CancelTrainingJobResponse:
        method = SERVICE + "CancelTrainingJob"
        job_id = names.job_id_of(request.name)
        caller = current_caller()
        message = f"cancelled by {caller}" + (f": {request.reason}" if request.reason else "")
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CancelTrainingJobResponse)
            if replayed is not None:
                return replayed
            record = self.store.get_job(session, job_id)
            if record is None:
                raise NotFound(f"training job {request.name} does not exist", reason="JOB_NOT_FOUND")
            if record.final:
                raise FailedPrecondition(f"training job {request.name} already finished ({record.state})", reason="JOB_FINISHED")
            now = self.clock()
            if record.state == "QUEUED":
                status = convert.from_json(record.status_json, pb.TrainingJob)
                sequence = self.store.last_progress_sequence(session, job_id) + 1
                final = pb.TrainingProgress(sequence=sequence, message=message, time=convert.timestamp(now))
                status.latest_progress.CopyFrom(final)
                if self.store.update_job(
                    session, job_id, only_from=("QUEUED",), state="CANCELLED", end_time=now, status_json=convert.to_json(status)
                ):
                    self.store.append_progress(session, job_id, convert.to_json(final), now, sequence)
            self.store.update_job(session, job_id, only_from=("RUNNING",), state="CANCELLING")
            record = self.store.get_job(session, job_id)
            assert record is not None
            response = rr.CancelTrainingJobResponse(training_job=convert.job_to_proto(record))
            remember(session, request_log, method, request, response)
        self.runner.request_cancel(job_id, message)
        self.hub.notify()
        return response

    def StreamTrainingJobProgress(
        self, request: rr.StreamTrainingJobProgressRequest, context: grpc.ServicerContext
    ) -> Iterator[rr.StreamTrainingJobProgressResponse]:
        job_id = names.job_id_of(request.name)
        after = request.after_sequence
        generation = self.hub.generation
        while context.is_active():
            with self.store.session() as session:
                # The job first: when it is final, every report (the last one commits with the
                # final state) is already there to read.
                record = self.store.get_job(session, job_id)
                if record is None:
                    raise NotFound(f"training job {request.name} does not exist", reason="JOB_NOT_FOUND")
                rows = self.store.list_progress(session, job_id, after)
            state = convert.enum_value(pb.TrainingJobState, "TRAINING_JOB_STATE_", record.state)
            for sequence, text in rows:
                yield rr.StreamTrainingJobProgressResponse(progress=convert.from_json(text, pb.TrainingProgress), state=state)  # type: ignore[arg-type]
                after = sequence
            if record.state in FINAL_JOB_STATES:
                if not rows:
                    latest = convert.from_json(record.status_json, pb.TrainingJob).latest_progress
                    yield rr.StreamTrainingJobProgressResponse(progress=latest, state=state)  # type: ignore[arg-type]
                return
            generation = self.hub.wait(generation, STREAM_POLL_SECONDS)

    # -- registered models --------------------------------------------------------------
    def CreateRegisteredModel(
        self, request: rr.CreateRegisteredModelRequest, context: grpc.ServicerContext
    ) -> rr.CreateRegisteredModelResponse:
        method = SERVICE + "CreateRegisteredModel"
        caller = current_caller()
        model_id = names.check_id(request.registered_model_id, "registered model", "registered_model_id")
        wanted = request.registered_model
        if not wanted.residency.region:
            raise InvalidArgument("registered_model.residency.region is required", metadata={"field": "registered_model.residency"})
        if wanted.task not in TASKS:
            raise InvalidArgument("registered_model.task is required", metadata={"field": "registered_model.task"})
        self.registry.check_region(wanted.residency.region)
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CreateRegisteredModelResponse)
            if replayed is not None:
                return replayed
            if self.store.get_model(session, model_id) is not None:
                raise AlreadyExists(f"registered model models/{model_id} already exists", reason="MODEL_EXISTS")
            now = self.clock()
            self.store.insert_model(
                session,
                name=model_id,
                display_name=wanted.display_name or model_id,
                description=wanted.description,
                owner=wanted.owner or caller,
                residency_region=wanted.residency.region,
                task=TASKS[wanted.task],
                tags_json=json.dumps(dict(wanted.tags), sort_keys=True),
                etag=new_etag(),
                created_by=caller,
                created_at=now,
                updated_by=caller,
                updated_at=now,
            )
            response = rr.CreateRegisteredModelResponse(
                registered_model=convert.model_to_proto(self.registry.require_model(session, model_id))
            )
            remember(session, request_log, method, request, response)
        return response

    def GetRegisteredModel(self, request: rr.GetRegisteredModelRequest, context: grpc.ServicerContext) -> rr.GetRegisteredModelResponse:
        model_id = names.model_id_of(request.name)
        with self.store.session() as session:
            record = self.registry.require_model(session, model_id)
        return rr.GetRegisteredModelResponse(registered_model=convert.model_to_proto(record))

    def ListRegisteredModels(
        self, request: rr.ListRegisteredModelsRequest, context: grpc.ServicerContext
    ) -> rr.ListRegisteredModelsResponse:
        size = names.page_size(request.page_size)
        query = [request.owner, request.residency_region, dict(sorted(request.tags.items()))]
        after = names.decode_page_token(request.page_token, "models", query) or ""
        with self.store.session() as session:
            records = self.store.list_models(
                session,
                limit=size + 1,
                after_name=str(after),
                owner=request.owner,
                region=request.residency_region,
                tags=dict(request.tags),
            )
        page, more = records[:size], len(records) > size
        token = names.encode_page_token("models", page[-1].name, query) if more else ""
        return rr.ListRegisteredModelsResponse(registered_models=[convert.model_to_proto(r) for r in page], next_page_token=token)

    def UpdateRegisteredModel(
        self, request: rr.UpdateRegisteredModelRequest, context: grpc.ServicerContext
    ) -> rr.UpdateRegisteredModelResponse:
        method = SERVICE + "UpdateRegisteredModel"
        wanted = request.registered_model
        model_id = names.model_id_of(wanted.name, "registered_model.name")
        paths = _mask_paths(request.update_mask.paths, {"display_name", "description", "owner", "tags"})
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.UpdateRegisteredModelResponse)
            if replayed is not None:
                return replayed
            record = self.registry.require_model(session, model_id)
            check_etag(wanted.etag, record.etag, f"models/{model_id}")
            values: dict[str, Any] = {}
            if "display_name" in paths:
                values["display_name"] = wanted.display_name or model_id
            if "description" in paths:
                values["description"] = wanted.description
            if "owner" in paths:
                if not wanted.owner:
                    raise InvalidArgument("owner must not be empty", metadata={"field": "registered_model.owner"})
                values["owner"] = wanted.owner
            if "tags" in paths:
                values["tags_json"] = json.dumps(dict(wanted.tags), sort_keys=True)
            self.store.update_model(session, model_id, etag=new_etag(), updated_by=current_caller(), updated_at=self.clock(), **values)
            response = rr.UpdateRegisteredModelResponse(
                registered_model=convert.model_to_proto(self.registry.require_model(session, model_id))
            )
            remember(session, request_log, method, request, response)
        return response

    def DeleteRegisteredModel(
        self, request: rr.DeleteRegisteredModelRequest, context: grpc.ServicerContext
    ) -> rr.DeleteRegisteredModelResponse:
        method = SERVICE + "DeleteRegisteredModel"
        model_id = names.model_id_of(request.name)
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.DeleteRegisteredModelResponse)
            if replayed is not None:
                return replayed
            record = self.registry.require_model(session, model_id)
            check_etag(request.etag, record.etag, request.name)
            protected = sorted(set(record.aliases) & self.config.protected_aliases)
            if protected:
                raise FailedPrecondition(
                    f"{request.name} has the protected alias {protected[0]!r}; it cannot be deleted while one is set",
                    reason="PROTECTED_ALIAS_SET",
                )
            versions = self.store.count_versions(session, model_id)
            if versions and not request.force:
                raise FailedPrecondition(
                    f"{request.name} has {versions} versions; set force to delete them too", reason="MODEL_HAS_VERSIONS"
                )
            paths = self.store.delete_model(session, model_id)
            response = rr.DeleteRegisteredModelResponse(versions_deleted=versions)
            remember(session, request_log, method, request, response)
        for path in paths:
            self.artifacts.delete(path)
        return response

    # -- model versions -----------------------------------------------------------------
    def _version(self, name: str, field: str = "name") -> ModelVersionRecord:
        model, version = names.version_parts(name, field)
        with self.store.session() as session:
            record = self.registry.resolve_version(session, model, version)
        self.registry.check_region(record.residency_region)
        return record

    def GetModelVersion(self, request: rr.GetModelVersionRequest, context: grpc.ServicerContext) -> rr.GetModelVersionResponse:
        return rr.GetModelVersionResponse(model_version=convert.version_to_proto(self._version(request.name)))

    def ListModelVersions(self, request: rr.ListModelVersionsRequest, context: grpc.ServicerContext) -> rr.ListModelVersionsResponse:
        model_id = names.model_id_of(request.parent, "parent")
        size = names.page_size(request.page_size)
        state = _state_name(pb.ModelVersionState, "MODEL_VERSION_STATE_", request.state, "state")
        query = [model_id, state, dict(sorted(request.tags.items()))]
        before = names.decode_page_token(request.page_token, "versions", query)
        with self.store.session() as session:
            self.registry.require_model(session, model_id)
            records = self.store.list_versions(
                session,
                model_id,
                limit=size + 1,
                before_number=None if before is None else int(before),
                state=state,
                tags=dict(request.tags),
            )
        page, more = records[:size], len(records) > size
        token = names.encode_page_token("versions", page[-1].version_number, query) if more else ""
        return rr.ListModelVersionsResponse(model_versions=[convert.version_to_proto(r) for r in page], next_page_token=token)

    def UpdateModelVersion(self, request: rr.UpdateModelVersionRequest, context: grpc.ServicerContext) -> rr.UpdateModelVersionResponse:
        method = SERVICE + "UpdateModelVersion"
        wanted = request.model_version
        model_id, number = names.version_number_of(wanted.name, "model_version.name")
        paths = _mask_paths(request.update_mask.paths, {"description", "tags", "state"})
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.UpdateModelVersionResponse)
            if replayed is not None:
                return replayed
            record = self.registry.resolve_version(session, model_id, str(number))
            check_etag(wanted.etag, record.etag, wanted.name)
            values: dict[str, Any] = {}
            if "description" in paths:
                values["description"] = wanted.description
            if "tags" in paths:
                values["tags_json"] = json.dumps(dict(wanted.tags), sort_keys=True)
            if "state" in paths:
                state = _state_name(pb.ModelVersionState, "MODEL_VERSION_STATE_", wanted.state, "model_version.state")
                if not state:
                    raise InvalidArgument("model_version.state must be READY or ARCHIVED", metadata={"field": "model_version.state"})
                if state == "ARCHIVED" and record.aliases:
                    raise FailedPrecondition(
                        f"{wanted.name} is behind alias {record.aliases[0]!r}; move the alias before archiving", reason="VERSION_ALIASED"
                    )
                values["state"] = state
            self.store.update_version(
                session, model_id, number, etag=new_etag(), updated_by=current_caller(), updated_at=self.clock(), **values
            )
            updated = self.registry.resolve_version(session, model_id, str(number))
            response = rr.UpdateModelVersionResponse(model_version=convert.version_to_proto(updated))
            remember(session, request_log, method, request, response)
        return response

    def DeleteModelVersion(self, request: rr.DeleteModelVersionRequest, context: grpc.ServicerContext) -> rr.DeleteModelVersionResponse:
        method = SERVICE + "DeleteModelVersion"
        model_id, number = names.version_number_of(request.name)
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.DeleteModelVersionResponse)
            if replayed is not None:
                return replayed
            record = self.registry.resolve_version(session, model_id, str(number))
            check_etag(request.etag, record.etag, request.name)
            if record.aliases:
                raise FailedPrecondition(
                    f"{request.name} is behind alias {record.aliases[0]!r}; move or delete the alias first", reason="VERSION_ALIASED"
                )
            self.store.delete_version(session, model_id, number)
            response = rr.DeleteModelVersionResponse(name=request.name)
            remember(session, request_log, method, request, response)
        self.artifacts.delete(record.artifact.path)
        return response

    def ImportModelVersion(
        self, request_iterator: Iterator[rr.ImportModelVersionRequest], context: grpc.ServicerContext
    ) -> rr.ImportModelVersionResponse:
        method = SERVICE + "ImportModelVersion"
        caller = current_caller()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of an import must be its header", reason="IMPORT_HEADER_MISSING")
        header = first.header
        model_id = names.check_id(
            names.model_id_of(header.registered_model, "header.registered_model"), "registered model", "header.registered_model"
        )
        bad_metrics = [name for name, value in header.metrics.items() if not math.isfinite(value)]
        if bad_metrics:
            raise InvalidArgument(f"metric {bad_metrics[0]!r} is not a finite number", metadata={"field": "header.metrics"})
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, header, rr.ImportModelVersionResponse)
            existing = self.store.get_model(session, model_id)
        if replayed is not None:
            for _ in request_iterator:
                pass
            return replayed
        if existing is None:
            if not header.residency.region or header.task not in TASKS:
                raise InvalidArgument(
                    f"models/{model_id} does not exist; give residency and task to create it", reason="MODEL_NOT_FOUND_NEEDS_DETAILS"
                )
            self.registry.check_region(header.residency.region)
        else:
            if header.residency.region and header.residency.region != existing.residency_region:
                raise FailedPrecondition(f"models/{model_id} lives in region {existing.residency_region}", reason="RESIDENCY_MISMATCH")
            if header.task and TASKS.get(header.task) != existing.task:
                raise FailedPrecondition(f"models/{model_id} is a {existing.task} model", reason="TASK_MISMATCH")
        task = existing.task if existing is not None else TASKS[header.task]
        region = existing.residency_region if existing is not None else header.residency.region
        self.imports_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(dir=self.imports_dir, prefix="import-", suffix=".onnx")
        try:
            digest, size = self._receive(request_iterator, fd, header)
            if header.expected_sha256 and header.expected_sha256.lower() != digest:
                raise ArtifactIntegrityError(
                    f"the received file's SHA-256 is {digest}, not the expected {header.expected_sha256}", reason="IMPORT_DIGEST_MISMATCH"
                )
            inspected = inspect_onnx(Path(temp))
            signature = merge_signature(inspected, header.signature)
            lineage = pb.ModelLineage(import_source=header.import_source)
            version = NewVersion(
                source="IMPORTED",
                signature_json=convert.to_json(signature),
                metrics=dict(header.metrics),
                results_json="{}",
                lineage_json=convert.to_json(lineage),
                tags=dict(header.tags),
                description=header.description,
                trained_by=caller,
            )
            with self.store.session() as session:
                model = self.registry.ensure_model(session, model_id, task=task, region=region, owner=caller, now=self.clock())
            answer: dict[str, rr.ImportModelVersionResponse] = {}

            def record_answer(session: Any, number: int) -> None:
                created = self.store.get_version(session, model_id, number)
                assert created is not None
                answer["response"] = rr.ImportModelVersionResponse(model_version=convert.version_to_proto(created))
                remember(session, request_log, method, header, answer["response"])

            self.registry.register(model, version, _file_pieces(Path(temp)), actor=caller, now=self.clock, within=record_answer)
            log.info("model version imported", model=model_id, sha256=digest, size_bytes=size)
            return answer["response"]
        finally:
            Path(temp).unlink(missing_ok=True)

    def _receive(
        self, request_iterator: Iterator[rr.ImportModelVersionRequest], fd: int, header: rr.ImportModelVersionHeader
    ) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as file:
            for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first message of an import may be a header", reason="IMPORT_HEADER_REPEATED")
                if len(message.chunk) > MAX_IMPORT_CHUNK:
                    raise InvalidArgument(f"an import chunk holds at most {MAX_IMPORT_CHUNK} bytes", reason="IMPORT_CHUNK_TOO_LARGE")
                size += len(message.chunk)
                if size > self.config.max_import_bytes:
                    raise InvalidArgument(
                        f"the file is larger than the {self.config.max_import_bytes} bytes an import may hold", reason="IMPORT_TOO_LARGE"
                    )
                digest.update(message.chunk)
                file.write(message.chunk)
        if size == 0:
            raise InvalidArgument("the import carried no bytes of the ONNX file", reason="IMPORT_EMPTY")
        if header.expected_size_bytes and header.expected_size_bytes != size:
            raise InvalidArgument(f"received {size} bytes; the header expects {header.expected_size_bytes}", reason="IMPORT_SIZE_MISMATCH")
        return digest.hexdigest(), size

    def DownloadModelArtifact(
        self, request: rr.DownloadModelArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[rr.DownloadModelArtifactResponse]:
        record = self._version(request.name)
        if request.chunk_size_bytes < 0:
            raise InvalidArgument("chunk_size_bytes must not be negative", metadata={"field": "chunk_size_bytes"})
        chunk_size = min(request.chunk_size_bytes or DEFAULT_DOWNLOAD_CHUNK, MAX_DOWNLOAD_CHUNK)
        if not 0 <= request.start_offset <= record.artifact.size_bytes:
            raise InvalidArgument(
                f"start_offset {request.start_offset} is outside the artifact's {record.artifact.size_bytes} bytes",
                metadata={"field": "start_offset"},
            )
        try:
            # The whole artifact is checked before the first byte leaves: a tampered file
            # is never served, not even in part.
            self.artifacts.verify(record.artifact)
        except ArtifactIntegrityError as error:
            report_digest_mismatch(self.audit, record, error, action="download", caller=current_caller())
            raise
        signature = convert.from_json(record.signature_json, pb.ModelSignature)
        header = rr.ArtifactHeader(
            model_version=names.version_name(record.model, record.version_number),
            format=pb.ARTIFACT_FORMAT_ONNX,
            size_bytes=record.artifact.size_bytes,
            sha256=record.artifact.sha256,
            signature=signature,
        )
        header.residency.region = record.residency_region
        yield rr.DownloadModelArtifactResponse(header=header)
        try:
            for offset, data in self.artifacts.read(record.artifact, request.start_offset):
                for start in range(0, len(data), chunk_size):
                    yield rr.DownloadModelArtifactResponse(
                        chunk=rr.ArtifactChunk(offset=offset + start, data=data[start : start + chunk_size])
                    )
        except ArtifactIntegrityError as error:  # changed on disk while streaming
            report_digest_mismatch(self.audit, record, error, action="download", caller=current_caller())
            raise

    # -- aliases ------------------------------------------------------------------------
    def _check_unprotected(self, alias: str) -> None:
        if alias in self.config.protected_aliases:
            raise FailedPrecondition(
                f"alias {alias!r} is protected: it moves only through an approved promotion request", reason="PROTECTED_ALIAS"
            )

    def SetModelAlias(self, request: rr.SetModelAliasRequest, context: grpc.ServicerContext) -> rr.SetModelAliasResponse:
        method = SERVICE + "SetModelAlias"
        model_id = names.model_id_of(request.registered_model, "registered_model")
        alias = names.check_alias(request.alias)
        self._check_unprotected(alias)
        version_model, number = names.version_number_of(request.model_version, "model_version")
        if version_model != model_id:
            raise InvalidArgument(
                f"{request.model_version} is not a version of {request.registered_model}", metadata={"field": "model_version"}
            )
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.SetModelAliasResponse)
            if replayed is not None:
                return replayed
            version = self.registry.resolve_version(session, model_id, str(number))
            if version.state != "READY":
                raise FailedPrecondition(
                    f"{request.model_version} is {version.state}; only READY versions take aliases", reason="VERSION_NOT_READY"
                )
            caller, now = current_caller(), self.clock()
            self.store.set_alias(session, model_id, alias, number, caller, now)
            self.store.update_model(session, model_id, etag=new_etag(), updated_by=caller, updated_at=now)
            response = rr.SetModelAliasResponse(registered_model=convert.model_to_proto(self.registry.require_model(session, model_id)))
            remember(session, request_log, method, request, response)
        return response

    def DeleteModelAlias(self, request: rr.DeleteModelAliasRequest, context: grpc.ServicerContext) -> rr.DeleteModelAliasResponse:
        method = SERVICE + "DeleteModelAlias"
        model_id = names.model_id_of(request.registered_model, "registered_model")
        alias = names.check_alias(request.alias)
        self._check_unprotected(alias)
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.DeleteModelAliasResponse)
            if replayed is not None:
                return replayed
            self.registry.require_model(session, model_id)
            if not self.store.delete_alias(session, model_id, alias):
                raise NotFound(f"{request.registered_model} has no alias {alias!r}", reason="ALIAS_NOT_FOUND")
            self.store.update_model(session, model_id, etag=new_etag(), updated_by=current_caller(), updated_at=self.clock())
            response = rr.DeleteModelAliasResponse(registered_model=convert.model_to_proto(self.registry.require_model(session, model_id)))
            remember(session, request_log, method, request, response)
        return response

    # -- promotion requests -------------------------------------------------------------
    def CreatePromotionRequest(
        self, request: rr.CreatePromotionRequestRequest, context: grpc.ServicerContext
    ) -> rr.CreatePromotionRequestResponse:
        method = SERVICE + "CreatePromotionRequest"
        model_id = names.model_id_of(request.parent, "parent")
        alias = names.check_alias(request.alias)
        if alias not in self.config.protected_aliases:
            raise InvalidArgument(f"alias {alias!r} is not protected; move it with SetModelAlias", reason="UNPROTECTED_ALIAS")
        version_model, number = names.version_number_of(request.model_version, "model_version")
        if version_model != model_id:
            raise InvalidArgument(f"{request.model_version} is not a version of {request.parent}", metadata={"field": "model_version"})
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CreatePromotionRequestResponse)
            if replayed is not None:
                return replayed
            version = self.registry.resolve_version(session, model_id, str(number))
            self.registry.check_region(version.residency_region)
            if version.state != "READY":
                raise FailedPrecondition(
                    f"{request.model_version} is {version.state}; only READY versions can be promoted", reason="VERSION_NOT_READY"
                )
            previous = self.store.alias_target(session, model_id, alias)
            if previous == number:
                raise FailedPrecondition(f"alias {alias!r} already points at {request.model_version}", reason="ALREADY_PROMOTED")
            gate = convert.from_json(version.results_json, pb.ModelVersion).gate_result
            request_id = secrets.token_hex(8)
            self.store.insert_promotion(
                session,
                id=request_id,
                model=model_id,
                version_number=number,
                alias=alias,
                state="PENDING",
                justification=request.justification,
                previous_version_number=previous,
                gate_result_json=convert.to_json(gate) if gate.metric else None,
                trained_by=version.trained_by,
                requested_by=current_caller(),
                requested_at=self.clock(),
            )
            created = self.store.get_promotion(session, model_id, request_id)
            assert created is not None
            response = rr.CreatePromotionRequestResponse(promotion_request=convert.promotion_to_proto(created))
            remember(session, request_log, method, request, response)
        return response

    def GetPromotionRequest(self, request: rr.GetPromotionRequestRequest, context: grpc.ServicerContext) -> rr.GetPromotionRequestResponse:
        model_id, request_id = names.promotion_parts(request.name)
        with self.store.session() as session:
            record = self.store.get_promotion(session, model_id, request_id)
        if record is None:
            raise NotFound(f"promotion request {request.name} does not exist", reason="PROMOTION_REQUEST_NOT_FOUND")
        return rr.GetPromotionRequestResponse(promotion_request=convert.promotion_to_proto(record))

    def ListPromotionRequests(
        self, request: rr.ListPromotionRequestsRequest, context: grpc.ServicerContext
    ) -> rr.ListPromotionRequestsResponse:
        model_id = names.model_id_of(request.parent, "parent")
        model_id = "" if model_id == "-" else model_id
        size = names.page_size(request.page_size)
        state = _state_name(pb.PromotionRequestState, "PROMOTION_REQUEST_STATE_", request.state, "state")
        query = [model_id, state]
        position = names.decode_page_token(request.page_token, "promotions", query)
        after = (dt.datetime.fromisoformat(position[0]), str(position[1])) if position else None
        with self.store.session() as session:
            if model_id:
                self.registry.require_model(session, model_id)
            records = self.store.list_promotions(session, model=model_id, limit=size + 1, after=after, state=state)
        page, more = records[:size], len(records) > size
        token = names.encode_page_token("promotions", [page[-1].requested_at.isoformat(), page[-1].id], query) if more else ""
        return rr.ListPromotionRequestsResponse(promotion_requests=[convert.promotion_to_proto(r) for r in page], next_page_token=token)

    def _pending(self, session: Any, name: str) -> tuple[str, Any]:
        model_id, request_id = names.promotion_parts(name)
        record = self.store.get_promotion(session, model_id, request_id)
        if record is None:
            raise NotFound(f"promotion request {name} does not exist", reason="PROMOTION_REQUEST_NOT_FOUND")
        if record.state != "PENDING":
            raise FailedPrecondition(f"promotion request {name} is already {record.state}", reason="PROMOTION_REQUEST_DECIDED")
        return model_id, record

    def _refuse_same_identity(self, name: str, caller: str, trained_by: str, action: str, version: str) -> None:
        """Separation of duties: refuse and audit the refusal (the refusal stands if the log is down)."""
        try:
            check_separation_of_duties(caller, trained_by, action)
        except PermissionDenied as refusal:
            try:
                self.audit.report(
                    SecurityEvent.MODEL_APPROVED,
                    resource=name,
                    action=action,
                    allowed=False,
                    detail=refusal.message,
                    attributes={"model_version": version, "trained_by": trained_by},
                )
            except Exception as error:  # noqa: BLE001 - logged; the refusal is what matters
                log.error("could not audit a separation-of-duties refusal", resource=name, error=str(error))
            raise

    def ApprovePromotionRequest(
        self, request: rr.ApprovePromotionRequestRequest, context: grpc.ServicerContext
    ) -> rr.ApprovePromotionRequestResponse:
        method = SERVICE + "ApprovePromotionRequest"
        caller = current_caller()
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.ApprovePromotionRequestResponse)
            if replayed is not None:
                return replayed
            model_id, record = self._pending(session, request.name)
        version_name = names.version_name(model_id, record.version_number)
        self._refuse_same_identity(request.name, caller, record.trained_by, "approve", version_name)
        gate = convert.from_json(record.gate_result_json, pb.PromotionGateResult) if record.gate_result_json else None
        overridden = gate is not None and not gate.passed
        if overridden and not request.override_failed_gate:
            raise FailedPrecondition(
                f"{version_name} failed its promotion gate ({gate.reason if gate else ''}); approve with override_failed_gate and a comment",
                reason="GATE_FAILED",
            )
        if overridden and not request.comment.strip():
            raise InvalidArgument("overriding a failed gate needs a comment saying why", metadata={"field": "comment"})
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.ApprovePromotionRequestResponse)
            if replayed is not None:
                return replayed
            model_id, record = self._pending(session, request.name)
            version = self.registry.resolve_version(session, model_id, str(record.version_number))
            if version.state != "READY":
                raise FailedPrecondition(f"{version_name} is {version.state}; it can no longer be promoted", reason="VERSION_NOT_READY")
            now = self.clock()
            previous = self.store.set_alias(session, model_id, record.alias, record.version_number, caller, now)
            if not self.store.update_promotion(
                session,
                record.id,
                only_from="PENDING",
                state="APPROVED",
                decided_by=caller,
                decided_at=now,
                decision_comment=request.comment,
                gate_overridden=overridden,
            ):
                raise FailedPrecondition(f"promotion request {request.name} was decided meanwhile", reason="PROMOTION_REQUEST_DECIDED")
            self.store.update_model(session, model_id, etag=new_etag(), updated_by=caller, updated_at=now)
            previous_name = names.version_name(model_id, previous) if previous is not None else ""
            attributes = {
                "model_version": version_name,
                "alias": record.alias,
                "trained_by": record.trained_by,
                "requested_by": record.requested_by,
                "gate_overridden": str(overridden).lower(),
                "previous_model_version": previous_name,
            }
            # Inside the transaction: when the audit log cannot record it, nothing moves.
            self.audit.report(
                SecurityEvent.MODEL_APPROVED, resource=request.name, action="approve", detail=request.comment, attributes=attributes
            )
            self.audit.report(
                SecurityEvent.MODEL_PROMOTED,
                resource=version_name,
                action=f"promote:{record.alias}",
                detail=f"alias {record.alias!r} moved from {previous_name or 'nothing'} to {version_name}",
                attributes=attributes,
            )
            decided = self.store.get_promotion(session, model_id, record.id)
            assert decided is not None
            response = rr.ApprovePromotionRequestResponse(
                promotion_request=convert.promotion_to_proto(decided),
                registered_model=convert.model_to_proto(self.registry.require_model(session, model_id)),
            )
            remember(session, request_log, method, request, response)
        return response

    def RejectPromotionRequest(
        self, request: rr.RejectPromotionRequestRequest, context: grpc.ServicerContext
    ) -> rr.RejectPromotionRequestResponse:
        method = SERVICE + "RejectPromotionRequest"
        caller = current_caller()
        if not request.comment.strip():
            raise InvalidArgument("a rejection needs a comment saying why", metadata={"field": "comment"})
        with self.store.session() as session:
            model_id, record = self._pending(session, request.name)
        self._refuse_same_identity(request.name, caller, record.trained_by, "reject", names.version_name(model_id, record.version_number))
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.RejectPromotionRequestResponse)
            if replayed is not None:
                return replayed
            model_id, record = self._pending(session, request.name)
            self.store.update_promotion(
                session,
                record.id,
                only_from="PENDING",
                state="REJECTED",
                decided_by=caller,
                decided_at=self.clock(),
                decision_comment=request.comment,
            )
            self.audit.report(
                SecurityEvent.OTHER,
                resource=request.name,
                action="reject",
                detail=request.comment,
                attributes={"model_version": names.version_name(model_id, record.version_number), "alias": record.alias},
            )
            decided = self.store.get_promotion(session, model_id, record.id)
            assert decided is not None
            response = rr.RejectPromotionRequestResponse(promotion_request=convert.promotion_to_proto(decided))
            remember(session, request_log, method, request, response)
        return response

    def CancelPromotionRequest(
        self, request: rr.CancelPromotionRequestRequest, context: grpc.ServicerContext
    ) -> rr.CancelPromotionRequestResponse:
        method = SERVICE + "CancelPromotionRequest"
        caller = current_caller()
        with self.store.session() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CancelPromotionRequestResponse)
            if replayed is not None:
                return replayed
            model_id, record = self._pending(session, request.name)
            if record.requested_by != caller:
                raise PermissionDenied(f"only the requester ({record.requested_by}) may withdraw {request.name}", reason="NOT_REQUESTER")
            self.store.update_promotion(
                session, record.id, only_from="PENDING", state="CANCELLED", decided_by=caller, decided_at=self.clock()
            )
            decided = self.store.get_promotion(session, model_id, record.id)
            assert decided is not None
            response = rr.CancelPromotionRequestResponse(promotion_request=convert.promotion_to_proto(decided))
            remember(session, request_log, method, request, response)
        return response


def _mask_paths(paths: Any, allowed: set[str]) -> set[str]:
    chosen = set(paths)
    if not chosen:
        raise InvalidArgument(
            "update_mask must name the fields to change", reason="UPDATE_MASK_REQUIRED", metadata={"field": "update_mask"}
        )
    refused = sorted(chosen - allowed)
    if refused:
        raise InvalidArgument(
            f"{refused[0]} cannot be changed here; update_mask may name {', '.join(sorted(allowed))}",
            reason="FIELD_NOT_MUTABLE",
            metadata={"field": "update_mask"},
        )
    return chosen


def _file_pieces(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as file:
        while piece := file.read(size):
            yield piece
