"""Conversions between the monitoring contract (protobuf) and the domain, and the checks
every request's fields go through (names, ids, durations, enums).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import duration_pb2, json_format, timestamp_pb2

from falaj.common.v1 import common_pb2
from falaj.monitoring.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.runtime.validate import enum_name, timestamp_to_datetime
from falaj_platform.services.monitoring import drift, quality
from falaj_platform.services.monitoring.alerting import AlertState, Comparator
from falaj_platform.services.monitoring.profiles import ColumnRole, ColumnSpec, ColumnSummary
from falaj_platform.services.monitoring.windows import DEFAULT_COUNT_WINDOW_ROWS, DEFAULT_TIME_WINDOW, WindowKind, WindowPlan

ID_PATTERN = re.compile(r"^[a-z0-9-]{1,63}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_LOG_RETENTION = dt.timedelta(days=30)
DEFAULT_METRICS_RETENTION = dt.timedelta(days=400)

E = TypeVar("E", bound="Any")


# -- names, ids, pages ----------------------------------------------------------------------


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(f"{what} {value!r} must be 1-63 lowercase letters, digits or '-'", reason="INVALID_ID")
    return value


def parse_name(name: str, collection: str) -> str:
    """`collection/{id}` -> id; InvalidArgument for anything else."""
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not ID_PATTERN.match(name[len(prefix) :]):
        raise InvalidArgument(f"name {name!r} is not of the form {collection}/{{id}}", reason="INVALID_NAME")
    return name[len(prefix) :]


def parse_report_name(name: str) -> tuple[str, str]:
    match = re.match(r"^modelMonitors/([a-z0-9-]{1,63})/driftReports/([a-z0-9-]{1,64})$", name)
    if not match:
        raise InvalidArgument(f"name {name!r} is not of the form modelMonitors/{{id}}/driftReports/{{id}}", reason="INVALID_NAME")
    return match.group(1), match.group(2)


@dataclass(frozen=True)
class Page:
    offset: int
    size: int


def page_of(page_size: int, page_token: str, query: Mapping[str, object]) -> Page:
    """Offset paging with an opaque token bound to the query it was issued for."""
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return Page(0, size)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(page_token.encode()).decode())
        offset, digest = int(decoded["o"]), str(decoded["q"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not one this service issued", reason="INVALID_PAGE_TOKEN") from None
    if digest != _query_digest(query) or offset < 0:
        raise InvalidArgument("page_token was issued for a different query", reason="INVALID_PAGE_TOKEN")
    return Page(offset, size)


def next_token(page: Page, returned: int, has_more: bool, query: Mapping[str, object]) -> str:
    if not has_more:
        return ""
    payload = json.dumps({"o": page.offset + returned, "q": _query_digest(query)}).encode()
    return base64.urlsafe_b64encode(payload).decode()


def _query_digest(query: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- time -----------------------------------------------------------------------------------


def utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without a zone; every stored time is UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(utc(value))
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp, field: str) -> dt.datetime:
    """A request's Timestamp `field` as UTC; InvalidArgument naming it when it is not a valid Timestamp."""
    return timestamp_to_datetime(stamp, field)


def duration(value: dt.timedelta) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromTimedelta(value)
    return result


def seconds_duration(seconds: float) -> duration_pb2.Duration:
    return duration(dt.timedelta(seconds=seconds))


def positive_duration(message: Any, field: str, what: str) -> dt.timedelta | None:
    """The duration in `field` when set; InvalidArgument when set but not positive."""
    if not message.HasField(field):
        return None
    value: dt.timedelta = getattr(message, field).ToTimedelta()
    if value <= dt.timedelta(0):
        raise InvalidArgument(f"{what} must be positive", reason="INVALID_DURATION")
    return value


def audit_stamp(actor: str, when: dt.datetime) -> common_pb2.AuditStamp:
    return common_pb2.AuditStamp(actor=actor, time=timestamp(when))


# -- enums ----------------------------------------------------------------------------------


