"""Evaluation: closed windows become drift reports, quality and serving figures; alert
rules are checked against the latest figures; reports are listed and rendered.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from falaj.monitoring.v1 import message_pb2 as pb
from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.validate import optional_datetime
from falaj_platform.services.monitoring import alerting, drift, lifecycle, quality, report_html
from falaj_platform.services.monitoring import messages as m
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.profiles import ColumnRole, ColumnSpec, values_from_python
from falaj_platform.services.monitoring.store import (
    drift_reports,
    model_monitors,
    monitor_state,
    reference_profiles,
    request_log,
    window_metrics,
)
from falaj_platform.services.monitoring.windows import (
    CountWindow,
    TimeWindow,
    WindowKind,
    WindowPlan,
    count_window,
    count_windows_filled,
    is_time_window_closed,
    time_window_of,
)

SERVICE = "/falaj.monitoring.v1.MonitoringService/"
CHUNK_BYTES = 1 << 20
QUALITY, OPERATIONAL = "QUALITY", "OPERATIONAL"
DRIFT_METRICS = ("DRIFT_SHARE", "DATASET_DRIFT", "COLUMN_DRIFT_STATISTIC", "COLUMN_DRIFT_P_VALUE")
OPERATIONAL_METRICS = ("LATENCY_P99_SECONDS", "ERROR_RATE", "THROUGHPUT")

log = get_logger()


@dataclass(frozen=True)
class MonitorView:
    """A monitor with its profile and parsed settings, read once per evaluation."""

    id: str
    model_version: str
    profile_id: str
    sample_path: str
    specs: tuple[ColumnSpec, ...]
    plan: WindowPlan
    drift_config: pb.DriftConfig
    quality_settings: m.QualitySettings
    retention: m.Retention
    paused: bool
    labels: dict[str, str]
    training_metrics: dict[quality.Metric, float]


def load_view(ctx: Context, session: Session, monitor_id: str) -> MonitorView | None:
    row = ctx.store.get(session, model_monitors, monitor_id)
    if row is None:
        return None
    profile = ctx.store.get(session, reference_profiles, row.reference_profile)
    if profile is None:
        return None
    monitor = pb.ModelMonitor()
    m.monitor_config_from_json(row.config_json, monitor)
    return MonitorView(
        id=row.id,
        model_version=row.model_version,
        profile_id=row.reference_profile,
        sample_path=profile.sample_path or "",
        specs=tuple(m.specs_from_json(profile.columns_json)),
        plan=m.window_plan(monitor.window),
        drift_config=monitor.drift,
        quality_settings=m.quality_settings(monitor.quality),
        retention=m.retention(monitor.retention),
        paused=row.paused,
        labels=json.loads(row.labels_json or "{}"),
        training_metrics=m.training_metrics_from_json(profile.training_metrics_json),
    )


@dataclass(frozen=True)
class WindowSpan:
    """What a window's figures are labelled with."""

    key: str | None
    start: dt.datetime
    end: dt.datetime
    kind: WindowKind

    def to_proto(self, row_count: int) -> pb.Window:
        return pb.Window(
            start_time=m.timestamp(self.start),
            end_time=m.timestamp(self.end),
            row_count=row_count,
            kind=m.to_proto(pb.WindowKind, "WINDOW_KIND_", self.kind),
        )

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def span_of_time_window(window: TimeWindow) -> WindowSpan:
    return WindowSpan(window.key, window.start, window.end, WindowKind.TIME)


def span_of_count_window(window: CountWindow, rows: Sequence[Any]) -> WindowSpan:
    times = [m.utc(r.prediction_time) for r in rows]
    return WindowSpan(window.key, min(times), max(times) + dt.timedelta(microseconds=1), WindowKind.COUNT)


# -- figures of a set of rows ---------------------------------------------------------------------


def _values(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.values_json) for r in rows]


