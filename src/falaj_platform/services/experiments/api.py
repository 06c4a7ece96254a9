"""Thin gRPC servicer of `falaj.experiments.v1.ExperimentsService`: proto -> domain -> proto.

Decisions live in the domain modules (model, lifecycle, assignment, events, analysis,
statistics); persistence in the store. Each write is one transaction that also holds
its idempotency record and, for lifecycle changes, the audit report: if the audit log
cannot record a change, the change does not happen.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import grpc
import pyarrow as pa
import pyarrow.ipc

from falaj.experiments.v1 import message_pb2 as pb
from falaj.experiments.v1 import request_response_pb2 as rr
from falaj.experiments.v1 import service_pb2_grpc
from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj_platform.runtime.audit import AuditReporter
from falaj_platform.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.experiments import analysis as an
from falaj_platform.services.experiments import convert, lifecycle
from falaj_platform.services.experiments import model as m
from falaj_platform.services.experiments import statistics as st
from falaj_platform.services.experiments.analyzer import run_analysis
from falaj_platform.services.experiments.assignment import Assigner
from falaj_platform.services.experiments.events import Rejection, check_exposure, check_outcome, require_running
from falaj_platform.services.experiments.store import ExperimentsStore, ExposureRow, OutcomeRow, StoreTransaction

SERVICE = "/falaj.experiments.v1.ExperimentsService/"
MAX_BATCH = 10_000
MAX_SAMPLE_REJECTIONS = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
EXPOSURE_COLUMNS = ("event_id", "unit_id", "variant_id", "time")
OUTCOME_COLUMNS = ("event_id", "unit_id", "metric_id", "value", "time")


class AuditSink(Protocol):
    """What the servicer needs of the audit log (`runtime.audit.AuditReporter` in production)."""

    def report(
        self,
        event_type: Any,
        *,
        resource: str,
        action: str,
        allowed: bool = True,
        detail: str = "",
        attributes: Mapping[str, str] | None = None,
        report_id: str = "",
        caller: str | None = None,
    ) -> object: ...


BackgroundRunner = Callable[[Callable[[], None]], None]
"""Runs a task off the request thread (guardrail checks after events arrive)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _background_pool() -> BackgroundRunner:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiments-guardrails")

    def submit(task: Callable[[], None]) -> None:
        pool.submit(task)

    return submit


# -- paging ----------------------------------------------------------------------------


