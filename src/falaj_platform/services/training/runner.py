"""Runs queued training jobs outside the request path, each in its own worker process.

`CreateTrainingJob` stores a QUEUED job and hands its id to `JobRunner.submit`; one of
the runner's threads claims it (atomically, so two replicas never run the same job),
fetches the training set through the `TrainingDataSource`, writes it with the plan into
a private job directory, and starts a worker process: `python -m ...worker` for one
process, torchrun for DDP. The worker reports progress as JSON lines on stdout; the
runner stores each report (streams replay them) and renews the job's lease. When the
worker succeeds the runner encrypts the ONNX artifact and registers the version in the
same transaction that marks the job SUCCEEDED. Cancel and timeout kill the worker's
process group. The job directory (plaintext training data and model) is removed when
the job ends.

A worker process also watches the service's pid and exits if the service dies, so no
worker outlives it; a job whose lease is not renewed (the service died) is marked
failed with FAILURE_REASON_WORKER_LOST by the next runner that looks.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as dt
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.ipc

from falaj.training.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import FalajError
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.validate import enum_name
from falaj_platform.services.training import convert, names
from falaj_platform.services.training.config import TrainingConfig
from falaj_platform.services.training.data import TrainingDataSource, TrainingSet
from falaj_platform.services.training.errors import ArtifactIntegrityError
from falaj_platform.services.training.plan import EVENT_PREFIX, JobFailed, JobPlan
from falaj_platform.services.training.registry import AuditSink, NewVersion, Registry
from falaj_platform.services.training.spec import ResolvedSpec, resolve_spec
from falaj_platform.services.training.store import JobRecord, TrainingStore

WORKER_MODULE = "falaj_platform.services.training.worker"
ARTIFACT_PIECE_BYTES = 1024 * 1024
KILL_GRACE_SECONDS = 5.0

log = get_logger()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ProgressHub:
    """Wakes progress streams of this process when any job reports (streams also poll the store)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        with self._condition:
            return self._generation

    def notify(self) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, generation: int, timeout: float) -> int:
        with self._condition:
            if self._generation == generation:
                self._condition.wait(timeout)
            return self._generation


@dataclass
class _Active:
    """A job this runner is running."""

    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_message: str = ""
    # Set when the service stops under a running job: it fails (worker lost), not cancelled.
    lost: bool = False
    # When the job started running (time.monotonic), for its timeout.
    started: float = field(default_factory=time.monotonic)
    process: subprocess.Popen[bytes] | None = None


class _Cancelled(Exception):
    """The job was cancelled; unwinds whatever step the runner was in."""


@dataclass
class _Job:
    """The runner's view of one job while it runs: its status message and report sequence."""

    record: JobRecord
    status: pb.TrainingJob
    sequence: int
    phase: str = "PREPARING_DATA"


