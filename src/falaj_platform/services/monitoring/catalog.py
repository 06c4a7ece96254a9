"""Resources of the monitoring service: reference profiles, model monitors, alert rules,
alerts and notification channels (create, read, list, update, delete).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message

from falaj.common.v1 import common_pb2
from falaj.monitoring.v1 import message_pb2 as pb
from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.validate import enum_name, optional_datetime
from falaj_platform.services.monitoring import lifecycle, profiles, upstream, webhooks
from falaj_platform.services.monitoring import messages as m
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.profiles import ColumnRole, ReferenceDataError
from falaj_platform.services.monitoring.store import (
    alert_rules,
    alerts,
    model_monitors,
    monitor_state,
    notification_channels,
    reference_profiles,
    request_log,
    retraining_starts,
)
from falaj_platform.services.monitoring.windows import WindowKind, time_window_of

SERVICE = "/falaj.monitoring.v1.MonitoringService/"
DEFAULT_WEBHOOK_TIMEOUT = dt.timedelta(seconds=10)
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_INITIAL_BACKOFF = dt.timedelta(seconds=1)
DEFAULT_MAX_BACKOFF = dt.timedelta(minutes=5)


def new_etag() -> str:
    return uuid.uuid4().hex[:16]


def _caller() -> str:
    return current_caller() or "spiffe://falaj.local/service/monitoring"


def _mask_paths(mask: field_mask_pb2.FieldMask, allowed: Iterable[str], immutable: Iterable[str] = ()) -> set[str]:
    """Top-level fields named by the mask (`drift.columns` counts as `drift`)."""
    if not mask.paths:
        raise InvalidArgument("update_mask must name the fields to change", reason="EMPTY_UPDATE_MASK")
    allowed_set, immutable_set = set(allowed), set(immutable)
    fields = set()
    for path in mask.paths:
        top = path.split(".")[0]
        if top in immutable_set:
            raise InvalidArgument(f"{top} cannot be changed", reason="IMMUTABLE_FIELD")
        if top not in allowed_set:
            raise InvalidArgument(f"update_mask path {path!r} is not a field that can be updated", reason="INVALID_UPDATE_MASK")
        fields.add(top)
    return fields


def _check_etag(sent: str, stored: str, name: str) -> None:
    if sent and sent != stored:
        raise Aborted(f"{name} was changed since it was read (etag mismatch); read it again", reason="ETAG_MISMATCH")


# -- reference profiles -------------------------------------------------------------------


def profile_to_proto(row: Any) -> pb.ReferenceProfile:
    return pb.ReferenceProfile(
        name=f"referenceProfiles/{row.id}",
        model_version=row.model_version,
        dataset_version=row.dataset_version,
        source=pb.ReferenceSource.Value("REFERENCE_SOURCE_" + row.source),
        columns=[m.spec_to_proto(spec) for spec in m.specs_from_json(row.columns_json)],
        max_sample_rows=row.max_sample_rows,
        state=pb.ProfileState.Value("PROFILE_STATE_" + row.state),
        state_reason=row.state_reason,
        row_count=row.row_count,
        column_profiles=m.messages_from_json(row.column_profiles_json, pb.ColumnProfile),
        training_metrics=[
            pb.QualityMetricValue(metric=m.metric_to_proto(metric), value=value)
            for metric, value in m.training_metrics_from_json(row.training_metrics_json).items()
        ],
        residency=common_pb2.Residency(region=row.residency_region),
        created=m.audit_stamp(row.created_by, row.created_at),
    )


def _build_profile(
    ctx: Context,
    *,
    profile_id: str,
    profile: pb.ReferenceProfile,
    table: pa.Table,
    source: str,
    dataset_version: str,
    training_metrics: dict[Any, float],
    request: Message,
    method: str,
    response_type: type[Any],
) -> Any:
    """Summarise the rows, write the sample file, and store the READY profile."""
    if profile.max_sample_rows < 0:
        raise InvalidArgument("max_sample_rows must not be negative", reason="INVALID_SAMPLE_SIZE")
    if table.num_rows == 0:
        raise InvalidArgument("the reference has no rows", reason="EMPTY_REFERENCE")
    try:
        specs = profiles.resolve_specs(m.specs_from_proto(profile.columns), table)
    except ReferenceDataError as error:
        raise InvalidArgument(str(error), reason="INVALID_REFERENCE") from None
    present = [spec for spec in specs if spec.name in table.column_names]
    if not any(spec.role is ColumnRole.FEATURE for spec in present):
        raise InvalidArgument("the reference needs at least one feature column", reason="INVALID_REFERENCE")
    table = table.select([spec.name for spec in present])
    summaries = [profiles.summarize_column(s.name, s.kind, profiles.column_values(table.column(s.name), s.kind)) for s in present if s.kind]
    sample = profiles.sample_rows(table, profile.max_sample_rows)
    path = ctx.config.reference_dir / f"{profile_id}-{uuid.uuid4().hex[:8]}.arrow"
    profiles.write_sample(path, sample)
    now = ctx.now()
    try:
        with ctx.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, response_type)
            if replayed is not None:
                path.unlink(missing_ok=True)
                return replayed
            if ctx.store.get(session, reference_profiles, profile_id) is not None:
                raise AlreadyExists(f"referenceProfiles/{profile_id} already exists", reason="PROFILE_EXISTS")
            row = {
                "id": profile_id,
                "model_version": profile.model_version,
                "dataset_version": dataset_version,
                "source": source,
                "state": "READY",
                "state_reason": "",
                "max_sample_rows": profile.max_sample_rows,
                "row_count": table.num_rows,
                "columns_json": m.specs_to_json(specs),
                "column_profiles_json": m.messages_to_json([m.summary_to_proto(s) for s in summaries]),
                "training_metrics_json": m.training_metrics_to_json(training_metrics),
                "sample_path": str(path),
                "residency_region": ctx.config.region,
                "created_by": _caller(),
                "created_at": now,
            }
            ctx.store.insert(session, reference_profiles, row)
            response = response_type(profile=profile_to_proto(_Row(row)))
            remember(session, request_log, method, request, response)
            return response
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class _Row:
    """Attribute access to a dict, so fresh rows convert like stored ones."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)