def to_domain(wrapper: Any, prefix: str, value: int, domain: type[E], field: str = "") -> E | None:
    """A proto enum value as the domain enum member of the same name; None for UNSPECIFIED."""
    if value == 0:
        return None
    return domain(enum_name(wrapper, value, field or prefix.rstrip("_").lower(), prefix=prefix))


def to_proto(wrapper: Any, prefix: str, member: Any) -> Any:
    if member is None:
        return 0
    return int(wrapper.Value(prefix + str(member.value)))


def kind_to_proto(kind: drift.ColumnKind | None) -> Any:
    return to_proto(pb.ColumnType, "COLUMN_TYPE_", kind)


def method_to_proto(method: drift.Method) -> Any:
    return to_proto(pb.DriftMethod, "DRIFT_METHOD_", method)


def method_of(value: int) -> drift.Method | None:
    return to_domain(pb.DriftMethod, "DRIFT_METHOD_", value, drift.Method)


def metric_of(value: int) -> quality.Metric | None:
    return to_domain(pb.QualityMetric, "QUALITY_METRIC_", value, quality.Metric)


def metric_to_proto(metric: quality.Metric) -> Any:
    return to_proto(pb.QualityMetric, "QUALITY_METRIC_", metric)


def alert_state_to_proto(state: str) -> Any:
    return to_proto(pb.AlertState, "ALERT_STATE_", AlertState(state))


# -- column specs and profiles --------------------------------------------------------------


def specs_from_proto(columns: Sequence[pb.ColumnSpec]) -> list[ColumnSpec]:
    specs = []
    seen = set()
    for column in columns:
        if not column.name:
            raise InvalidArgument("every column spec needs a name", reason="INVALID_COLUMN_SPEC")
        if column.name in seen:
            raise InvalidArgument(f"column {column.name!r} is listed twice", reason="INVALID_COLUMN_SPEC")
        seen.add(column.name)
        role = to_domain(pb.ColumnRole, "COLUMN_ROLE_", column.role, ColumnRole) or ColumnRole.FEATURE
        specs.append(ColumnSpec(column.name, to_domain(pb.ColumnType, "COLUMN_TYPE_", column.type, drift.ColumnKind), role))
    return specs


def specs_to_json(specs: Sequence[ColumnSpec]) -> str:
    return json.dumps([{"name": s.name, "kind": s.kind.value if s.kind else None, "role": s.role.value} for s in specs])


def specs_from_json(text: str) -> list[ColumnSpec]:
    return [
        ColumnSpec(item["name"], drift.ColumnKind(item["kind"]) if item["kind"] else None, ColumnRole(item["role"]))
        for item in json.loads(text or "[]")
    ]


def spec_to_proto(spec: ColumnSpec) -> pb.ColumnSpec:
    return pb.ColumnSpec(name=spec.name, type=kind_to_proto(spec.kind), role=to_proto(pb.ColumnRole, "COLUMN_ROLE_", spec.role))


def histogram_to_proto(histogram: drift.Histogram | None) -> pb.Histogram | None:
    if histogram is None:
        return None
    return pb.Histogram(bin_edges=list(histogram.bin_edges), counts=list(histogram.counts))


def histogram_of(message: pb.Histogram) -> drift.Histogram | None:
    if not message.counts:
        return None
    return drift.Histogram(tuple(message.bin_edges), tuple(message.counts))


def summary_to_proto(summary: ColumnSummary) -> pb.ColumnProfile:
    return pb.ColumnProfile(
        name=summary.name,
        type=kind_to_proto(summary.kind),
        count=summary.count,
        missing_count=summary.missing_count,
        distinct_count=summary.distinct_count,
        mean=summary.mean,
        std_dev=summary.std_dev,
        min=summary.minimum,
        max=summary.maximum,
        quantiles=[pb.Quantile(probability=p, value=v) for p, v in summary.quantiles],
        histogram=histogram_to_proto(summary.histogram),
        categories=[pb.CategoryCount(value=k, count=c) for k, c in summary.categories],
    )


def messages_to_json(messages: Sequence[Any]) -> str:
    return json.dumps([json_format.MessageToDict(m) for m in messages])


def messages_from_json(text: str, message_type: type[E]) -> list[E]:
    return [json_format.ParseDict(item, message_type()) for item in json.loads(text or "[]")]