def _tests(view: MonitorView, config: pb.DriftConfig) -> tuple[drift.DriftSettings, list[drift.ColumnTest], list[drift.ColumnTest]]:
    settings = m.drift_settings(config, view.specs)
    chosen = set(config.columns)
    features = [s for s in view.specs if s.role is ColumnRole.FEATURE and (not chosen or s.name in chosen) and s.kind]
    predictions = [s for s in view.specs if s.role in (ColumnRole.PREDICTION, ColumnRole.PREDICTION_SCORE) and s.kind]
    try:
        feature_tests = [settings.column_test(s.name, s.kind) for s in features if s.kind]
        prediction_tests = [settings.column_test(s.name, s.kind) for s in predictions if s.kind] if config.include_predictions else []
    except drift.DriftConfigError as error:
        raise InvalidArgument(str(error), reason="INVALID_DRIFT_METHOD") from None
    return settings, feature_tests, prediction_tests


def compute_drift(
    ctx: Context, view: MonitorView, values: Sequence[dict[str, Any]], config: pb.DriftConfig, *, with_plots: bool
) -> tuple[drift.DatasetDrift, drift.DatasetDrift]:
    settings, feature_tests, prediction_tests = _tests(view, config)
    reference = ctx.references.arrays(view.sample_path, view.specs)
    tests = [t for t in feature_tests + prediction_tests if t.column in reference]
    current = {t.column: values_from_python([v.get(t.column) for v in values], t.kind) for t in tests}
    features = drift.dataset_drift([t for t in feature_tests if t.column in reference], reference, current, settings, with_plots=with_plots)
    predictions = drift.dataset_drift(
        [t for t in prediction_tests if t.column in reference], reference, current, settings, with_plots=with_plots
    )
    return features, predictions


def drift_report_proto(
    view: MonitorView,
    report_id: str,
    span: WindowSpan,
    row_count: int,
    features: drift.DatasetDrift,
    predictions: drift.DatasetDrift,
    trigger: str,
    created: dt.datetime,
    seconds: float,
) -> pb.DriftReport:
    return pb.DriftReport(
        name=f"modelMonitors/{view.id}/driftReports/{report_id}",
        model_version=view.model_version,
        reference_profile=f"referenceProfiles/{view.profile_id}",
        window=span.to_proto(row_count),
        feature_drifts=[m.column_drift_to_proto(c) for c in features.columns],
        prediction_drifts=[m.column_drift_to_proto(c) for c in predictions.columns],
        tested_feature_count=features.tested_count,
        drifted_feature_count=features.drifted_count,
        drift_share=features.drift_share,
        drift_share_threshold=features.drift_share_threshold,
        dataset_drift=features.dataset_drift,
        trigger=pb.ReportTrigger.Value("REPORT_TRIGGER_" + trigger),
        create_time=m.timestamp(created),
        compute_duration=m.seconds_duration(seconds),
    )


def _labelled(view: MonitorView, rows: Sequence[Any], values: Sequence[dict[str, Any]]) -> list[quality.LabeledPrediction]:
    prediction, score = view.quality_settings.prediction_column, view.quality_settings.score_column
    return [
        quality.LabeledPrediction(v.get(prediction), json.loads(r.label_json), v.get(score) if score else None)
        for r, v in zip(rows, values, strict=True)
        if r.label_json is not None
    ]


def quality_values(view: MonitorView, rows: Sequence[Any], values: Sequence[dict[str, Any]]) -> tuple[dict[quality.Metric, float], int]:
    if view.quality_settings.task is None:
        return {}, 0
    labelled = _labelled(view, rows, values)
    return quality.quality_metrics(labelled, view.quality_settings.task, view.quality_settings.positive_class), len(labelled)


def quality_proto(
    view: MonitorView, span: WindowSpan, rows: Sequence[Any], values: Sequence[dict[str, Any]]
) -> tuple[pb.QualityWindowMetrics, dict[quality.Metric, float]]:
    figures, labelled = quality_values(view, rows, values)
    comparisons = []
    for metric, value in figures.items():
        comparison = pb.QualityComparison(metric=m.metric_to_proto(metric), value=value)
        training = view.training_metrics.get(metric)
        if training is not None:
            comparison.training_value = training
            comparison.delta = value - training
        comparisons.append(comparison)
    message = pb.QualityWindowMetrics(
        model_version=view.model_version,
        window=span.to_proto(len(rows)),
        labeled_row_count=labelled,
        unlabeled_row_count=len(rows) - labelled,
        metrics=comparisons,
    )
    return message, figures