def _check_profile_header(profile_id: str, profile: pb.ReferenceProfile) -> None:
    m.check_id(profile_id, "profile_id")
    if not profile.model_version:
        raise InvalidArgument("profile.model_version is required", reason="MISSING_MODEL_VERSION")


def create_reference_profile(ctx: Context, request: rr.CreateReferenceProfileRequest) -> rr.CreateReferenceProfileResponse:
    """Read the dataset version's rows from ingest (through the gateway) and build the profile."""
    _check_profile_header(request.profile_id, request.profile)
    method = SERVICE + "CreateReferenceProfile"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.CreateReferenceProfileResponse)
        if replayed is not None:
            return replayed
        if ctx.store.get(session, reference_profiles, request.profile_id) is not None:
            raise AlreadyExists(f"referenceProfiles/{request.profile_id} already exists", reason="PROFILE_EXISTS")
    profile = request.profile
    training_metrics = m.training_metrics_from_proto(profile.training_metrics)
    dataset_version, source = profile.dataset_version, "DATASET_VERSION"
    if not dataset_version or not training_metrics:
        try:
            facts = ctx.clients.model_version_facts(profile.model_version)
        except NotFound:
            if not dataset_version:
                raise
            # A dataset named explicitly needs no registry entry; quality just has no baseline.
            facts = upstream.ModelVersionFacts("", {}, "")
        training_metrics = training_metrics or m.training_metrics_from_registry(facts.metrics)
        if not dataset_version:
            dataset_version, source = facts.training_dataset_version, "MODEL_LINEAGE"
            if not dataset_version:
                raise FailedPrecondition(
                    f"{profile.model_version} records no training dataset version; name profile.dataset_version",
                    reason="NO_TRAINING_DATASET",
                )
    columns = [column.name for column in profile.columns]
    tables = [profiles.read_arrow_stream(payload) for payload in ctx.clients.read_dataset_version(dataset_version, columns)]
    table = profiles.concat_batches(tables) if tables else pa.table({})
    return _build_profile(
        ctx,
        profile_id=request.profile_id,
        profile=profile,
        table=table,
        source=source,
        dataset_version=dataset_version,
        training_metrics=training_metrics,
        request=request,
        method=method,
        response_type=rr.CreateReferenceProfileResponse,
    )


def upload_reference_profile(ctx: Context, messages: Iterator[rr.UploadReferenceProfileRequest]) -> rr.UploadReferenceProfileResponse:
    first = next(messages, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgument("the first message of an upload must carry the header", reason="MISSING_HEADER")
    header = first.header
    _check_profile_header(header.profile_id, header.profile)
    method = SERVICE + "UploadReferenceProfile"
    tables = []
    for index, message in enumerate(messages, start=1):
        if message.WhichOneof("payload") != "batch":
            raise InvalidArgument(
                f"message {index} of the upload is not a batch (only the first carries the header)", reason="UNEXPECTED_HEADER"
            )
        try:
            table = profiles.read_arrow_stream(message.batch.arrow_ipc)
        except (pa.ArrowInvalid, OSError) as error:
            raise InvalidArgument(f"batch {index} is not an Arrow IPC stream: {error}", reason="MALFORMED_BATCH") from None
        if message.batch.row_count and message.batch.row_count != table.num_rows:
            raise InvalidArgument(
                f"batch {index} says {message.batch.row_count} rows but holds {table.num_rows}", reason="ROW_COUNT_MISMATCH"
            )
        tables.append(table)
    try:
        table = profiles.concat_batches(tables)
    except ReferenceDataError as error:
        raise InvalidArgument(str(error), reason="INVALID_REFERENCE") from None
    return _build_profile(
        ctx,
        profile_id=header.profile_id,
        profile=header.profile,
        table=table,
        source="UPLOAD",
        dataset_version="",
        training_metrics=m.training_metrics_from_proto(header.profile.training_metrics),
        request=header,
        method=method,
        response_type=rr.UploadReferenceProfileResponse,
    )


def get_reference_profile(ctx: Context, name: str) -> pb.ReferenceProfile:
    profile_id = m.parse_name(name, "referenceProfiles")
    with ctx.store.transaction() as session:
        row = ctx.store.get(session, reference_profiles, profile_id)
    if row is None:
        raise NotFound(f"{name} does not exist", reason="PROFILE_NOT_FOUND")
    return profile_to_proto(row)


def list_reference_profiles(ctx: Context, request: rr.ListReferenceProfilesRequest) -> rr.ListReferenceProfilesResponse:
    query = {"model_version": request.model_version}
    page = m.page_of(request.page_size, request.page_token, query)
    where = [reference_profiles.c.model_version == request.model_version] if request.model_version else []
    with ctx.store.transaction() as session:
        rows, more = ctx.store.page(
            session,
            reference_profiles,
            where=where,
            order_by=[reference_profiles.c.created_at.desc(), reference_profiles.c.id],
            offset=page.offset,
            limit=page.size,
        )
    return rr.ListReferenceProfilesResponse(
        profiles=[profile_to_proto(r) for r in rows], next_page_token=m.next_token(page, len(rows), more, query)
    )


def delete_reference_profile(ctx: Context, request: rr.DeleteReferenceProfileRequest) -> rr.DeleteReferenceProfileResponse:
    profile_id = m.parse_name(request.name, "referenceProfiles")
    method = SERVICE + "DeleteReferenceProfile"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.DeleteReferenceProfileResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, reference_profiles, profile_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.name} does not exist", reason="PROFILE_NOT_FOUND")
        users = ctx.store.monitors_using_profile(session, profile_id)
        if users:
            raise FailedPrecondition(
                f"{request.name} is used by monitor(s) {', '.join(users)}; delete them or point them elsewhere first",
                reason="PROFILE_IN_USE",
            )
        ctx.store.delete(session, reference_profiles, profile_id)
        response = rr.DeleteReferenceProfileResponse(name=request.name)
        remember(session, request_log, method, request, response)
    if row.sample_path:
        ctx.references.forget(row.sample_path)
        Path(row.sample_path).unlink(missing_ok=True)
    return response