def training_metrics_from_proto(values: Sequence[pb.QualityMetricValue]) -> dict[quality.Metric, float]:
    metrics: dict[quality.Metric, float] = {}
    for value in values:
        metric = metric_of(value.metric)
        if metric is None:
            raise InvalidArgument("every training metric needs a metric", reason="INVALID_TRAINING_METRIC")
        metrics[metric] = value.value
    return metrics


def training_metrics_from_registry(metrics: Mapping[str, float]) -> dict[quality.Metric, float]:
    """Registry metrics by name (`accuracy`, `roc_auc`, `rmse` ...) that monitoring knows."""
    known = {m.value.lower(): m for m in quality.Metric} | {"auc": quality.Metric.ROC_AUC, "f1_score": quality.Metric.F1}
    return {known[name.lower()]: float(value) for name, value in metrics.items() if name.lower() in known}


def training_metrics_to_json(metrics: Mapping[quality.Metric, float]) -> str:
    return json.dumps([{"metric": m.value, "value": v} for m, v in metrics.items()])


def training_metrics_from_json(text: str) -> dict[quality.Metric, float]:
    return {quality.Metric(item["metric"]): float(item["value"]) for item in json.loads(text or "[]")}


# -- monitor settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class QualitySettings:
    task: quality.TaskType | None
    prediction_column: str
    score_column: str
    positive_class: str
    label_wait: dt.timedelta | None


@dataclass(frozen=True)
class Retention:
    prediction_logs: dt.timedelta
    metrics: dt.timedelta


def window_plan(config: pb.WindowConfig) -> WindowPlan:
    kind = to_domain(pb.WindowKind, "WINDOW_KIND_", config.kind, WindowKind) or WindowKind.TIME
    if config.row_count < 0 or config.min_row_count < 0:
        raise InvalidArgument("window row counts must not be negative", reason="INVALID_WINDOW")
    duration_value = positive_duration(config, "duration", "window.duration") or DEFAULT_TIME_WINDOW
    return WindowPlan(kind, duration_value, config.row_count or DEFAULT_COUNT_WINDOW_ROWS, config.min_row_count)


def drift_settings(config: pb.DriftConfig, specs: Sequence[ColumnSpec] = ()) -> drift.DriftSettings:
    """Domain drift settings; InvalidArgument for thresholds or methods that cannot apply."""
    kinds = {spec.name: spec.kind for spec in specs}
    numerical_method = method_of(config.numerical_method)
    categorical_method = method_of(config.categorical_method)
    try:
        if numerical_method is not None:
            drift.check_method_applies(numerical_method, drift.ColumnKind.NUMERICAL)
        if categorical_method is not None:
            drift.check_method_applies(categorical_method, drift.ColumnKind.CATEGORICAL)
    except drift.DriftConfigError as error:
        raise InvalidArgument(str(error), reason="INVALID_DRIFT_METHOD") from None
    thresholds: dict[drift.Method, float] = {}
    for item in config.method_thresholds:
        method = method_of(item.method)
        if method is None or not (math.isfinite(item.threshold) and item.threshold > 0):
            raise InvalidArgument("each method threshold needs a method and a positive threshold", reason="INVALID_THRESHOLD")
        if method.is_p_value_test and item.threshold >= 1:
            raise InvalidArgument(f"the p-value threshold of {method.value} must be below 1", reason="INVALID_THRESHOLD")
        thresholds[method] = item.threshold
    column_methods: dict[str, drift.Method] = {}
    column_thresholds: dict[str, float] = {}
    for override in config.column_overrides:
        if not override.column:
            raise InvalidArgument("each column override needs a column", reason="INVALID_COLUMN_OVERRIDE")
        method = method_of(override.method)
        if method is not None:
            kind = kinds.get(override.column)
            if kind is not None:
                try:
                    drift.check_method_applies(method, kind, override.column)
                except drift.DriftConfigError as error:
                    raise InvalidArgument(str(error), reason="INVALID_DRIFT_METHOD") from None
            column_methods[override.column] = method
        if override.threshold < 0 or not math.isfinite(override.threshold):
            raise InvalidArgument(f"threshold of column {override.column!r} must be positive", reason="INVALID_THRESHOLD")
        if override.threshold:
            column_thresholds[override.column] = override.threshold
    share = config.drift_share_threshold or 0.5
    if not 0 < share <= 1:
        raise InvalidArgument("drift_share_threshold must be in (0, 1]", reason="INVALID_THRESHOLD")
    return drift.DriftSettings(numerical_method, categorical_method, thresholds, column_methods, column_thresholds, share)