def operational_values(rows: Sequence[Any], span_seconds: float) -> quality.OperationalFigures:
    return quality.operational_figures([r.latency_ms for r in rows], [r.status_code for r in rows], span_seconds)


def operational_proto(
    view: MonitorView, span: WindowSpan, rows: Sequence[Any]
) -> tuple[pb.OperationalWindowMetrics, quality.OperationalFigures]:
    figures = operational_values(rows, span.seconds)
    message = pb.OperationalWindowMetrics(
        model_version=view.model_version,
        window=span.to_proto(len(rows)),
        request_count=figures.request_count,
        error_count=figures.error_count,
        error_rate=figures.error_rate,
        throughput_per_second=figures.throughput_per_second,
        latency_p50=m.seconds_duration(figures.latency_p50_ms / 1000),
        latency_p90=m.seconds_duration(figures.latency_p90_ms / 1000),
        latency_p95=m.seconds_duration(figures.latency_p95_ms / 1000),
        latency_p99=m.seconds_duration(figures.latency_p99_ms / 1000),
    )
    return message, figures


# -- closed windows -----------------------------------------------------------------------------


def evaluate_window(ctx: Context, view: MonitorView, span: WindowSpan, rows: Sequence[Any]) -> None:
    """Drift report, quality and serving figures of one closed window, stored together."""
    started = time.perf_counter()
    values = _values(rows)
    features, predictions = compute_drift(ctx, view, values, view.drift_config, with_plots=True)
    now = ctx.now()
    report_id = uuid.uuid4().hex[:20]
    report = drift_report_proto(
        view, report_id, span, len(rows), features, predictions, "WINDOW_CLOSED", now, time.perf_counter() - started
    )
    quality_message, quality_figures = quality_proto(view, span, rows, values)
    operational_message, operational_figures = operational_proto(view, span, rows)
    try:
        with ctx.store.transaction() as session:
            ctx.store.insert(session, drift_reports, _report_row(view.id, report_id, span, len(rows), report, "WINDOW_CLOSED", now))
            for kind, message in ((QUALITY, quality_message), (OPERATIONAL, operational_message)):
                ctx.store.upsert_window_metrics(session, _metrics_row(view.id, kind, span, message, now))
    except AlreadyExists:
        return  # another replica reported this window first
    ctx.metrics.observe_drift(view.id, view.model_version, features)
    ctx.metrics.observe_operations(view.id, view.model_version, operational_figures)
    if quality_figures:
        ctx.metrics.observe_quality(view.id, view.model_version, quality_figures)


def _report_row(
    monitor_id: str, report_id: str, span: WindowSpan, rows: int, report: pb.DriftReport, trigger: str, now: dt.datetime
) -> dict[str, Any]:
    return {
        "id": report_id,
        "monitor": monitor_id,
        "window_key": span.key,
        "window_start": span.start,
        "window_end": span.end,
        "row_count": rows,
        "trigger": trigger,
        "drift_share": report.drift_share,
        "dataset_drift": report.dataset_drift,
        "report_proto": report.SerializeToString(),
        "created_at": now,
    }


def _metrics_row(monitor_id: str, kind: str, span: WindowSpan, message: Any, now: dt.datetime) -> dict[str, Any]:
    return {
        "monitor": monitor_id,
        "kind": kind,
        "window_key": span.key,
        "window_start": span.start,
        "window_end": span.end,
        "metrics_proto": message.SerializeToString(),
        "updated_at": now,
    }