# -- model monitors -------------------------------------------------------------------------


def monitor_to_proto(row: Any, state: Any | None) -> pb.ModelMonitor:
    monitor = pb.ModelMonitor(
        name=f"modelMonitors/{row.id}",
        display_name=row.display_name,
        model_version=row.model_version,
        deployment=row.deployment,
        reference_profile=f"referenceProfiles/{row.reference_profile}",
        paused=row.paused,
        residency=common_pb2.Residency(region=row.residency_region),
        labels=json.loads(row.labels_json or "{}"),
        created=m.audit_stamp(row.created_by, row.created_at),
        updated=m.audit_stamp(row.updated_by, row.updated_at),
        etag=row.etag,
    )
    m.monitor_config_from_json(row.config_json, monitor)
    if state is not None:
        monitor.ingestion_stats.CopyFrom(
            pb.IngestionStats(
                accepted_rows=state.accepted_rows,
                rejected_rows=state.rejected_rows,
                unknown_model_version_rows=state.unknown_model_version_rows,
                duplicate_batches=state.duplicate_batches,
                joined_labels=state.joined_labels,
                unmatched_labels=state.unmatched_labels,
            )
        )
    return monitor


def _check_monitor_config(monitor: pb.ModelMonitor, specs: Sequence[profiles.ColumnSpec]) -> pb.ModelMonitor:
    """Validate the settings against the profile's columns; fill the quality columns when unset."""
    m.window_plan(monitor.window)
    m.drift_settings(monitor.drift, specs)
    m.retention(monitor.retention)
    names = {spec.name for spec in specs}
    unknown = [column for column in monitor.drift.columns if column not in names]
    unknown += [o.column for o in monitor.drift.column_overrides if o.column not in names]
    if unknown:
        raise InvalidArgument(
            f"drift config names column(s) not in the reference profile: {', '.join(sorted(set(unknown)))}", reason="UNKNOWN_COLUMN"
        )
    settings = m.quality_settings(monitor.quality)
    checked = pb.ModelMonitor()
    checked.CopyFrom(monitor)
    if settings.task is not None:
        if not settings.prediction_column:
            predictions = [s.name for s in specs if s.role is ColumnRole.PREDICTION]
            if not predictions:
                raise InvalidArgument(
                    "quality.prediction_column is required (the profile has no PREDICTION column)", reason="MISSING_PREDICTION_COLUMN"
                )
            checked.quality.prediction_column = predictions[0]
        if not settings.score_column:
            scores = [s.name for s in specs if s.role is ColumnRole.PREDICTION_SCORE]
            if scores:
                checked.quality.score_column = scores[0]
        for column in (checked.quality.prediction_column, checked.quality.score_column):
            if column and column not in names:
                raise InvalidArgument(f"quality column {column!r} is not in the reference profile", reason="UNKNOWN_COLUMN")
    return checked


def _profile_specs(ctx: Context, session: Any, profile_name: str) -> tuple[str, list[profiles.ColumnSpec]]:
    profile_id = m.parse_name(profile_name, "referenceProfiles")
    row = ctx.store.get(session, reference_profiles, profile_id)
    if row is None:
        raise NotFound(f"{profile_name} does not exist", reason="PROFILE_NOT_FOUND")
    if row.state != "READY":
        raise FailedPrecondition(f"{profile_name} is {row.state}, not READY", reason="PROFILE_NOT_READY")
    return profile_id, m.specs_from_json(row.columns_json)


def create_model_monitor(ctx: Context, request: rr.CreateModelMonitorRequest) -> rr.CreateModelMonitorResponse:
    monitor_id = m.check_id(request.monitor_id, "monitor_id")
    monitor = request.monitor
    if not monitor.model_version:
        raise InvalidArgument("monitor.model_version is required", reason="MISSING_MODEL_VERSION")
    method = SERVICE + "CreateModelMonitor"
    now = ctx.now()
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.CreateModelMonitorResponse)
        if replayed is not None:
            return replayed
        profile_id, specs = _profile_specs(ctx, session, monitor.reference_profile)
        checked = _check_monitor_config(monitor, specs)
        if ctx.store.get(session, model_monitors, monitor_id) is not None:
            raise AlreadyExists(f"modelMonitors/{monitor_id} already exists", reason="MONITOR_EXISTS")
        other = ctx.store.monitor_by_model_version(session, monitor.model_version)
        if other is not None:
            raise AlreadyExists(f"{monitor.model_version} is already watched by modelMonitors/{other.id}", reason="MODEL_VERSION_MONITORED")
        actor = _caller()
        row = {
            "id": monitor_id,
            "display_name": monitor.display_name,
            "model_version": monitor.model_version,
            "deployment": monitor.deployment,
            "reference_profile": profile_id,
            "config_json": m.monitor_config_to_json(checked),
            "paused": monitor.paused,
            "residency_region": ctx.config.region,
            "labels_json": json.dumps(dict(monitor.labels), sort_keys=True),
            "etag": new_etag(),
            "created_by": actor,
            "created_at": now,
            "updated_by": actor,
            "updated_at": now,
        }
        ctx.store.insert(session, model_monitors, row)
        ctx.store.insert(session, monitor_state, {"monitor": monitor_id})
        state = ctx.store.get(session, monitor_state, monitor_id)
        response = rr.CreateModelMonitorResponse(monitor=monitor_to_proto(_Row(row), state))
        remember(session, request_log, method, request, response)
        return response