def _page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(created_at: dt.datetime, key: str, scope: str) -> str:
    payload = json.dumps({"t": created_at.isoformat(), "k": key, "s": scope}).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> tuple[dt.datetime, str] | None:
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if payload["s"] != scope:
            raise ValueError("scope")
        return dt.datetime.fromisoformat(payload["t"]), str(payload["k"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument(
            "page_token is not valid for this request; pass back next_page_token unchanged with the same filters",
            reason="INVALID_PAGE_TOKEN",
        ) from None


def _require_request_id(request: Any) -> None:
    if not request.request_id:
        raise InvalidArgument(
            "request_id is required for event batches, so that a retried batch is never counted twice",
            reason="REQUEST_ID_REQUIRED",
        )


def _time_or_now(message: Any, present: bool, now: dt.datetime) -> dt.datetime:
    return convert.timestamp_from_proto(message) if present else now


class ExperimentsApi(service_pb2_grpc.ExperimentsServiceServicer):
    def __init__(
        self,
        store: ExperimentsStore,
        settings: Settings,
        *,
        audit: AuditSink | None = None,
        run_in_background: BackgroundRunner | None = None,
        guardrail_check_interval: dt.timedelta = m.DEFAULT_GUARDRAIL_CHECK_INTERVAL,
        clock: Callable[[], dt.datetime] = _now,
    ):
        self.store = store
        self.settings = settings
        self.audit: AuditSink = audit if audit is not None else AuditReporter(settings)
        self.run_in_background = run_in_background or _background_pool()
        self.guardrail_check_interval = guardrail_check_interval
        self.clock = clock
        self.log = get_logger()

    # -- helpers -------------------------------------------------------------------------
    def _actor(self) -> str:
        return current_caller() or self.settings.spiffe_id

    def _report(self, experiment: m.Experiment, action: str, detail: str, *, before: m.ExperimentState | None, actor: str) -> None:
        """Record a change in the audit log inside the change's transaction."""
        self.audit.report(
            gateway_messages.SECURITY_EVENT_TYPE_EXPERIMENT_CHANGED,
            resource=experiment.name,
            action=action,
            detail=detail,
            attributes={
                "from_state": str(before) if before else "",
                "to_state": str(experiment.state),
                "config_revision": str(experiment.config_revision),
                "etag": experiment.etag,
            },
            report_id=f"{experiment.name}@{experiment.etag}:{action}",
            caller=actor,
        )

    def _lifecycle_change(
        self,
        method: str,
        request: Any,
        response_type: type[Any],
        experiment_id: str,
        change: Callable[[m.Experiment, str, dt.datetime], m.Experiment],
        action: str,
        detail: str,
    ) -> Any:
        actor, now = self._actor(), self.clock()
        with self.store.transaction() as tx:
            replayed = tx.replayed(SERVICE + method, request, response_type)
            if replayed is not None:
                return replayed
            current = tx.get_experiment(experiment_id, lock=True)
            updated = change(current, actor, now)
            tx.save_experiment(updated)
            self._report(updated, action, detail, before=current.state, actor=actor)
            response = response_type(experiment=convert.experiment_to_proto(updated))
            tx.remember(SERVICE + method, request, response)
        self.log.info("experiment changed", experiment=updated.name, action=action, state=str(updated.state))
        return response

    # -- experiments ---------------------------------------------------------------------
    def CreateExperiment(self, request: rr.CreateExperimentRequest, context: grpc.ServicerContext) -> rr.CreateExperimentResponse:
        m.validate_experiment_id(request.experiment_id)
        actor, now = self._actor(), self.clock()
        design = convert.experiment_from_proto(request.experiment_id, request.experiment, self.settings.region)
        if design.residency_region != self.settings.region:
            self.audit.report(
                gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS,
                resource=m.experiment_name(request.experiment_id),
                action="create",
                allowed=False,
                detail=f"experiment residency {design.residency_region} refused by the experiments service of {self.settings.region}",
                attributes={"requested_region": design.residency_region, "service_region": self.settings.region},
                caller=actor,
            )
            raise FailedPrecondition(
                f"this experiments service keeps data in {self.settings.region}; it cannot hold an experiment resident in "
                f"{design.residency_region}",
                reason="RESIDENCY_MISMATCH",
                metadata={"requested_region": design.residency_region, "service_region": self.settings.region},
            )
        experiment = lifecycle.create(design, actor, now)
        response = rr.CreateExperimentResponse(experiment=convert.experiment_to_proto(experiment))
        with self.store.transaction() as tx:
            replayed = tx.replayed(SERVICE + "CreateExperiment", request, rr.CreateExperimentResponse)
            if replayed is not None:
                return replayed
            if tx.experiment_exists(request.experiment_id):
                raise AlreadyExists(
                    f"experiment {experiment.name!r} already exists",
                    reason="EXPERIMENT_EXISTS",
                    metadata={"experiment": experiment.name},
                )
            if request.validate_only:
                return response
            tx.insert_experiment(experiment)
            self._report(experiment, "create", experiment.display_name or experiment.experiment_id, before=None, actor=actor)
            tx.remember(SERVICE + "CreateExperiment", request, response)
        return response

    def GetExperiment(self, request: rr.GetExperimentRequest, context: grpc.ServicerContext) -> rr.GetExperimentResponse:
        experiment_id = m.parse_experiment_name(request.name)
        return rr.GetExperimentResponse(experiment=convert.experiment_to_proto(self.store.get_experiment(experiment_id)))

    def ListExperiments(self, request: rr.ListExperimentsRequest, context: grpc.ServicerContext) -> rr.ListExperimentsResponse:
        size = _page_size(request.page_size)
        state = convert.enum_from_proto(m.ExperimentState, request.state, default=None) if request.state else None
        scope = f"experiments|{state or ''}|{request.deployment}"
        after = _decode_token(request.page_token, scope)
        found = self.store.list_experiments(state=state, deployment=request.deployment, after=after, limit=size + 1)
        page = found[:size]
        token = ""
        if len(found) > size and page[-1].created_at is not None:
            token = _encode_token(page[-1].created_at, page[-1].experiment_id, scope)
        return rr.ListExperimentsResponse(experiments=[convert.experiment_to_proto(e) for e in page], next_page_token=token)

    def UpdateExperiment(self, request: rr.UpdateExperimentRequest, context: grpc.ServicerContext) -> rr.UpdateExperimentResponse:
        experiment_id = m.parse_experiment_name(request.experiment.name, "experiment.name")
        paths = list(request.update_mask.paths)
        actor, now = self._actor(), self.clock()

        def change(current: m.Experiment, actor: str, now: dt.datetime) -> m.Experiment:
            lifecycle.check_etag(current, request.experiment.etag)
            m.check_update_paths(current, paths)
            return lifecycle.update(current, paths, _changes_from_proto(current, request.experiment, paths), actor, now)

        if request.validate_only:
            current = self.store.get_experiment(experiment_id)
            return rr.UpdateExperimentResponse(experiment=convert.experiment_to_proto(change(current, actor, now)))
        detail = request.reason or f"changed {', '.join(paths)}"
        return self._lifecycle_change("UpdateExperiment", request, rr.UpdateExperimentResponse, experiment_id, change, "update", detail)

    def DeleteExperiment(self, request: rr.DeleteExperimentRequest, context: grpc.ServicerContext) -> rr.DeleteExperimentResponse:
        experiment_id = m.parse_experiment_name(request.name)
        actor = self._actor()
        response = rr.DeleteExperimentResponse(name=m.experiment_name(experiment_id))
        with self.store.transaction() as tx:
            replayed = tx.replayed(SERVICE + "DeleteExperiment", request, rr.DeleteExperimentResponse)
            if replayed is not None:
                return replayed
            current = tx.get_experiment(experiment_id, lock=True)
            lifecycle.check_etag(current, request.etag)
            if current.state is not m.ExperimentState.DRAFT:
                raise FailedPrecondition(
                    f"experiment {current.name!r} is {current.state}; only DRAFT experiments can be deleted, "
                    "because the events and analyses of one that ran are evidence",
                    reason="INVALID_STATE",
                    metadata={"state": str(current.state)},
                )
            tx.delete_experiment(experiment_id)
            self._report(current, "delete", "deleted while DRAFT", before=current.state, actor=actor)
            tx.remember(SERVICE + "DeleteExperiment", request, response)
        return response

    def StartExperiment(self, request: rr.StartExperimentRequest, context: grpc.ServicerContext) -> rr.StartExperimentResponse:
        experiment_id = m.parse_experiment_name(request.name)
        return self._lifecycle_change(
            "StartExperiment",
            request,
            rr.StartExperimentResponse,
            experiment_id,
            lambda current, actor, now: m.start(current, actor, now, request.reason),
            "start",
            request.reason or "started",
        )

    def StopExperiment(self, request: rr.StopExperimentRequest, context: grpc.ServicerContext) -> rr.StopExperimentResponse:
        experiment_id = m.parse_experiment_name(request.name)
        reason = m.StopReason(m.StopCause.USER, request.reason or "stopped by a user")
        return self._lifecycle_change(
            "StopExperiment",
            request,
            rr.StopExperimentResponse,
            experiment_id,
            lambda current, actor, now: m.stop(current, actor, now, reason),
            "stop",
            reason.message,
        )

    def ConcludeExperiment(self, request: rr.ConcludeExperimentRequest, context: grpc.ServicerContext) -> rr.ConcludeExperimentResponse:
        experiment_id = m.parse_experiment_name(request.name)
        conclusion = m.Conclusion(request.conclusion.winning_variant_id, request.conclusion.summary, request.conclusion.analysis)
        if conclusion.analysis:
            owner, analysis_id = m.parse_analysis_name(conclusion.analysis)
            if owner != experiment_id:
                raise InvalidArgument("conclusion.analysis must be an analysis of this experiment", reason="FOREIGN_ANALYSIS")
            self.store.get_analysis(owner, analysis_id)  # NOT_FOUND when it does not exist
        return self._lifecycle_change(
            "ConcludeExperiment",
            request,
            rr.ConcludeExperimentResponse,
            experiment_id,
            lambda current, actor, now: m.conclude(current, actor, now, conclusion),
            "conclude",
            conclusion.summary,
        )

    # -- assignment ----------------------------------------------------------------------
    def AssignVariant(self, request: rr.AssignVariantRequest, context: grpc.ServicerContext) -> rr.AssignVariantResponse:
        experiment_id = m.parse_experiment_name(request.experiment, "experiment")
        if not request.unit_id:
            raise InvalidArgument("unit_id is required", reason="UNIT_ID_REQUIRED")
        experiment = self.store.get_experiment(experiment_id)
        assignment = Assigner(experiment).assign(request.unit_id, convert.attributes_from_proto(request.attributes))
        return rr.AssignVariantResponse(assignment=convert.assignment_to_proto(experiment.name, assignment))

    def BatchAssignVariants(self, request: rr.BatchAssignVariantsRequest, context: grpc.ServicerContext) -> rr.BatchAssignVariantsResponse:
        experiment_id = m.parse_experiment_name(request.experiment, "experiment")
        if len(request.units) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} units per call, got {len(request.units)}", reason="BATCH_TOO_LARGE")
        for index, unit in enumerate(request.units):
            if not unit.unit_id:
                raise InvalidArgument(f"units[{index}].unit_id is required", reason="UNIT_ID_REQUIRED")
        experiment = self.store.get_experiment(experiment_id)
        assigner = Assigner(experiment)
        return rr.BatchAssignVariantsResponse(
            assignments=[
                convert.assignment_to_proto(experiment.name, assigner.assign(u.unit_id, convert.attributes_from_proto(u.attributes)))
                for u in request.units
            ]
        )

    def GetAssignmentConfig(self, request: rr.GetAssignmentConfigRequest, context: grpc.ServicerContext) -> rr.GetAssignmentConfigResponse:
        experiment_id = m.parse_experiment_name(request.experiment, "experiment")
        experiment = self.store.get_experiment(experiment_id)
        if request.known_config_revision and request.known_config_revision == experiment.config_revision:
            return rr.GetAssignmentConfigResponse(not_modified=True)
        return rr.GetAssignmentConfigResponse(config=convert.assignment_config_to_proto(experiment))

    # -- events --------------------------------------------------------------------------
    def _record(
        self,
        method: str,
        request: Any,
        response_type: type[Any],
        check: Callable[[m.Experiment, int, Any, dt.datetime], Rejection | None],
        insert: Callable[[StoreTransaction, str, list[Any], dt.datetime], set[str]],
        to_row: Callable[[Any, dt.datetime], Any],
        events: Any,
    ) -> Any:
        experiment_id = m.parse_experiment_name(request.experiment, "experiment")
        _require_request_id(request)
        if len(events) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} events per batch, got {len(events)}", reason="BATCH_TOO_LARGE")
        now = self.clock()
        with self.store.transaction() as tx:
            replayed = tx.replayed(SERVICE + method, request, response_type)
            if replayed is not None:
                return replayed
            experiment = tx.get_experiment(experiment_id)
            require_running(experiment)
            rejections: list[Rejection] = []
            accepted_rows: list[Any] = []
            seen: set[str] = set()
            duplicates = 0
            for index, event in enumerate(events):
                rejection = check(experiment, index, event, now)
                if rejection is not None:
                    rejections.append(rejection)
                elif event.event_id in seen:
                    duplicates += 1
                else:
                    seen.add(event.event_id)
                    accepted_rows.append(to_row(event, now))
            inserted = insert(tx, experiment_id, accepted_rows, now)
            duplicates += len(accepted_rows) - len(inserted)
            response = response_type(
                accepted_count=len(inserted),
                duplicate_count=duplicates,
                rejections=[pb.EventRejection(index=r.index, event_id=r.event_id, reason=r.reason, message=r.message) for r in rejections],
            )
            tx.remember(SERVICE + method, request, response)
        self._maybe_check_guardrails(experiment)
        return response

    def RecordExposures(self, request: rr.RecordExposuresRequest, context: grpc.ServicerContext) -> rr.RecordExposuresResponse:
        assigners: dict[int, Assigner] = {}

        def check(experiment: m.Experiment, index: int, event: pb.Exposure, now: dt.datetime) -> Rejection | None:
            assigner = assigners.setdefault(id(experiment), Assigner(experiment))
            time_ = _time_or_now(event.time, event.HasField("time"), now)
            return check_exposure(experiment, assigner, index, event.event_id, event.unit_id, event.variant_id, time_, now)

        return self._record(
            "RecordExposures",
            request,
            rr.RecordExposuresResponse,
            check,
            lambda tx, experiment_id, rows, now: tx.insert_exposures(experiment_id, rows, now),
            lambda event, now: ExposureRow(
                event.event_id, event.unit_id, event.variant_id, _time_or_now(event.time, event.HasField("time"), now), event.source
            ),
            request.exposures,
        )

    def RecordOutcomes(self, request: rr.RecordOutcomesRequest, context: grpc.ServicerContext) -> rr.RecordOutcomesResponse:
        def check(experiment: m.Experiment, index: int, event: pb.Outcome, now: dt.datetime) -> Rejection | None:
            time_ = _time_or_now(event.time, event.HasField("time"), now)
            return check_outcome(experiment, index, event.event_id, event.unit_id, event.metric_id, event.value, time_, now)

        return self._record(
            "RecordOutcomes",
            request,
            rr.RecordOutcomesResponse,
            check,
            lambda tx, experiment_id, rows, now: tx.insert_outcomes(experiment_id, rows, now),
            lambda event, now: OutcomeRow(
                event.event_id, event.unit_id, event.metric_id, event.value, _time_or_now(event.time, event.HasField("time"), now)
            ),
            request.outcomes,
        )

    def ImportEvents(self, request_iterator: Iterator[rr.ImportEventsRequest], context: grpc.ServicerContext) -> rr.ImportEventsResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of ImportEvents must carry the header", reason="HEADER_REQUIRED")
        header = first.header
        experiment_id = m.parse_experiment_name(header.experiment, "header.experiment")
        _require_request_id(header)
        kind = convert.enum_from_proto(m.EventKind, header.kind, field="header.kind") if header.kind else None
        if kind is None:
            raise InvalidArgument("header.kind must be EVENT_KIND_EXPOSURE or EVENT_KIND_OUTCOME", reason="FIELD_REQUIRED")
        method = SERVICE + "ImportEvents"
        digest = hashlib.sha256()
        anonymous = rr.ImportEventsHeader()
        anonymous.CopyFrom(header)
        anonymous.ClearField("request_id")
        digest.update(anonymous.SerializeToString(deterministic=True))
        now = self.clock()
        accepted = duplicates = rejected = skipped = 0
        samples: list[Rejection] = []
        with self.store.transaction() as tx:
            experiment = tx.get_experiment(experiment_id)
            previous = tx.replayed_digest(header.request_id, method)
            if previous is None:
                require_running(experiment)
            assigner = Assigner(experiment)
            batch_ids_seen: set[str] = set()
            offset = 0
            for message in request_iterator:
                if message.WhichOneof("payload") != "batch":
                    raise InvalidArgument("only the first message of ImportEvents may carry a header", reason="UNEXPECTED_HEADER")
                batch = message.batch
                digest.update(batch.SerializeToString(deterministic=True))
                if previous is not None:
                    continue
                if batch.batch_id and (batch.batch_id in batch_ids_seen or tx.committed_batches(experiment_id, [batch.batch_id])):
                    skipped += 1
                    continue
                table = _read_arrow(batch.arrow_ipc, batch.row_count, EXPOSURE_COLUMNS if kind is m.EventKind.EXPOSURE else OUTCOME_COLUMNS)
                result = _import_table(tx, experiment, assigner, kind, table, offset, now)
                offset += table.num_rows
                accepted += result[0]
                duplicates += result[1]
                rejected += len(result[2])
                samples.extend(result[2][: MAX_SAMPLE_REJECTIONS - len(samples)])
                if batch.batch_id:
                    batch_ids_seen.add(batch.batch_id)
                    tx.record_batch(experiment_id, batch.batch_id, str(kind), table.num_rows, now)
            if previous is not None:
                stored_digest, stored_response = previous
                if stored_digest != digest.hexdigest():
                    raise FailedPrecondition(
                        f"request_id {header.request_id!r} was already used for a different import; use a new request id",
                        reason="REQUEST_ID_REUSED",
                        metadata={"request_id": header.request_id},
                    )
                return rr.ImportEventsResponse.FromString(stored_response)
            response = rr.ImportEventsResponse(
                accepted_count=accepted,
                duplicate_count=duplicates,
                rejected_count=rejected,
                skipped_batch_count=skipped,
                sample_rejections=[
                    pb.EventRejection(index=r.index, event_id=r.event_id, reason=r.reason, message=r.message) for r in samples
                ],
            )
            tx.remember_digest(header.request_id, method, digest.hexdigest(), response.SerializeToString(deterministic=True))
        self._maybe_check_guardrails(experiment)
        return response

    # -- analysis ------------------------------------------------------------------------
    def AnalyzeExperiment(self, request: rr.AnalyzeExperimentRequest, context: grpc.ServicerContext) -> rr.AnalyzeExperimentResponse:
        experiment_id = m.parse_experiment_name(request.experiment, "experiment")
        method = SERVICE + "AnalyzeExperiment"
        with self.store.transaction() as tx:
            replayed = tx.replayed(method, request, rr.AnalyzeExperimentResponse)
            if replayed is not None:
                return replayed
            experiment = tx.get_experiment(experiment_id)
        if experiment.state is m.ExperimentState.DRAFT:
            raise FailedPrecondition(
                f"experiment {experiment.name!r} is DRAFT and has no events to analyse; start it first",
                reason="INVALID_STATE",
                metadata={"state": str(experiment.state)},
            )
        settings = convert.analysis_config_from_proto(request.config) if request.HasField("config") else experiment.analysis
        m.validate_analysis(settings, experiment.metrics)
        metrics = _select_metrics(experiment, request.metric_ids)
        now = self.clock()
        as_of = convert.timestamp_from_proto(request.as_of_time) if request.HasField("as_of_time") else now
        analysis = self._analyse_and_keep(experiment, settings, as_of, metrics, self._actor(), request=request)
        return rr.AnalyzeExperimentResponse(analysis=analysis)

    def _analyse_and_keep(
        self,
        experiment: m.Experiment,
        settings: m.AnalysisSettings,
        as_of: dt.datetime,
        metrics: list[m.MetricDefinition],
        actor: str,
        *,
        request: rr.AnalyzeExperimentRequest | None = None,
    ) -> pb.ExperimentAnalysis:
        """Compute, keep, and act on the analysis (a fired guardrail or SRM stops a running experiment)."""
        started = time.perf_counter()
        result = run_analysis(self.store, experiment, settings, as_of, metrics)
        compute = dt.timedelta(seconds=time.perf_counter() - started)
        now = self.clock()
        analysis_id = now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]
        name = m.analysis_name(experiment.experiment_id, analysis_id)
        message = convert.analysis_to_proto(name, result, actor, now, compute)
        method = SERVICE + "AnalyzeExperiment"
        with self.store.transaction() as tx:
            if request is not None:
                replayed = tx.replayed(method, request, rr.AnalyzeExperimentResponse)
                if replayed is not None:
                    return replayed.analysis
            tx.insert_analysis(
                experiment.experiment_id,
                analysis_id,
                as_of_time=as_of,
                config_revision=result.config_revision,
                events_analysed=result.events_analysed,
                result=message.SerializeToString(deterministic=True),
                created_by=actor,
                created_at=now,
            )
            self._stop_if_needed(tx, experiment.experiment_id, result, settings, name, now)
            if request is not None:
                tx.remember(method, request, rr.AnalyzeExperimentResponse(analysis=message))
        return message

    def _stop_if_needed(
        self,
        tx: StoreTransaction,
        experiment_id: str,
        result: an.AnalysisResult,
        settings: m.AnalysisSettings,
        analysis: str,
        now: dt.datetime,
    ) -> None:
        fired = result.fired_guardrail()
        reason: m.StopReason | None = None
        if fired is not None:
            reason = m.StopReason(m.StopCause.GUARDRAIL, f"{fired.message} (analysis {analysis})", fired.metric_id, fired.variant_id)
        elif settings.stop_on_srm and result.sample_ratio.mismatch:
            srm = result.sample_ratio
            reason = m.StopReason(
                m.StopCause.SAMPLE_RATIO_MISMATCH,
                f"sample ratio mismatch: chi-square {srm.chi_square:.2f} on {srm.degrees_of_freedom} df, p = {srm.p_value:.3g} "
                f"< {srm.threshold:g} (analysis {analysis})",
            )
        if reason is None:
            return
        current = tx.get_experiment(experiment_id, lock=True)
        if current.state is not m.ExperimentState.RUNNING:
            return
        actor = self.settings.spiffe_id  # the service stops it by itself
        stopped = m.stop(current, actor, now, reason)
        tx.save_experiment(stopped)
        self._report(stopped, "stop", reason.message, before=current.state, actor=actor)
        self.log.warning("experiment stopped by itself", experiment=stopped.name, cause=str(reason.cause), why=reason.message)

    def _maybe_check_guardrails(self, experiment: m.Experiment) -> None:
        """After new events, evaluate the guardrails once per check interval, off the request thread."""
        if experiment.state is not m.ExperimentState.RUNNING or not experiment.guardrails:
            return
        interval = min(g.check_interval or self.guardrail_check_interval for g in experiment.guardrails)
        if not self.store.claim_guardrail_check(experiment.experiment_id, self.clock(), interval):
            return
        self.run_in_background(lambda: self.check_guardrails(experiment.experiment_id))

    def check_guardrails(self, experiment_id: str) -> None:
        """Analyse the guardrail metrics of a running experiment now and stop it if one fired."""
        try:
            experiment = self.store.get_experiment(experiment_id)
            if experiment.state is not m.ExperimentState.RUNNING:
                return
            metrics = [metric for g in experiment.guardrails if (metric := experiment.metric(g.metric_id)) is not None]
            self._analyse_and_keep(experiment, experiment.analysis, self.clock(), metrics, self.settings.spiffe_id)
        except Exception:
            self.log.exception("guardrail check failed", experiment=experiment_id)

    def GetExperimentAnalysis(
        self, request: rr.GetExperimentAnalysisRequest, context: grpc.ServicerContext
    ) -> rr.GetExperimentAnalysisResponse:
        experiment_id, analysis_id = m.parse_analysis_name(request.name)
        return rr.GetExperimentAnalysisResponse(
            analysis=pb.ExperimentAnalysis.FromString(self.store.get_analysis(experiment_id, analysis_id))
        )

    def ListExperimentAnalyses(
        self, request: rr.ListExperimentAnalysesRequest, context: grpc.ServicerContext
    ) -> rr.ListExperimentAnalysesResponse:
        experiment_id = m.parse_experiment_name(request.parent, "parent")
        size = _page_size(request.page_size)
        scope = f"analyses|{experiment_id}"
        after = _decode_token(request.page_token, scope)
        found = self.store.list_analyses(experiment_id, after=after, limit=size + 1)
        page = found[:size]
        token = _encode_token(page[-1].created_at, page[-1].analysis_id, scope) if len(found) > size else ""
        return rr.ListExperimentAnalysesResponse(analyses=[pb.ExperimentAnalysis.FromString(r.result) for r in page], next_page_token=token)

    # -- planning ------------------------------------------------------------------------
    def CalculatePower(self, request: rr.CalculatePowerRequest, context: grpc.ServicerContext) -> rr.CalculatePowerResponse:
        metric_type = convert.enum_from_proto(m.MetricType, request.metric_type, field="metric_type")
        alternative = convert.enum_from_proto(m.Alternative, request.alternative, default=m.Alternative.TWO_SIDED)
        alpha = request.alpha or m.DEFAULT_ALPHA
        variant_count = request.variant_count or 2
        if variant_count < 2:
            raise InvalidArgument(f"variant_count must be at least 2, got {variant_count}", reason="INVALID_VARIANT_COUNT")
        if request.units_per_day < 0 or not math.isfinite(request.units_per_day):
            raise InvalidArgument("units_per_day must not be negative", reason="INVALID_UNITS_PER_DAY")
        common = (metric_type, request.baseline_mean, request.baseline_std_dev, alpha, alternative)
        solve_for = request.WhichOneof("solve_for")
        if solve_for == "sample_size":
            plan = st.plan_sample_size(*common, request.sample_size.relative_effect, request.sample_size.power or 0.8)
        elif solve_for == "minimum_detectable_effect":
            goal = request.minimum_detectable_effect
            plan = st.plan_minimum_detectable_effect(*common, goal.units_per_variant, goal.power or 0.8)
        elif solve_for == "power":
            plan = st.plan_power(*common, request.power.relative_effect, request.power.units_per_variant)
        else:
            raise InvalidArgument("set one of sample_size, minimum_detectable_effect or power to solve for", reason="SOLVE_FOR_REQUIRED")
        total = plan.units_per_variant * variant_count
        response = rr.CalculatePowerResponse(
            units_per_variant=plan.units_per_variant,
            total_units=total,
            relative_effect=plan.relative_effect,
            absolute_effect=plan.absolute_effect,
            power=plan.power,
        )
        if request.units_per_day > 0:
            response.estimated_duration.CopyFrom(convert.duration_to_proto(dt.timedelta(days=total / request.units_per_day)))
        return response