def evaluate_due_windows(ctx: Context, monitor_id: str) -> int:
    """Evaluate every window of the monitor that has closed since the last call; then its rules."""
    evaluated = 0
    with ctx.monitor_lock(monitor_id):
        with ctx.store.transaction() as session:
            view = load_view(ctx, session, monitor_id)
            state = ctx.store.get(session, monitor_state, monitor_id)
        if view is None or state is None or view.paused:
            return 0
        if view.plan.kind is WindowKind.COUNT:
            filled = count_windows_filled(state.count_base_sequence, state.next_sequence, view.plan.row_count)
            for index in range(state.evaluated_count_windows, filled):
                window = count_window(state.count_base_sequence, index, view.plan.row_count)
                with ctx.store.transaction() as session:
                    rows = ctx.store.logs_by_sequence(session, monitor_id, window.first_sequence, window.end_sequence)
                if rows and len(rows) >= view.plan.min_row_count:
                    evaluate_window(ctx, view, span_of_count_window(window, rows), rows)
                    evaluated += 1
                with ctx.store.transaction() as session:
                    ctx.store.update(session, monitor_state, monitor_id, {"evaluated_count_windows": index + 1})
        else:
            evaluated_until = m.utc(state.evaluated_until) if state.evaluated_until else None
            now = ctx.now()
            while True:
                with ctx.store.transaction() as session:
                    first = ctx.store.first_log_time(session, monitor_id, evaluated_until)
                if first is None:
                    break
                time_window = time_window_of(m.utc(first), view.plan.duration)
                if not is_time_window_closed(time_window, now, view.plan):
                    break
                with ctx.store.transaction() as session:
                    rows = ctx.store.logs_in_span(session, monitor_id, time_window.start, time_window.end, ctx.config.max_window_rows)
                if rows and len(rows) >= max(1, view.plan.min_row_count):
                    evaluate_window(ctx, view, span_of_time_window(time_window), rows)
                    evaluated += 1
                evaluated_until = time_window.end
                with ctx.store.transaction() as session:
                    ctx.store.update(session, monitor_state, monitor_id, {"evaluated_until": time_window.end})
        # Still under the lock: a stream whose windows the background worker evaluated first
        # waits here until the worker has also moved the alerts, so that the stream's answer
        # comes after every alert its rows caused (as the contract says).
        if evaluated:
            evaluate_rules(ctx, monitor_id)
    return evaluated


def refresh_quality(ctx: Context, monitor_id: str, labelled_rows: Sequence[tuple[int, dt.datetime]]) -> None:
    """Recompute quality of closed windows that received labels; then check the rules."""
    with ctx.monitor_lock(monitor_id):
        with ctx.store.transaction() as session:
            view = load_view(ctx, session, monitor_id)
            state = ctx.store.get(session, monitor_state, monitor_id)
        if view is None or state is None or view.quality_settings.task is None:
            return
        spans: dict[str, tuple[Any, ...]] = {}
        for sequence, prediction_time in labelled_rows:
            if view.plan.kind is WindowKind.COUNT:
                index = (sequence - state.count_base_sequence) // view.plan.row_count
                if 0 <= index < state.evaluated_count_windows:
                    window = count_window(state.count_base_sequence, index, view.plan.row_count)
                    spans[window.key] = ("count", window)
            else:
                window_t = time_window_of(m.utc(prediction_time), view.plan.duration)
                if state.evaluated_until is not None and window_t.end <= m.utc(state.evaluated_until):
                    spans[window_t.key] = ("time", window_t)
        with ctx.store.transaction() as session:
            reported = {r.window_key for r in ctx.store.window_metrics_for_keys(session, monitor_id, QUALITY, list(spans))}
        for key, (kind, window) in spans.items():
            if key not in reported:
                continue  # the window was too small to evaluate
            with ctx.store.transaction() as session:
                if kind == "count":
                    rows = ctx.store.logs_by_sequence(session, monitor_id, window.first_sequence, window.end_sequence)
                    span = span_of_count_window(window, rows) if rows else None
                else:
                    rows = ctx.store.logs_in_span(session, monitor_id, window.start, window.end, ctx.config.max_window_rows)
                    span = span_of_time_window(window)
            if span is None:
                continue
            message, figures = quality_proto(view, span, rows, _values(rows))
            with ctx.store.transaction() as session:
                ctx.store.upsert_window_metrics(session, _metrics_row(monitor_id, QUALITY, span, message, ctx.now()))
            if figures:
                ctx.metrics.observe_quality(monitor_id, view.model_version, figures)
    evaluate_rules(ctx, monitor_id)


# -- alert rules ---------------------------------------------------------------------------------


def _latest_report(ctx: Context, session: Session, monitor_id: str) -> pb.DriftReport | None:
    row = ctx.store.latest_report(session, monitor_id)
    return pb.DriftReport.FromString(row.report_proto) if row is not None else None


def _column_value(report: pb.DriftReport, column: str, p_value: bool) -> float | None:
    for item in [*report.feature_drifts, *report.prediction_drifts]:
        if item.column == column:
            if p_value:
                return item.p_value if item.HasField("p_value") else None
            return None if item.statistic != item.statistic else item.statistic
    return None