def get_model_monitor(ctx: Context, name: str) -> pb.ModelMonitor:
    monitor_id = m.parse_name(name, "modelMonitors")
    with ctx.store.transaction() as session:
        row = ctx.store.get(session, model_monitors, monitor_id)
        if row is None:
            raise NotFound(f"{name} does not exist", reason="MONITOR_NOT_FOUND")
        return monitor_to_proto(row, ctx.store.get(session, monitor_state, monitor_id))


def list_model_monitors(ctx: Context, request: rr.ListModelMonitorsRequest) -> rr.ListModelMonitorsResponse:
    query = {"model_version": request.model_version, "deployment": request.deployment}
    page = m.page_of(request.page_size, request.page_token, query)
    where = []
    if request.model_version:
        where.append(model_monitors.c.model_version == request.model_version)
    if request.deployment:
        where.append(model_monitors.c.deployment == request.deployment)
    with ctx.store.transaction() as session:
        rows, more = ctx.store.page(
            session, model_monitors, where=where, order_by=[model_monitors.c.id], offset=page.offset, limit=page.size
        )
        monitors = [monitor_to_proto(r, ctx.store.get(session, monitor_state, r.id)) for r in rows]
    return rr.ListModelMonitorsResponse(monitors=monitors, next_page_token=m.next_token(page, len(rows), more, query))


MONITOR_FIELDS = ("display_name", "deployment", "reference_profile", "window", "drift", "quality", "retention", "paused", "labels")


def update_model_monitor(ctx: Context, request: rr.UpdateModelMonitorRequest) -> rr.UpdateModelMonitorResponse:
    monitor_id = m.parse_name(request.monitor.name, "modelMonitors")
    fields = _mask_paths(request.update_mask, MONITOR_FIELDS, immutable=("model_version", "name", "residency", "ingestion_stats"))
    method = SERVICE + "UpdateModelMonitor"
    now = ctx.now()
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.UpdateModelMonitorResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, model_monitors, monitor_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.monitor.name} does not exist", reason="MONITOR_NOT_FOUND")
        _check_etag(request.monitor.etag, row.etag, request.monitor.name)
        merged: Any = monitor_to_proto(row, None)
        for field in fields:
            merged.ClearField(field)
            if field == "labels":
                merged.labels.update(request.monitor.labels)
            elif field in ("window", "drift", "quality", "retention"):
                getattr(merged, field).CopyFrom(getattr(request.monitor, field))
            else:
                setattr(merged, field, getattr(request.monitor, field))
        profile_id, specs = _profile_specs(ctx, session, merged.reference_profile)
        checked = _check_monitor_config(merged, specs)
        values = {
            "display_name": checked.display_name,
            "deployment": checked.deployment,
            "reference_profile": profile_id,
            "config_json": m.monitor_config_to_json(checked),
            "paused": checked.paused,
            "labels_json": json.dumps(dict(checked.labels), sort_keys=True),
            "etag": new_etag(),
            "updated_by": _caller(),
            "updated_at": now,
        }
        ctx.store.update(session, model_monitors, monitor_id, values)
        if "window" in fields or "reference_profile" in fields:
            # New settings apply from the next window: windows restart from here.
            state = ctx.store.get(session, monitor_state, monitor_id)
            plan = m.window_plan(checked.window)
            restart: dict[str, Any] = {"count_base_sequence": state.next_sequence if state else 0, "evaluated_count_windows": 0}
            if plan.kind is WindowKind.TIME:
                restart["evaluated_until"] = time_window_of(now, plan.duration).start
            ctx.store.update(session, monitor_state, monitor_id, restart)
        stored = ctx.store.get(session, model_monitors, monitor_id)
        response = rr.UpdateModelMonitorResponse(monitor=monitor_to_proto(stored, ctx.store.get(session, monitor_state, monitor_id)))
        remember(session, request_log, method, request, response)
        return response


def delete_model_monitor(ctx: Context, request: rr.DeleteModelMonitorRequest) -> rr.DeleteModelMonitorResponse:
    monitor_id = m.parse_name(request.name, "modelMonitors")
    method = SERVICE + "DeleteModelMonitor"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.DeleteModelMonitorResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, model_monitors, monitor_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.name} does not exist", reason="MONITOR_NOT_FOUND")
        _check_etag(request.etag, row.etag, request.name)
        # Logs, state, reports, window metrics and rules go with it (foreign keys cascade);
        # its alerts stay as history.
        ctx.store.delete(session, model_monitors, monitor_id)
        response = rr.DeleteModelMonitorResponse(name=request.name)
        remember(session, request_log, method, request, response)
        return response


# -- alert rules ----------------------------------------------------------------------------