def quality_settings(config: pb.QualityConfig) -> QualitySettings:
    return QualitySettings(
        task=to_domain(pb.TaskType, "TASK_TYPE_", config.task_type, quality.TaskType),
        prediction_column=config.prediction_column,
        score_column=config.score_column,
        positive_class=config.positive_class,
        label_wait=positive_duration(config, "label_wait", "quality.label_wait"),
    )


def retention(config: pb.RetentionConfig) -> Retention:
    return Retention(
        positive_duration(config, "prediction_logs", "retention.prediction_logs") or DEFAULT_LOG_RETENTION,
        positive_duration(config, "metrics", "retention.metrics") or DEFAULT_METRICS_RETENTION,
    )


MONITOR_CONFIG_FIELDS = ("window", "drift", "quality", "retention")


def monitor_config_to_json(monitor: pb.ModelMonitor) -> str:
    return json.dumps({name: json_format.MessageToDict(getattr(monitor, name)) for name in MONITOR_CONFIG_FIELDS}, sort_keys=True)


def monitor_config_from_json(text: str, monitor: pb.ModelMonitor) -> None:
    data = json.loads(text or "{}")
    for name in MONITOR_CONFIG_FIELDS:
        json_format.ParseDict(data.get(name, {}), getattr(monitor, name))


# -- drift reports --------------------------------------------------------------------------


def column_drift_to_proto(column: drift.ColumnDrift) -> pb.ColumnDrift:
    message = pb.ColumnDrift(
        column=column.column,
        type=kind_to_proto(column.kind),
        method=method_to_proto(column.method),
        statistic=column.statistic,
        threshold=column.threshold,
        drifted=column.drifted,
        reference_count=column.reference_count,
        current_count=column.current_count,
        current_missing_count=column.current_missing_count,
        reference_histogram=histogram_to_proto(column.reference_histogram),
        current_histogram=histogram_to_proto(column.current_histogram),
        reference_categories=[pb.CategoryCount(value=k, count=c) for k, c in column.reference_categories],
        current_categories=[pb.CategoryCount(value=k, count=c) for k, c in column.current_categories],
    )
    if column.p_value is not None:
        message.p_value = column.p_value
    return message


def column_drift_of(message: pb.ColumnDrift) -> drift.ColumnDrift:
    kind = to_domain(pb.ColumnType, "COLUMN_TYPE_", message.type, drift.ColumnKind) or drift.ColumnKind.NUMERICAL
    return drift.ColumnDrift(
        column=message.column,
        kind=kind,
        method=method_of(message.method) or drift.Method.PSI,
        statistic=message.statistic,
        p_value=message.p_value if message.HasField("p_value") else None,
        threshold=message.threshold,
        drifted=message.drifted,
        tested=not math.isnan(message.statistic),
        reference_count=message.reference_count,
        current_count=message.current_count,
        current_missing_count=message.current_missing_count,
        reference_histogram=histogram_of(message.reference_histogram),
        current_histogram=histogram_of(message.current_histogram),
        reference_categories=tuple((c.value, c.count) for c in message.reference_categories),
        current_categories=tuple((c.value, c.count) for c in message.current_categories),
    )


# -- alert rules ----------------------------------------------------------------------------

COMPARATORS = {to_proto(pb.Comparator, "COMPARATOR_", c): c for c in Comparator}


def comparator_of(value: int) -> Comparator:
    comparator = COMPARATORS.get(value)
    if comparator is None:
        raise InvalidArgument("rule needs a comparator", reason="INVALID_COMPARATOR")
    return comparator