def metric_value(ctx: Context, view: MonitorView, rule: Any, now: dt.datetime) -> float | None:
    """The rule's metric now: over the rule's span ending now, or the latest window's."""
    span_seconds = rule.evaluation_window_seconds
    rows: list[Any] = []
    if span_seconds and rule.metric != "REJECTED_ROWS":
        with ctx.store.transaction() as session:
            rows = ctx.store.logs_in_span(session, view.id, now - dt.timedelta(seconds=span_seconds), now, ctx.config.max_window_rows)
        if not rows:
            return None
    if rule.metric in DRIFT_METRICS:
        if span_seconds:
            features, predictions = compute_drift(ctx, view, _values(rows), view.drift_config, with_plots=False)
            report = drift_report_proto(
                view, "span", WindowSpan(None, now, now, WindowKind.TIME), len(rows), features, predictions, "ON_DEMAND", now, 0
            )
        else:
            with ctx.store.transaction() as session:
                found = _latest_report(ctx, session, view.id)
            if found is None:
                return None
            report = found
        if rule.metric == "DRIFT_SHARE":
            return report.drift_share
        if rule.metric == "DATASET_DRIFT":
            return 1.0 if report.dataset_drift else 0.0
        return _column_value(report, rule.column_name, rule.metric == "COLUMN_DRIFT_P_VALUE")
    if rule.metric in ("QUALITY", "QUALITY_DROP"):
        target = quality.Metric(rule.quality_metric)
        if span_seconds:
            figures, _ = quality_values(view, rows, _values(rows))
            value = figures.get(target)
        else:
            with ctx.store.transaction() as session:
                row = ctx.store.latest_window_metrics(session, view.id, QUALITY)
            if row is None:
                return None
            message = pb.QualityWindowMetrics.FromString(row.metrics_proto)
            value = next((c.value for c in message.metrics if c.metric == m.metric_to_proto(target)), None)
        if value is None or rule.metric == "QUALITY":
            return value
        training = view.training_metrics.get(target)
        return quality.quality_drop(target, value, training) if training is not None else None
    if rule.metric in OPERATIONAL_METRICS:
        if span_seconds:
            figures_o = operational_values(rows, span_seconds)
            p99, error_rate, throughput = figures_o.latency_p99_ms / 1000, figures_o.error_rate, figures_o.throughput_per_second
        else:
            with ctx.store.transaction() as session:
                row = ctx.store.latest_window_metrics(session, view.id, OPERATIONAL)
            if row is None:
                return None
            ops = pb.OperationalWindowMetrics.FromString(row.metrics_proto)
            p99, error_rate, throughput = ops.latency_p99.ToTimedelta().total_seconds(), ops.error_rate, ops.throughput_per_second
        return {"LATENCY_P99_SECONDS": p99, "ERROR_RATE": error_rate, "THROUGHPUT": throughput}[rule.metric]
    if rule.metric == "REJECTED_ROWS":
        since = now - dt.timedelta(seconds=span_seconds or view.plan.duration.total_seconds())
        with ctx.store.transaction() as session:
            return float(ctx.store.rejected_rows_since(session, view.id, since))
    return None


def evaluate_rules(ctx: Context, monitor_id: str) -> None:
    """Check every enabled rule of the monitor once and move its alert along."""
    now = ctx.now()
    with ctx.store.transaction() as session:
        view = load_view(ctx, session, monitor_id)
        rules = ctx.store.enabled_rules(session, monitor_id) if view is not None else []
    if view is None or view.paused:
        return
    for rule in rules:
        try:
            value = metric_value(ctx, view, rule, now)
        except Exception:
            log.exception("alert rule evaluation failed", rule=rule.id)
            continue
        holds = alerting.condition_holds(value, alerting.Comparator(rule.comparator), rule.threshold)
        with ctx.store.transaction() as session:
            current = ctx.store.open_alert(session, rule.id)
            open_alert = alerting.OpenAlert(alerting.AlertState(current.state), m.utc(current.start_time)) if current else None
            step = alerting.next_step(open_alert, holds, now, dt.timedelta(seconds=rule.for_duration_seconds))
            if step in (alerting.Step.START_PENDING, alerting.Step.START_FIRING):
                lifecycle.start(
                    ctx,
                    session,
                    rule,
                    model_version=view.model_version,
                    monitor_labels=view.labels,
                    value=value,
                    firing=step is alerting.Step.START_FIRING,
                    now=now,
                )
            elif current is not None and step is alerting.Step.KEEP:
                lifecycle.observe(ctx, session, current.id, rule, view.model_version, value)
            elif current is not None and step is alerting.Step.FIRE:
                lifecycle.fire(ctx, session, current.id, rule, view.model_version, value, now)
            elif current is not None and step is alerting.Step.DROP_PENDING:
                lifecycle.drop_pending(ctx, session, current.id)
            elif current is not None and step is alerting.Step.RESOLVE:
                lifecycle.resolve(ctx, session, current.id, rule, now, value)
    with ctx.store.transaction() as session:
        ctx.metrics.alerts_firing.labels(monitor_id).set(ctx.store.firing_count(session, monitor_id))