COLUMN_METRICS = ("COLUMN_DRIFT_STATISTIC", "COLUMN_DRIFT_P_VALUE")
QUALITY_METRICS = ("QUALITY", "QUALITY_DROP")


def rule_to_proto(row: Any) -> pb.AlertRule:
    rule = pb.AlertRule(
        name=f"alertRules/{row.id}",
        display_name=row.display_name,
        description=row.description,
        monitor=f"modelMonitors/{row.monitor}",
        metric=pb.AlertMetric.Value("ALERT_METRIC_" + row.metric),
        column=row.column_name,
        quality_metric=pb.QualityMetric.Value("QUALITY_METRIC_" + (row.quality_metric or "UNSPECIFIED")),
        comparator=pb.Comparator.Value("COMPARATOR_" + row.comparator),
        threshold=row.threshold,
        severity=pb.AlertSeverity.Value("ALERT_SEVERITY_" + row.severity),
        notification_channels=json.loads(row.notification_channels_json or "[]"),
        enabled=row.enabled,
        labels=json.loads(row.labels_json or "{}"),
        created=m.audit_stamp(row.created_by, row.created_at),
        updated=m.audit_stamp(row.updated_by, row.updated_at),
        etag=row.etag,
    )
    if row.evaluation_window_seconds is not None:
        rule.evaluation_window.CopyFrom(m.seconds_duration(row.evaluation_window_seconds))
    if row.for_duration_seconds:
        rule.for_duration.CopyFrom(m.seconds_duration(row.for_duration_seconds))
    if row.retraining_json:
        json_format.Parse(row.retraining_json, rule.retraining)
    return rule


def _rule_values(ctx: Context, session: Any, rule: pb.AlertRule) -> dict[str, Any]:
    """Validated column values of a rule."""
    monitor_id = m.parse_name(rule.monitor, "modelMonitors")
    monitor = ctx.store.get(session, model_monitors, monitor_id)
    if monitor is None:
        raise NotFound(f"{rule.monitor} does not exist", reason="MONITOR_NOT_FOUND")
    if rule.metric == 0:
        raise InvalidArgument("rule.metric is required", reason="MISSING_METRIC")
    metric = pb.AlertMetric.Name(rule.metric).removeprefix("ALERT_METRIC_")
    if metric in COLUMN_METRICS and not rule.column:
        raise InvalidArgument(f"{metric} needs rule.column", reason="MISSING_COLUMN")
    if metric in QUALITY_METRICS and rule.quality_metric == 0:
        raise InvalidArgument(f"{metric} needs rule.quality_metric", reason="MISSING_QUALITY_METRIC")
    comparator = m.comparator_of(rule.comparator)
    if not math.isfinite(rule.threshold):
        raise InvalidArgument("rule.threshold must be a finite number", reason="INVALID_THRESHOLD")
    evaluation_window = m.positive_duration(rule, "evaluation_window", "rule.evaluation_window")
    for_duration = rule.for_duration.ToTimedelta() if rule.HasField("for_duration") else dt.timedelta(0)
    if for_duration < dt.timedelta(0):
        raise InvalidArgument("rule.for_duration must not be negative", reason="INVALID_DURATION")
    severity = pb.AlertSeverity.Name(rule.severity or pb.ALERT_SEVERITY_WARNING).removeprefix("ALERT_SEVERITY_")
    for channel in rule.notification_channels:
        channel_id = m.parse_name(channel, "notificationChannels")
        if ctx.store.get(session, notification_channels, channel_id) is None:
            raise NotFound(f"{channel} does not exist", reason="CHANNEL_NOT_FOUND")
    retraining_json = None
    if rule.HasField("retraining"):
        action = rule.retraining
        if action.enabled and not action.template_training_job.startswith("trainingJobs/"):
            raise InvalidArgument(
                "retraining.template_training_job must name a training job (trainingJobs/{id})", reason="INVALID_RETRAINING"
            )
        try:
            upstream.check_overrides(action.parameter_overrides)
        except upstream.OverrideError as error:
            raise InvalidArgument(str(error), reason="INVALID_PARAMETER_OVERRIDE") from None
        m.positive_duration(action, "cooldown", "retraining.cooldown")
        retraining_json = json_format.MessageToJson(action, indent=None, sort_keys=True)
    return {
        "display_name": rule.display_name,
        "description": rule.description,
        "monitor": monitor_id,
        "metric": metric,
        "column_name": rule.column,
        "quality_metric": pb.QualityMetric.Name(rule.quality_metric).removeprefix("QUALITY_METRIC_") if rule.quality_metric else "",
        "comparator": comparator.value,
        "threshold": rule.threshold,
        "evaluation_window_seconds": evaluation_window.total_seconds() if evaluation_window else None,
        "for_duration_seconds": for_duration.total_seconds(),
        "severity": severity,
        "notification_channels_json": json.dumps(list(dict.fromkeys(rule.notification_channels))),
        "retraining_json": retraining_json,
        "enabled": rule.enabled,
        "labels_json": json.dumps(dict(rule.labels), sort_keys=True),
    }


def create_alert_rule(ctx: Context, request: rr.CreateAlertRuleRequest) -> rr.CreateAlertRuleResponse:
    rule_id = m.check_id(request.rule_id, "rule_id")
    method = SERVICE + "CreateAlertRule"
    now = ctx.now()
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.CreateAlertRuleResponse)
        if replayed is not None:
            return replayed
        values = _rule_values(ctx, session, request.rule)
        if ctx.store.get(session, alert_rules, rule_id) is not None:
            raise AlreadyExists(f"alertRules/{rule_id} already exists", reason="RULE_EXISTS")
        actor = _caller()
        row = {"id": rule_id, **values, "etag": new_etag(), "created_by": actor, "created_at": now, "updated_by": actor, "updated_at": now}
        ctx.store.insert(session, alert_rules, row)
        response = rr.CreateAlertRuleResponse(rule=rule_to_proto(_Row(row)))
        remember(session, request_log, method, request, response)
    ctx.wake.set()
    return response