# -- helpers that read protos ------------------------------------------------------------


def _select_metrics(experiment: m.Experiment, metric_ids: Any) -> list[m.MetricDefinition]:
    if not metric_ids:
        return list(experiment.metrics)
    chosen = []
    for metric_id in dict.fromkeys(metric_ids):
        metric = experiment.metric(metric_id)
        if metric is None:
            raise InvalidArgument(
                f"metric {metric_id!r} is not a metric of {experiment.name}", reason="UNKNOWN_METRIC", metadata={"metric_id": metric_id}
            )
        chosen.append(metric)
    return chosen


def _changes_from_proto(current: m.Experiment, patch: pb.Experiment, paths: list[str]) -> dict[str, Any]:
    """Domain field values for the masked fields of an UpdateExperiment request."""
    changes: dict[str, Any] = {}
    variants = current.variants
    if "variants" in paths:
        weights = current.weights
        variants = tuple(replace(v, weight_bps=weights.get(v.variant_id, 0)) for v in convert.variants_from_proto(patch))
    if "allocation" in paths:
        known = {v.variant_id for v in variants}
        weights = {}
        for weight in patch.allocation.weights:
            if weight.variant_id not in known:
                raise InvalidArgument(
                    f"allocation names variant {weight.variant_id!r}, which is not a variant of the experiment",
                    reason="UNKNOWN_VARIANT",
                    metadata={"variant_id": weight.variant_id},
                )
            weights[weight.variant_id] = weight.weight_bps
        variants = tuple(replace(v, weight_bps=weights.get(v.variant_id, 0)) for v in variants)
        changes["coverage_bps"] = convert.coverage_from_proto(patch.allocation)
    if "variants" in paths or "allocation" in paths:
        changes["variants"] = variants
    for path in paths:
        if path in ("display_name", "description", "hypothesis"):
            changes[path] = getattr(patch, path)
        elif path == "labels":
            changes["labels"] = dict(patch.labels)
        elif path == "hashing":
            changes["hashing"] = convert.hashing_from_proto(patch.hashing, current.experiment_id)
        elif path == "targeting":
            changes["targeting"] = convert.targeting_from_proto(patch.targeting)
        elif path == "metrics":
            changes["metrics"] = tuple(convert.metric_from_proto(x) for x in patch.metrics)
        elif path == "guardrails":
            changes["guardrails"] = tuple(convert.guardrail_from_proto(x) for x in patch.guardrails)
        elif path == "analysis_config":
            changes["analysis"] = convert.analysis_config_from_proto(patch.analysis_config)
    return changes