# -- reports over the API ------------------------------------------------------------------------


def compute_drift_report(ctx: Context, request: rr.ComputeDriftReportRequest) -> rr.ComputeDriftReportResponse:
    monitor_id = m.parse_name(request.monitor, "modelMonitors")
    if not request.HasField("start_time"):
        raise InvalidArgument("start_time is required", reason="MISSING_START_TIME")
    method = SERVICE + "ComputeDriftReport"
    start = m.from_timestamp(request.start_time, "start_time")
    end = m.from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else ctx.now()
    if end <= start:
        raise InvalidArgument("end_time must be after start_time", reason="INVALID_SPAN")
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.ComputeDriftReportResponse)
        if replayed is not None:
            return replayed
        view = load_view(ctx, session, monitor_id)
        if view is None:
            raise NotFound(f"{request.monitor} does not exist", reason="MONITOR_NOT_FOUND")
        rows = ctx.store.logs_in_span(session, monitor_id, start, end, ctx.config.max_window_rows)
    if not rows:
        raise FailedPrecondition(
            f"{request.monitor} has no prediction logs between {start.isoformat()} and {end.isoformat()}", reason="NO_LOGS"
        )
    config = request.drift if request.HasField("drift") else view.drift_config
    started = time.perf_counter()
    features, predictions = compute_drift(ctx, view, _values(rows), config, with_plots=True)
    now = ctx.now()
    report_id = uuid.uuid4().hex[:20]
    span = WindowSpan(None, start, end, WindowKind.TIME)
    report = drift_report_proto(view, report_id, span, len(rows), features, predictions, "ON_DEMAND", now, time.perf_counter() - started)
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.ComputeDriftReportResponse)
        if replayed is not None:
            return replayed
        ctx.store.insert(session, drift_reports, _report_row(monitor_id, report_id, span, len(rows), report, "ON_DEMAND", now))
        response = rr.ComputeDriftReportResponse(report=report)
        remember(session, request_log, method, request, response)
        return response


def get_drift_report(ctx: Context, name: str) -> pb.DriftReport:
    monitor_id, report_id = m.parse_report_name(name)
    with ctx.store.transaction() as session:
        row = ctx.store.get(session, drift_reports, report_id)
    if row is None or row.monitor != monitor_id:
        raise NotFound(f"{name} does not exist", reason="REPORT_NOT_FOUND")
    return pb.DriftReport.FromString(row.report_proto)


def list_drift_reports(ctx: Context, request: rr.ListDriftReportsRequest) -> rr.ListDriftReportsResponse:
    monitor_id = m.parse_name(request.parent, "modelMonitors")
    start, end = optional_datetime(request, "start_time"), optional_datetime(request, "end_time")
    query = {
        "parent": request.parent,
        "start": request.start_time.ToJsonString() if request.HasField("start_time") else "",
        "end": request.end_time.ToJsonString() if request.HasField("end_time") else "",
        "drift_only": request.dataset_drift_only,
    }
    page = m.page_of(request.page_size, request.page_token, query)
    where: list[sa.ColumnElement[bool]] = [drift_reports.c.monitor == monitor_id]
    if start is not None:
        where.append(drift_reports.c.window_start >= start)
    if end is not None:
        where.append(drift_reports.c.window_end <= end)
    if request.dataset_drift_only:
        where.append(drift_reports.c.dataset_drift.is_(True))
    with ctx.store.transaction() as session:
        if ctx.store.get(session, model_monitors, monitor_id) is None:
            raise NotFound(f"{request.parent} does not exist", reason="MONITOR_NOT_FOUND")
        rows, more = ctx.store.page(
            session,
            drift_reports,
            where=where,
            order_by=[drift_reports.c.window_start.desc(), drift_reports.c.created_at.desc(), drift_reports.c.id],
            offset=page.offset,
            limit=page.size,
        )
    return rr.ListDriftReportsResponse(
        reports=[pb.DriftReport.FromString(r.report_proto) for r in rows], next_page_token=m.next_token(page, len(rows), more, query)
    )