def get_alert_rule(ctx: Context, name: str) -> pb.AlertRule:
    rule_id = m.parse_name(name, "alertRules")
    with ctx.store.transaction() as session:
        row = ctx.store.get(session, alert_rules, rule_id)
    if row is None:
        raise NotFound(f"{name} does not exist", reason="RULE_NOT_FOUND")
    return rule_to_proto(row)


def list_alert_rules(ctx: Context, request: rr.ListAlertRulesRequest) -> rr.ListAlertRulesResponse:
    query = {"monitor": request.monitor}
    page = m.page_of(request.page_size, request.page_token, query)
    where = [alert_rules.c.monitor == m.parse_name(request.monitor, "modelMonitors")] if request.monitor else []
    with ctx.store.transaction() as session:
        rows, more = ctx.store.page(session, alert_rules, where=where, order_by=[alert_rules.c.id], offset=page.offset, limit=page.size)
    return rr.ListAlertRulesResponse(rules=[rule_to_proto(r) for r in rows], next_page_token=m.next_token(page, len(rows), more, query))


RULE_FIELDS = (
    "display_name",
    "description",
    "metric",
    "column",
    "quality_metric",
    "comparator",
    "threshold",
    "evaluation_window",
    "for_duration",
    "severity",
    "notification_channels",
    "retraining",
    "enabled",
    "labels",
)


def update_alert_rule(ctx: Context, request: rr.UpdateAlertRuleRequest) -> rr.UpdateAlertRuleResponse:
    rule_id = m.parse_name(request.rule.name, "alertRules")
    fields = _mask_paths(request.update_mask, RULE_FIELDS, immutable=("monitor", "name"))
    method = SERVICE + "UpdateAlertRule"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.UpdateAlertRuleResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, alert_rules, rule_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.rule.name} does not exist", reason="RULE_NOT_FOUND")
        _check_etag(request.rule.etag, row.etag, request.rule.name)
        merged: Any = rule_to_proto(row)
        for field in fields:
            merged.ClearField(field)
            if field == "labels":
                merged.labels.update(request.rule.labels)
            elif field == "notification_channels":
                merged.notification_channels.extend(request.rule.notification_channels)
            elif field in ("evaluation_window", "for_duration", "retraining"):
                source: Any = request.rule
                if source.HasField(field):
                    getattr(merged, field).CopyFrom(getattr(request.rule, field))
            else:
                setattr(merged, field, getattr(request.rule, field))
        values = _rule_values(ctx, session, merged)
        ctx.store.update(session, alert_rules, rule_id, {**values, "etag": new_etag(), "updated_by": _caller(), "updated_at": ctx.now()})
        response = rr.UpdateAlertRuleResponse(rule=rule_to_proto(ctx.store.get(session, alert_rules, rule_id)))
        remember(session, request_log, method, request, response)
    ctx.wake.set()
    return response


def delete_alert_rule(ctx: Context, request: rr.DeleteAlertRuleRequest) -> rr.DeleteAlertRuleResponse:
    """Delete the rule; its open alert resolves (and says so to channels that want it)."""
    rule_id = m.parse_name(request.name, "alertRules")
    method = SERVICE + "DeleteAlertRule"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.DeleteAlertRuleResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, alert_rules, rule_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.name} does not exist", reason="RULE_NOT_FOUND")
        _check_etag(request.etag, row.etag, request.name)
        open_alert = ctx.store.open_alert(session, rule_id)
        if open_alert is not None:
            if open_alert.state == "PENDING":
                lifecycle.drop_pending(ctx, session, open_alert.id)
            else:
                lifecycle.resolve(ctx, session, open_alert.id, row, ctx.now())
        ctx.store.delete(session, alert_rules, rule_id)
        response = rr.DeleteAlertRuleResponse(name=request.name)
        remember(session, request_log, method, request, response)
        return response


# -- alerts ---------------------------------------------------------------------------------


def alert_to_proto(ctx: Context, session: Any, row: Any) -> pb.Alert:
    alert = pb.Alert(
        name=f"alerts/{row.id}",
        alert_rule=f"alertRules/{row.alert_rule}" if row.alert_rule else "",
        monitor=f"modelMonitors/{row.monitor}",
        model_version=row.model_version,
        state=m.alert_state_to_proto(row.state),
        severity=pb.AlertSeverity.Value("ALERT_SEVERITY_" + row.severity),
        value=row.value,
        threshold=row.threshold,
        summary=row.summary,
        labels=json.loads(row.labels_json or "{}"),
        start_time=m.timestamp(row.start_time),
        fire_time=m.timestamp(row.fire_time),
        resolve_time=m.timestamp(row.resolve_time),
    )
    if row.acknowledged_by:
        alert.acknowledged.CopyFrom(m.audit_stamp(row.acknowledged_by, row.acknowledged_at))
    for delivery in ctx.store.deliveries_of(session, row.id):
        alert.notifications.append(
            pb.NotificationDelivery(
                channel=f"notificationChannels/{delivery.channel}",
                alert_state=m.alert_state_to_proto(delivery.alert_state),
                state=pb.DeliveryState.Value("DELIVERY_STATE_" + delivery.state),
                attempt_count=delivery.attempt_count,
                last_http_status=delivery.last_http_status,
                last_error=delivery.last_error,
                last_attempt_time=m.timestamp(delivery.last_attempt_time),
            )
        )
    retraining = ctx.store.get(session, retraining_starts, row.id)
    if retraining is not None:
        alert.retraining.CopyFrom(
            pb.RetrainingStart(
                training_job=retraining.training_job,
                request_time=m.timestamp(retraining.request_time),
                error_message=retraining.error_message,
            )
        )
    return alert