class JobRunner:
    """Queue, worker processes and bookkeeping of training jobs."""

    def __init__(
        self,
        *,
        store: TrainingStore,
        registry: Registry,
        data_source: TrainingDataSource,
        audit: AuditSink,
        config: TrainingConfig,
        region: str,
        work_root: Path,
        hub: ProgressHub,
        cuda_devices: Callable[[], int],
        clock: Callable[[], dt.datetime] = utc_now,
    ):
        self.store = store
        self.registry = registry
        self.data_source = data_source
        self.audit = audit
        self.config = config
        self.region = region
        self.work_root = work_root
        self.hub = hub
        self.cuda_devices = cuda_devices
        self.clock = clock
        self.runner_id = secrets.token_hex(8)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._spares: list[subprocess.Popen[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._started = False

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start the job threads, fail jobs whose runner died, and queue jobs left waiting."""
        if self._started:
            return
        self._started = True
        self.work_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for index in range(self.config.max_concurrent_jobs):
            thread = threading.Thread(target=self._dispatch, name=f"training-job-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        monitor = threading.Thread(target=self._monitor, name="training-job-monitor", daemon=True)
        monitor.start()
        self._threads.append(monitor)
        atexit.register(self.stop)
        try:
            self.fail_stale_jobs()
            with self.store.session() as session:
                queued = self.store.queued_job_ids(session)
        except FalajError as error:
            log.error("could not recover training jobs at start", error=str(error))
            return
        for job_id in queued:
            self.submit(job_id)

    def stop(self) -> None:
        """Stop taking jobs, kill running workers (their jobs fail as worker lost) and spares."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            active = list(self._active.values())
            spares, self._spares = self._spares, []
        for job in active:
            job.lost = True
            job.cancel.set()
        for process in spares:
            _kill(process)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=KILL_GRACE_SECONDS + 5)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def request_cancel(self, job_id: str, message: str) -> bool:
        """Cancel a job this runner is running; False when it runs elsewhere (or not at all)."""
        with self._lock:
            job = self._active.get(job_id)
        if job is None:
            return False
        job.cancel_message = message
        job.cancel.set()
        return True

    def fail_stale_jobs(self) -> list[str]:
        """Mark jobs whose runner stopped renewing their lease as failed (worker lost)."""
        cutoff = self.clock() - dt.timedelta(seconds=self.config.stale_job_seconds)
        with self.store.session() as session:
            stale = [job_id for job_id in self.store.stale_job_ids(session, cutoff) if job_id not in self._active]
        for job_id in stale:
            with self.store.session() as session:
                record = self.store.get_job(session, job_id)
                if record is None:
                    continue
                status = convert.from_json(record.status_json, pb.TrainingJob)
                cancelling = record.state == "CANCELLING"
                if not cancelling:
                    status.failure.CopyFrom(
                        pb.TrainingFailure(
                            reason=pb.FAILURE_REASON_WORKER_LOST,
                            message="the training service running the job stopped; submit the job again",
                            phase=convert.enum_value(pb.TrainingPhase, "TRAINING_PHASE_", record.phase),  # type: ignore[arg-type]
                            rank=-1,
                        )
                    )
                self.store.update_job(
                    session,
                    job_id,
                    only_from=("RUNNING", "CANCELLING"),
                    state="CANCELLED" if cancelling else "FAILED",
                    phase="UNSPECIFIED",
                    end_time=self.clock(),
                    status_json=convert.to_json(status),
                )
                self.store.release_lease(session, job_id)
            log.warning("training job marked failed: its runner stopped", job_id=job_id)
        if stale:
            self.hub.notify()
        return stale

    # -- threads ----------------------------------------------------------------------
    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:
                log.exception("training job runner failed", job_id=job_id)

    def _monitor(self) -> None:
        interval = max(1.0, self.config.stale_job_seconds / 2)
        while not self._stopping.wait(interval):
            try:
                self.fail_stale_jobs()
            except Exception as error:  # noqa: BLE001 - retried at the next interval
                log.warning("stale training job check failed", error=str(error))

    # -- one job ----------------------------------------------------------------------
    def _run(self, job_id: str) -> None:
        with self.store.session() as session:
            if not self.store.claim_job(session, job_id, self.runner_id, self.clock()):
                return  # cancelled while queued, or another replica took it
            record = self.store.get_job(session, job_id)
            sequence = self.store.last_progress_sequence(session, job_id)
        assert record is not None
        active = _Active()
        with self._lock:
            self._active[job_id] = active
        job = _Job(record, convert.from_json(record.status_json, pb.TrainingJob), sequence)
        work = self.work_root / job_id
        try:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, mode=0o700)
            self._execute(job, active, work)
        except _Cancelled:
            if active.lost:
                self._fail(job, JobFailed("WORKER_LOST", "the training service stopped while the job ran; submit the job again"))
            else:
                self._finish(job, "CANCELLED", message=f"cancelled: {active.cancel_message or 'cancel requested'}")
        except JobFailed as failure:
            self._fail(job, failure)
        except Exception as error:
            log.exception("training job failed unexpectedly", job_id=job_id)
            message = (
                error.message
                if isinstance(error, FalajError)
                else f"internal error ({type(error).__name__}); see the service log for job {job_id}"
            )
            self._fail(job, JobFailed("INTERNAL", message))
        finally:
            with self._lock:
                self._active.pop(job_id, None)
            shutil.rmtree(work, ignore_errors=True)
            self._prewarm()

    def _execute(self, job: _Job, active: _Active, work: Path) -> None:
        record = job.record
        resolved = resolve_spec(
            convert.from_json(record.spec_json, pb.TrainingJobSpec),
            job_id=record.id,
            seed=job.status.environment.seed,
            config=self.config,
            cuda_devices=self.cuda_devices,
            caller=record.created_by,
        )
        self._report(job, pb.TrainingProgress(phase=pb.TRAINING_PHASE_PREPARING_DATA, message="fetching the training set"))
        training_set = self.data_source.fetch(resolved.data, job_id=record.id, cancelled=active.cancel.is_set)
        self._check_cancel(active)
        _write_arrow(work / "data.arrow", training_set.table)
        job.status.data_summary.CopyFrom(
            pb.TrainingDataSummary(
                retrieval_id=training_set.retrieval_id,
                feature_references=training_set.feature_references,
                feature_service=training_set.feature_service,
                feature_views=training_set.feature_views,
                dataset_versions=training_set.dataset_versions,
                training_set_content_hash=training_set.content_hash,
                rows_excluded_without_consent=training_set.rows_excluded_without_consent,
            )
        )
        plan = dataclasses.replace(
            resolved.plan, feature_references=training_set.feature_references, timestamp_column=training_set.timestamp_column
        )
        plan = self._attach_baseline(plan, resolved, work, record)
        (work / "plan.json").write_text(plan.to_json())
        self._report(
            job,
            pb.TrainingProgress(
                phase=pb.TRAINING_PHASE_PREPARING_DATA,
                message=f"training set {training_set.retrieval_id}: {training_set.table.num_rows} rows, {len(plan.feature_references)} features",
            ),
        )
        self._check_cancel(active)
        self._run_worker(job, active, plan, work)
        result = json.loads((work / "result.json").read_text())
        self._register(job, active, resolved, plan, training_set, result, (work / "model.onnx").read_bytes())

    def _attach_baseline(self, plan: JobPlan, resolved: ResolvedSpec, work: Path, record: JobRecord) -> JobPlan:
        """Give the worker the version behind the gate's alias, digest-checked, to compare on the same rows."""
        model = resolved.registration.model
        with self.store.session() as session:
            number = self.store.alias_target(session, model, plan.gate_alias)
            baseline = self.store.get_version(session, model, number) if number is not None else None
        if baseline is None:
            return plan
        signature = convert.from_json(baseline.signature_json, pb.ModelSignature)
        references = tuple(signature.inputs[0].feature_references) if len(signature.inputs) == 1 else ()
        try:
            content = self.registry.load_verified(baseline, self.audit, action="load-baseline", caller=record.created_by)
        except ArtifactIntegrityError as error:
            raise JobFailed(
                "INTERNAL",
                f"the gate's baseline {names.version_name(model, baseline.version_number)} failed its integrity check: {error.message}",
                phase="TRAINING_PHASE_PREPARING_DATA",
            ) from None
        path = work / "baseline.onnx"
        path.write_bytes(content)
        path.chmod(0o600)
        return dataclasses.replace(
            plan,
            baseline_model_version=names.version_name(model, baseline.version_number),
            baseline_feature_references=references,
            baseline_metrics=baseline.metrics,
        )

    def _run_worker(self, job: _Job, active: _Active, plan: JobPlan, work: Path) -> None:
        """Start the worker, follow its reports until it exits; raises on failure, cancel or timeout."""
        process = self._launch(plan, work)
        active.process = process
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert process.stdout is not None
        reader = threading.Thread(target=_read_events, args=(process.stdout, events), daemon=True)
        reader.start()
        deadline = active.started + plan.timeout_seconds
        next_heartbeat = time.monotonic() + self.config.heartbeat_seconds
        failure: dict[str, Any] | None = None
        succeeded = False
        while True:
            try:
                event = events.get(timeout=0.25)
            except queue.Empty:
                event = {}
            if event is None:
                break
            kind = event.get("type")
            if kind == "progress":
                self._report(job, convert.from_dict(event["progress"], pb.TrainingProgress))
            elif kind == "worker":
                self._worker_status(job, event)
            elif kind == "failed" and failure is None:
                failure = event
            elif kind == "result":
                succeeded = True
            if active.cancel.is_set():
                _kill(process)
                raise _Cancelled()
            if time.monotonic() > deadline:
                _kill(process)
                raise JobFailed("TIMEOUT", f"the job ran longer than its timeout of {plan.timeout_seconds:g} s", phase=_phase(job))
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + self.config.heartbeat_seconds
                self._heartbeat(job, active)
        code = process.wait()
        if active.cancel.is_set():
            raise _Cancelled()
        if failure is not None or code != 0 or not succeeded:
            _log_worker_output(job.record.id, work / "worker.log")
        if failure is not None:
            self._record_partial_results(job, work)
            raise JobFailed(
                str(failure.get("reason") or "INTERNAL"),
                str(failure.get("message") or "the worker failed"),
                phase=str(failure.get("phase") or _phase(job)),
                rank=int(failure.get("rank", -1)) if plan.world_size > 1 else -1,
            )
        if code != 0 or not succeeded:
            reason = "WORKER_LOST" if code < 0 or plan.world_size > 1 else "INTERNAL"
            raise JobFailed(
                reason, f"the worker process exited with code {code} without a result; see the service log for the job", phase=_phase(job)
            )

    def _launch(self, plan: JobPlan, work: Path) -> subprocess.Popen[bytes]:
        log_file = (work / "worker.log").open("ab")
        try:
            if plan.world_size == 1:
                # Replacements load when a job ends, not while this one trains beside them.
                spare = self._take_spare()
                if spare is not None and spare.stdin is not None:
                    spare.stdin.write(f"{work}\n".encode())
                    spare.stdin.close()
                    return spare
                command = [sys.executable, "-m", WORKER_MODULE, "--supervisor-pid", str(os.getpid()), "--job-dir", str(work)]
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(plan.processes_per_node)]
                if plan.num_nodes > 1:
                    command += [
                        "--nnodes",
                        str(plan.num_nodes),
                        "--rdzv-backend",
                        "c10d",
                        "--rdzv-endpoint",
                        plan.rendezvous_endpoint,
                        "--rdzv-id",
                        plan.rendezvous_id,
                    ]
                else:
                    command += ["--standalone"]
                command += [
                    "--max-restarts",
                    str(plan.max_restarts),
                    "-m",
                    WORKER_MODULE,
                    "--supervisor-pid",
                    str(os.getpid()),
                    "--job-dir",
                    str(work),
                ]
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, cwd=work, start_new_session=True
            )
        finally:
            log_file.close()

    def _take_spare(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            while self._spares:
                spare = self._spares.pop(0)  # the oldest: most likely loaded by now
                if spare.poll() is None:
                    return spare
        return None

    def _prewarm(self) -> None:
        """Keep `prewarm_workers` workers started ahead for the next single-process jobs."""
        if self._stopping.is_set():
            return
        with self._lock:
            self._spares = [spare for spare in self._spares if spare.poll() is None]
            while len(self._spares) < self.config.prewarm_workers:
                log_file = (self.work_root / "spare-workers.log").open("ab")
                try:
                    spare = subprocess.Popen(
                        [sys.executable, "-m", WORKER_MODULE, "--supervisor-pid", str(os.getpid()), "--wait"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        cwd=self.work_root,
                        start_new_session=True,
                    )
                finally:
                    log_file.close()
                self._spares.append(spare)

    # -- registration -----------------------------------------------------------------
    def _register(
        self, job: _Job, active: _Active, resolved: ResolvedSpec, plan: JobPlan, data: TrainingSet, result: dict[str, Any], onnx: bytes
    ) -> None:
        record = job.record
        self._store_results(job, result)
        gate = job.status.gate_result
        registration = resolved.registration
        if registration.require_gate_pass and not gate.passed:
            self._finish(job, "SUCCEEDED", message=f"the promotion gate failed ({gate.reason}); nothing registered, as the spec requires")
            return
        self._report(
            job, pb.TrainingProgress(phase=pb.TRAINING_PHASE_REGISTERING, message="encrypting the artifact and registering the version")
        )
        self._check_cancel(active)
        signature = convert.from_dict(result["signature"], pb.ModelSignature)
        signature.feature_service = data.feature_service
        lineage = pb.ModelLineage(
            training_job=names.job_name(record.id),
            dataset_versions=data.dataset_versions,
            feature_views=data.feature_views,
            feature_service=data.feature_service,
            retrieval_id=data.retrieval_id,
            training_set_content_hash=data.content_hash,
            code_version=convert.from_json(record.spec_json, pb.TrainingJobSpec).code_version,
            custom_module_sha256=resolved.custom_module_sha256,
            environment=job.status.environment,
        )
        results = pb.ModelVersion(evaluation=job.status.evaluation, gate_result=gate, export_result=job.status.export_result)
        version = NewVersion(
            source="TRAINING_JOB",
            signature_json=convert.to_json(signature),
            metrics={name: float(value) for name, value in result["metrics"].items()},
            results_json=convert.to_json(results),
            lineage_json=convert.to_json(lineage),
            tags=registration.tags,
            description=registration.description,
            trained_by=record.created_by,
            training_job=record.id,
        )
        with self.store.session() as session:
            model = self.registry.ensure_model(
                session, registration.model, task=plan.task, region=record.residency_region, owner=record.created_by, now=self.clock()
            )

        def mark_succeeded(session: Any, number: int) -> None:
            job.status.model_version = names.version_name(model.name, number)
            finished = self._final_report(job, session, f"registered {job.status.model_version}")
            if not self.store.update_job(session, record.id, only_from=("RUNNING",), state="SUCCEEDED", **finished):
                job.status.ClearField("model_version")
                raise _Cancelled()  # a cancel won the race: the transaction and the artifact are undone

        pieces = (onnx[start : start + ARTIFACT_PIECE_BYTES] for start in range(0, max(len(onnx), 1), ARTIFACT_PIECE_BYTES))
        self.registry.register(
            model, version, pieces, actor=record.created_by, now=self.clock, aliases=registration.aliases, within=mark_succeeded
        )
        self._after_final(job)

    def _store_results(self, job: _Job, result: dict[str, Any]) -> None:
        status = job.status
        status.evaluation.CopyFrom(convert.from_dict(result["evaluation"], pb.EvaluationResult))
        status.gate_result.CopyFrom(convert.from_dict(result["gate_result"], pb.PromotionGateResult))
        status.export_result.CopyFrom(convert.from_dict(result["export_result"], pb.OnnxExportResult))
        status.environment.CopyFrom(convert.from_dict(result["environment"], pb.RunEnvironment))
        split = result["split_rows"]
        status.data_summary.train_rows = split["train_rows"]
        status.data_summary.validation_rows = split["validation_rows"]
        status.data_summary.holdout_rows = split["holdout_rows"]

    def _record_partial_results(self, job: _Job, work: Path) -> None:
        """A job that failed after export (parity) still shows its evaluation and export."""
        path = work / "result.json"
        if path.exists():
            try:
                self._store_results(job, json.loads(path.read_text()))
            except (ValueError, KeyError) as error:
                log.warning("partial results of a failed job are unreadable", job_id=job.record.id, error=str(error))

    # -- bookkeeping ------------------------------------------------------------------
    def _check_cancel(self, active: _Active) -> None:
        if active.cancel.is_set():
            raise _Cancelled()

    def _report(self, job: _Job, progress: pb.TrainingProgress) -> None:
        """Store one progress report (and the phase it names) and wake the streams."""
        if progress.phase:
            job.phase = enum_name(pb.TrainingPhase, progress.phase, "progress.phase", prefix="TRAINING_PHASE_")
        else:
            progress.phase = convert.enum_value(pb.TrainingPhase, "TRAINING_PHASE_", job.phase)  # type: ignore[assignment]
        job.sequence += 1
        progress.sequence = job.sequence
        if not progress.HasField("time"):
            progress.time.CopyFrom(convert.timestamp(self.clock()))
        job.status.latest_progress.CopyFrom(progress)
        with self.store.session() as session:
            self.store.append_progress(session, job.record.id, convert.to_json(progress), self.clock(), job.sequence)
            self.store.update_job(session, job.record.id, phase=job.phase, status_json=convert.to_json(job.status))
        self.hub.notify()

    def _worker_status(self, job: _Job, event: dict[str, Any]) -> None:
        workers = {worker.rank: worker for worker in job.status.workers}
        worker = pb.WorkerStatus(
            rank=int(event.get("rank", 0)),
            local_rank=int(event.get("local_rank", 0)),
            node=str(event.get("node", "")),
            device=str(event.get("device", "")),
            state=convert.enum_value(pb.WorkerState, "WORKER_STATE_", str(event.get("state", ""))),  # type: ignore[arg-type]
            last_heartbeat_time=convert.timestamp(self.clock()),
        )
        workers[worker.rank] = worker
        del job.status.workers[:]
        job.status.workers.extend(workers[rank] for rank in sorted(workers))
        with self.store.session() as session:
            self.store.update_job(session, job.record.id, status_json=convert.to_json(job.status))

    def _heartbeat(self, job: _Job, active: _Active) -> None:
        with self.store.session() as session:
            self.store.renew_lease(session, job.record.id, self.clock())
            current = self.store.get_job(session, job.record.id)
        if current is not None and current.state == "CANCELLING" and not active.cancel.is_set():
            active.cancel_message = "cancel requested"
            active.cancel.set()  # cancelled through another replica

    def _final_report(self, job: _Job, session: Any, message: str) -> dict[str, Any]:
        """Store the last report of a job in `session`; returns the job columns of its end."""
        job.sequence += 1
        progress = pb.TrainingProgress(
            sequence=job.sequence, phase=pb.TRAINING_PHASE_UNSPECIFIED, message=message, time=convert.timestamp(self.clock())
        )
        if job.status.latest_progress.epoch:
            progress.epoch = job.status.latest_progress.epoch
            progress.total_epochs = job.status.latest_progress.total_epochs
            progress.step = job.status.latest_progress.step
        job.status.latest_progress.CopyFrom(progress)
        self.store.append_progress(session, job.record.id, convert.to_json(progress), self.clock(), job.sequence)
        self.store.release_lease(session, job.record.id)
        return {"phase": "UNSPECIFIED", "end_time": self.clock(), "status_json": convert.to_json(job.status)}

    def _after_final(self, job: _Job) -> None:
        self.hub.notify()
        log.info("training job finished", job_id=job.record.id, model_version=job.status.model_version)

    def _finish(self, job: _Job, state: str, *, message: str) -> None:
        with self.store.session() as session:
            finished = self._final_report(job, session, message)
            self.store.update_job(session, job.record.id, only_from=("RUNNING", "CANCELLING"), state=state, **finished)
        self._after_final(job)

    def _fail(self, job: _Job, failure: JobFailed) -> None:
        phase = failure.phase or f"TRAINING_PHASE_{job.phase}"
        job.status.failure.CopyFrom(
            pb.TrainingFailure(
                reason=convert.enum_value(pb.FailureReason, "FAILURE_REASON_", failure.reason),  # type: ignore[arg-type]
                message=failure.message,
                phase=convert.enum_value(pb.TrainingPhase, "", phase),  # type: ignore[arg-type]
                rank=failure.rank,
            )
        )
        self._finish(job, "FAILED", message=f"failed: {failure.message}")


def _phase(job: _Job) -> str:
    return f"TRAINING_PHASE_{job.phase}"


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    path.chmod(0o600)


def _log_worker_output(job_id: str, path: Path, limit: int = 4000) -> None:
    """Keep the end of a failed worker's stderr in the service log (the job folder is removed)."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - limit))
            tail = file.read().decode(errors="replace").strip()
    except OSError:
        return
    if tail:
        log.warning("training worker output", job_id=job_id, stderr_tail=tail)


def _read_events(stream: IO[bytes], events: queue.Queue[dict[str, Any] | None]) -> None:
    prefix = EVENT_PREFIX.encode()
    try:
        for line in stream:
            if line.startswith(prefix):
                try:
                    events.put(json.loads(line[len(prefix) :]))
                except ValueError:
                    log.warning("unreadable worker event", line=line[:200].decode(errors="replace"))
    finally:
        events.put(None)


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Stop a worker and everything it started (torchrun's workers share its process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