def _list_window_metrics(ctx: Context, monitor: str, kind: str, request: Any) -> tuple[list[Any], str]:
    monitor_id = m.parse_name(monitor, "modelMonitors")
    start, end = optional_datetime(request, "start_time"), optional_datetime(request, "end_time")
    query = {
        "monitor": monitor,
        "kind": kind,
        "start": request.start_time.ToJsonString() if request.HasField("start_time") else "",
        "end": request.end_time.ToJsonString() if request.HasField("end_time") else "",
    }
    page = m.page_of(request.page_size, request.page_token, query)
    where: list[sa.ColumnElement[bool]] = [window_metrics.c.monitor == monitor_id, window_metrics.c.kind == kind]
    if start is not None:
        where.append(window_metrics.c.window_start >= start)
    if end is not None:
        where.append(window_metrics.c.window_end <= end)
    with ctx.store.transaction() as session:
        if ctx.store.get(session, model_monitors, monitor_id) is None:
            raise NotFound(f"{monitor} does not exist", reason="MONITOR_NOT_FOUND")
        rows, more = ctx.store.page(
            session, window_metrics, where=where, order_by=[window_metrics.c.window_start.desc()], offset=page.offset, limit=page.size
        )
    return rows, m.next_token(page, len(rows), more, query)


def list_quality_metrics(ctx: Context, request: rr.ListQualityMetricsRequest) -> rr.ListQualityMetricsResponse:
    rows, token = _list_window_metrics(ctx, request.monitor, QUALITY, request)
    return rr.ListQualityMetricsResponse(windows=[pb.QualityWindowMetrics.FromString(r.metrics_proto) for r in rows], next_page_token=token)


def list_operational_metrics(ctx: Context, request: rr.ListOperationalMetricsRequest) -> rr.ListOperationalMetricsResponse:
    rows, token = _list_window_metrics(ctx, request.monitor, OPERATIONAL, request)
    return rr.ListOperationalMetricsResponse(
        windows=[pb.OperationalWindowMetrics.FromString(r.metrics_proto) for r in rows], next_page_token=token
    )


def render_drift_report(ctx: Context, name: str) -> Iterator[rr.RenderDriftReportResponse]:
    report = get_drift_report(ctx, name)
    window = report.window
    page = report_html.ReportPage(
        title=f"Drift report — {report.model_version}",
        model_version=report.model_version,
        reference_profile=report.reference_profile,
        window_start=m.from_timestamp(window.start_time, "window.start_time") if window.HasField("start_time") else None,
        window_end=m.from_timestamp(window.end_time, "window.end_time") if window.HasField("end_time") else None,
        row_count=window.row_count,
        drift_share=report.drift_share,
        drift_share_threshold=report.drift_share_threshold,
        dataset_drift=report.dataset_drift,
        drifted_count=report.drifted_feature_count,
        tested_count=report.tested_feature_count,
        created=m.from_timestamp(report.create_time, "create_time") if report.HasField("create_time") else None,
        feature_drifts=[m.column_drift_of(c) for c in report.feature_drifts],
        prediction_drifts=[m.column_drift_of(c) for c in report.prediction_drifts],
    )
    data = report_html.render(page).encode("utf-8")
    for offset in range(0, max(1, len(data)), CHUNK_BYTES):
        chunk = rr.RenderDriftReportResponse(data=data[offset : offset + CHUNK_BYTES])
        if offset == 0:
            chunk.content_type = "text/html; charset=utf-8"
        yield chunk