def get_alert(ctx: Context, name: str) -> pb.Alert:
    alert_id = m.parse_name(name, "alerts")
    with ctx.store.transaction() as session:
        row = ctx.store.get(session, alerts, alert_id)
        if row is None:
            raise NotFound(f"{name} does not exist", reason="ALERT_NOT_FOUND")
        return alert_to_proto(ctx, session, row)


def list_alerts(ctx: Context, request: rr.ListAlertsRequest) -> rr.ListAlertsResponse:
    state = enum_name(pb.AlertState, request.state, "state", prefix="ALERT_STATE_") if request.state else ""
    start, end = optional_datetime(request, "start_time"), optional_datetime(request, "end_time")
    query = {
        "state": request.state,
        "rule": request.alert_rule,
        "monitor": request.monitor,
        "start": request.start_time.ToJsonString() if request.HasField("start_time") else "",
        "end": request.end_time.ToJsonString() if request.HasField("end_time") else "",
    }
    page = m.page_of(request.page_size, request.page_token, query)
    where: list[sa.ColumnElement[bool]] = []
    if state:
        where.append(alerts.c.state == state)
    if request.alert_rule:
        where.append(alerts.c.alert_rule == m.parse_name(request.alert_rule, "alertRules"))
    if request.monitor:
        where.append(alerts.c.monitor == m.parse_name(request.monitor, "modelMonitors"))
    if start is not None:
        where.append(alerts.c.start_time >= start)
    if end is not None:
        where.append(alerts.c.start_time < end)
    with ctx.store.transaction() as session:
        rows, more = ctx.store.page(
            session, alerts, where=where, order_by=[alerts.c.start_time.desc(), alerts.c.id], offset=page.offset, limit=page.size
        )
        found = [alert_to_proto(ctx, session, r) for r in rows]
    return rr.ListAlertsResponse(alerts=found, next_page_token=m.next_token(page, len(rows), more, query))


def acknowledge_alert(ctx: Context, request: rr.AcknowledgeAlertRequest) -> rr.AcknowledgeAlertResponse:
    alert_id = m.parse_name(request.name, "alerts")
    method = SERVICE + "AcknowledgeAlert"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.AcknowledgeAlertResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, alerts, alert_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.name} does not exist", reason="ALERT_NOT_FOUND")
        values: dict[str, Any] = {"acknowledged_by": _caller(), "acknowledged_at": ctx.now()}
        if request.note:
            labels = json.loads(row.labels_json or "{}")
            labels["acknowledgement_note"] = request.note[:500]
            values["labels_json"] = json.dumps(labels, sort_keys=True)
        ctx.store.update(session, alerts, alert_id, values)
        response = rr.AcknowledgeAlertResponse(alert=alert_to_proto(ctx, session, ctx.store.get(session, alerts, alert_id)))
        remember(session, request_log, method, request, response)
        return response


# -- notification channels --------------------------------------------------------------------


def channel_to_proto(row: Any) -> pb.NotificationChannel:
    return pb.NotificationChannel(
        name=f"notificationChannels/{row.id}",
        display_name=row.display_name,
        webhook=pb.WebhookConfig(
            url=row.webhook_url,
            has_signing_secret=bool(row.signing_secret),
            headers=json.loads(row.headers_json or "{}"),
            timeout=m.seconds_duration(row.timeout_seconds),
        ),
        retry=pb.RetryPolicy(
            max_attempts=row.max_attempts,
            initial_backoff=m.seconds_duration(row.initial_backoff_seconds),
            max_backoff=m.seconds_duration(row.max_backoff_seconds),
        ),
        notify_on_resolve=row.notify_on_resolve,
        enabled=row.enabled,
        created=m.audit_stamp(row.created_by, row.created_at),
        updated=m.audit_stamp(row.updated_by, row.updated_at),
    )


def _channel_values(channel: pb.NotificationChannel, stored_secret: str | None) -> dict[str, Any]:
    if channel.WhichOneof("target") != "webhook":
        raise InvalidArgument("channel.webhook is required", reason="MISSING_TARGET")
    webhook = channel.webhook
    try:
        webhooks.check_url(webhook.url)
        webhooks.check_headers(webhook.headers)
    except webhooks.WebhookUrlError as error:
        raise InvalidArgument(str(error), reason="INVALID_WEBHOOK") from None
    timeout = m.positive_duration(webhook, "timeout", "webhook.timeout") or DEFAULT_WEBHOOK_TIMEOUT
    if channel.retry.max_attempts < 0:
        raise InvalidArgument("retry.max_attempts must not be negative", reason="INVALID_RETRY")
    initial = m.positive_duration(channel.retry, "initial_backoff", "retry.initial_backoff") or DEFAULT_INITIAL_BACKOFF
    maximum = m.positive_duration(channel.retry, "max_backoff", "retry.max_backoff") or DEFAULT_MAX_BACKOFF
    return {
        "display_name": channel.display_name,
        "webhook_url": webhook.url,
        "signing_secret": webhook.signing_secret or stored_secret,
        "headers_json": json.dumps(dict(webhook.headers), sort_keys=True),
        "timeout_seconds": timeout.total_seconds(),
        "max_attempts": channel.retry.max_attempts or DEFAULT_MAX_ATTEMPTS,
        "initial_backoff_seconds": initial.total_seconds(),
        "max_backoff_seconds": max(maximum, initial).total_seconds(),
        "notify_on_resolve": channel.notify_on_resolve,
        "enabled": channel.enabled,
    }