def _read_arrow(payload: bytes, row_count: int, required: tuple[str, ...]) -> pa.Table:
    try:
        table = pyarrow.ipc.open_stream(payload).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgument(f"a batch is not a valid Arrow IPC stream: {error}", reason="INVALID_ARROW") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InvalidArgument(
            f"a batch lacks the columns {', '.join(missing)}", reason="MISSING_COLUMNS", metadata={"columns": ",".join(missing)}
        )
    if row_count and row_count != table.num_rows:
        raise InvalidArgument(f"a batch says it has {row_count} rows but carries {table.num_rows}", reason="ROW_COUNT_MISMATCH")
    return table


def _column_times(table: pa.Table) -> list[dt.datetime]:
    column = table.column("time")
    if not pa.types.is_timestamp(column.type):
        raise InvalidArgument("column 'time' must be an Arrow timestamp", reason="INVALID_COLUMN_TYPE")
    if column.null_count:
        raise InvalidArgument("column 'time' has nulls", reason="INVALID_COLUMN_TYPE")
    unit_tz = column.type.tz
    values = column.cast(pa.timestamp("us", tz=unit_tz or "UTC")).to_pylist()
    return [v if v.tzinfo else v.replace(tzinfo=dt.UTC) for v in values]


def _import_table(
    tx: StoreTransaction, experiment: m.Experiment, assigner: Assigner, kind: m.EventKind, table: pa.Table, offset: int, now: dt.datetime
) -> tuple[int, int, list[Rejection]]:
    """(accepted, duplicates, rejections) of one Arrow batch."""
    times = _column_times(table)
    event_ids = [str(x or "") for x in table.column("event_id").to_pylist()]
    unit_ids = [str(x or "") for x in table.column("unit_id").to_pylist()]
    rejections: list[Rejection] = []
    seen: set[str] = set()
    duplicates = 0
    if kind is m.EventKind.EXPOSURE:
        variant_ids = [str(x or "") for x in table.column("variant_id").to_pylist()]
        sources = [str(x or "") for x in table.column("source").to_pylist()] if "source" in table.column_names else [""] * table.num_rows
        exposure_rows: list[ExposureRow] = []
        for i in range(table.num_rows):
            rejection = check_exposure(experiment, assigner, offset + i, event_ids[i], unit_ids[i], variant_ids[i], times[i], now)
            if rejection:
                rejections.append(rejection)
            elif event_ids[i] in seen:
                duplicates += 1
            else:
                seen.add(event_ids[i])
                exposure_rows.append(ExposureRow(event_ids[i], unit_ids[i], variant_ids[i], times[i], sources[i]))
        inserted = tx.insert_exposures(experiment.experiment_id, exposure_rows, now)
        return len(inserted), duplicates + len(exposure_rows) - len(inserted), rejections
    metric_ids = [str(x or "") for x in table.column("metric_id").to_pylist()]
    raw_values = table.column("value").to_pylist()
    outcome_rows: list[OutcomeRow] = []
    for i in range(table.num_rows):
        value = float(raw_values[i]) if raw_values[i] is not None else math.nan
        rejection = check_outcome(experiment, offset + i, event_ids[i], unit_ids[i], metric_ids[i], value, times[i], now)
        if rejection:
            rejections.append(rejection)
        elif event_ids[i] in seen:
            duplicates += 1
        else:
            seen.add(event_ids[i])
            outcome_rows.append(OutcomeRow(event_ids[i], unit_ids[i], metric_ids[i], value, times[i]))
    inserted = tx.insert_outcomes(experiment.experiment_id, outcome_rows, now)
    return len(inserted), duplicates + len(outcome_rows) - len(inserted), rejections