def create_notification_channel(ctx: Context, request: rr.CreateNotificationChannelRequest) -> rr.CreateNotificationChannelResponse:
    channel_id = m.check_id(request.channel_id, "channel_id")
    method = SERVICE + "CreateNotificationChannel"
    values = _channel_values(request.channel, None)
    now = ctx.now()
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.CreateNotificationChannelResponse)
        if replayed is not None:
            return replayed
        if ctx.store.get(session, notification_channels, channel_id) is not None:
            raise AlreadyExists(f"notificationChannels/{channel_id} already exists", reason="CHANNEL_EXISTS")
        actor = _caller()
        row = {
            "id": channel_id,
            **values,
            "etag": new_etag(),
            "created_by": actor,
            "created_at": now,
            "updated_by": actor,
            "updated_at": now,
        }
        ctx.store.insert(session, notification_channels, row)
        response = rr.CreateNotificationChannelResponse(channel=channel_to_proto(_Row(row)))
        remember(session, request_log, method, request, response)
        return response


def get_notification_channel(ctx: Context, name: str) -> pb.NotificationChannel:
    channel_id = m.parse_name(name, "notificationChannels")
    with ctx.store.transaction() as session:
        row = ctx.store.get(session, notification_channels, channel_id)
    if row is None:
        raise NotFound(f"{name} does not exist", reason="CHANNEL_NOT_FOUND")
    return channel_to_proto(row)


def list_notification_channels(ctx: Context, request: rr.ListNotificationChannelsRequest) -> rr.ListNotificationChannelsResponse:
    query: dict[str, object] = {}
    page = m.page_of(request.page_size, request.page_token, query)
    with ctx.store.transaction() as session:
        rows, more = ctx.store.page(
            session, notification_channels, where=[], order_by=[notification_channels.c.id], offset=page.offset, limit=page.size
        )
    return rr.ListNotificationChannelsResponse(
        channels=[channel_to_proto(r) for r in rows], next_page_token=m.next_token(page, len(rows), more, query)
    )


CHANNEL_FIELDS = ("display_name", "webhook", "retry", "notify_on_resolve", "enabled")


def update_notification_channel(ctx: Context, request: rr.UpdateNotificationChannelRequest) -> rr.UpdateNotificationChannelResponse:
    channel_id = m.parse_name(request.channel.name, "notificationChannels")
    fields = _mask_paths(request.update_mask, CHANNEL_FIELDS, immutable=("name",))
    method = SERVICE + "UpdateNotificationChannel"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.UpdateNotificationChannelResponse)
        if replayed is not None:
            return replayed
        row = ctx.store.get(session, notification_channels, channel_id, for_update=True)
        if row is None:
            raise NotFound(f"{request.channel.name} does not exist", reason="CHANNEL_NOT_FOUND")
        merged = channel_to_proto(row)
        for path in request.update_mask.paths:
            top, _, sub = path.partition(".")
            if top == "webhook" and sub:
                target, source = merged.webhook, request.channel.webhook
                if sub == "headers":
                    target.ClearField("headers")
                    target.headers.update(source.headers)
                elif sub == "timeout":
                    target.timeout.CopyFrom(source.timeout)
                elif sub in ("url", "signing_secret"):
                    setattr(target, sub, getattr(source, sub))
                else:
                    raise InvalidArgument(f"update_mask path {path!r} is not a field that can be updated", reason="INVALID_UPDATE_MASK")
            elif top in ("webhook", "retry"):
                getattr(merged, top).CopyFrom(getattr(request.channel, top))
            elif top in fields:
                setattr(merged, top, getattr(request.channel, top))
        secret_paths = {"webhook", "webhook.signing_secret"} & set(request.update_mask.paths)
        keep_secret = None if secret_paths else row.signing_secret
        values = _channel_values(merged, keep_secret)
        ctx.store.update(
            session, notification_channels, channel_id, {**values, "etag": new_etag(), "updated_by": _caller(), "updated_at": ctx.now()}
        )
        response = rr.UpdateNotificationChannelResponse(channel=channel_to_proto(ctx.store.get(session, notification_channels, channel_id)))
        remember(session, request_log, method, request, response)
        return response


def delete_notification_channel(ctx: Context, request: rr.DeleteNotificationChannelRequest) -> rr.DeleteNotificationChannelResponse:
    channel_id = m.parse_name(request.name, "notificationChannels")
    method = SERVICE + "DeleteNotificationChannel"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.DeleteNotificationChannelResponse)
        if replayed is not None:
            return replayed
        if ctx.store.get(session, notification_channels, channel_id, for_update=True) is None:
            raise NotFound(f"{request.name} does not exist", reason="CHANNEL_NOT_FOUND")
        users = ctx.store.rules_using_channel(session, request.name)
        if users and not request.force:
            raise FailedPrecondition(
                f"{request.name} is used by rule(s) {', '.join(r.id for r in users)}; remove it from them or delete with force",
                reason="CHANNEL_IN_USE",
            )
        for rule in users:
            channels = [c for c in json.loads(rule.notification_channels_json) if c != request.name]
            ctx.store.update(session, alert_rules, rule.id, {"notification_channels_json": json.dumps(channels), "etag": new_etag()})
        ctx.store.delete(session, notification_channels, channel_id)
        response = rr.DeleteNotificationChannelResponse(name=request.name)
        remember(session, request_log, method, request, response)
        return response
