"""Domain model of an experiment: its design, its validation and its lifecycle.

Pure Python: no gRPC, no SQLAlchemy. The servicer converts protobuf to these types
(`convert.py`), the store persists them (`store.py`); everything that decides whether a
design is valid or a lifecycle change is allowed lives here.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument

TOTAL_BPS = 10_000
"""Basis points in 100%; also the number of hash buckets."""

EXPERIMENT_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
VARIANT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
METRIC_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

DEFAULT_ALPHA = 0.05
DEFAULT_SRM_THRESHOLD = 0.001
DEFAULT_PRE_PERIOD = dt.timedelta(days=14)
DEFAULT_GUARDRAIL_CHECK_INTERVAL = dt.timedelta(minutes=5)


class ExperimentState(enum.StrEnum):
    DRAFT = "DRAFT"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    CONCLUDED = "CONCLUDED"


class HashAlgorithm(enum.StrEnum):
    SHA256 = "SHA256"
    FNV1A_32 = "FNV1A_32"


class ConditionOperator(enum.StrEnum):
    EQUALS = "EQUALS"
    NOT_EQUALS = "NOT_EQUALS"
    IN = "IN"
    NOT_IN = "NOT_IN"
    GREATER_THAN = "GREATER_THAN"
    GREATER_OR_EQUAL = "GREATER_OR_EQUAL"
    LESS_THAN = "LESS_THAN"
    LESS_OR_EQUAL = "LESS_OR_EQUAL"
    EXISTS = "EXISTS"
    MATCHES_REGEX = "MATCHES_REGEX"


class MetricType(enum.StrEnum):
    BINARY = "BINARY"
    CONTINUOUS = "CONTINUOUS"
    COUNT = "COUNT"


class MetricRole(enum.StrEnum):
    PRIMARY = "PRIMARY"
    SECONDARY = "SECONDARY"
    GUARDRAIL = "GUARDRAIL"


class ImprovementDirection(enum.StrEnum):
    INCREASE = "INCREASE"
    DECREASE = "DECREASE"


class UnitAggregation(enum.StrEnum):
    SUM = "SUM"
    MEAN = "MEAN"
    COUNT = "COUNT"
    ANY = "ANY"
    MAX = "MAX"


class GuardrailAction(enum.StrEnum):
    STOP = "STOP"
    WARN = "WARN"


class StopCause(enum.StrEnum):
    USER = "USER"
    GUARDRAIL = "GUARDRAIL"
    SAMPLE_RATIO_MISMATCH = "SAMPLE_RATIO_MISMATCH"


class Alternative(enum.StrEnum):
    TWO_SIDED = "TWO_SIDED"
    GREATER = "GREATER"
    LESS = "LESS"


class Correction(enum.StrEnum):
    NONE = "NONE"
    HOLM = "HOLM"
    BENJAMINI_HOCHBERG = "BENJAMINI_HOCHBERG"


class SequentialMethod(enum.StrEnum):
    ASYMPTOTIC_CONFIDENCE_SEQUENCE = "ASYMPTOTIC_CONFIDENCE_SEQUENCE"
    MIXTURE_SPRT = "MIXTURE_SPRT"


class EventKind(enum.StrEnum):
    EXPOSURE = "EXPOSURE"
    OUTCOME = "OUTCOME"


# Aggregations that make sense per metric type; the first is the default.
ALLOWED_AGGREGATIONS: dict[MetricType, tuple[UnitAggregation, ...]] = {
    MetricType.BINARY: (UnitAggregation.ANY, UnitAggregation.MAX),
    MetricType.CONTINUOUS: (UnitAggregation.SUM, UnitAggregation.MEAN, UnitAggregation.MAX, UnitAggregation.COUNT),
    MetricType.COUNT: (UnitAggregation.COUNT, UnitAggregation.SUM),
}

AttributeScalar = str | int | float | bool


# -- design ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    variant_id: str
    display_name: str = ""
    description: str = ""
    control: bool = False
    weight_bps: int = 0
    model_version: str | None = None
    deployment: str | None = None


@dataclass(frozen=True)
class BucketRange:
    """Half-open range [start, end) of hash buckets owned by a variant."""

    variant_id: str
    start: int
    end: int

    @property
    def width(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Hashing:
    unit_attribute: str
    salt: str
    algorithm: HashAlgorithm = HashAlgorithm.SHA256


@dataclass(frozen=True)
class AttributeCondition:
    attribute: str
    operator: ConditionOperator
    values: tuple[AttributeScalar, ...] = ()


@dataclass(frozen=True)
class TargetingClause:
    all_of: tuple[AttributeCondition, ...]


@dataclass(frozen=True)
class Targeting:
    any_of: tuple[TargetingClause, ...] = ()


@dataclass(frozen=True)
class MetricDefinition:
    metric_id: str
    type: MetricType
    role: MetricRole
    display_name: str = ""
    direction: ImprovementDirection = ImprovementDirection.INCREASE
    aggregation: UnitAggregation | None = None
    conversion_window: dt.timedelta | None = None

    @property
    def unit_aggregation(self) -> UnitAggregation:
        return self.aggregation or ALLOWED_AGGREGATIONS[self.type][0]


@dataclass(frozen=True)
class Guardrail:
    metric_id: str
    max_relative_degradation: float = 0.0
    alpha: float = 0.0
    min_units_per_variant: int = 0
    action: GuardrailAction = GuardrailAction.STOP
    check_interval: dt.timedelta | None = None


@dataclass(frozen=True)
class CupedSettings:
    enabled: bool = False
    pre_period: dt.timedelta | None = None
    covariate_metric_id: str = ""

    @property
    def effective_pre_period(self) -> dt.timedelta:
        return self.pre_period or DEFAULT_PRE_PERIOD


@dataclass(frozen=True)
class SequentialSettings:
    enabled: bool = False
    method: SequentialMethod = SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE
    tuning_units: int = 0


@dataclass(frozen=True)
class AnalysisSettings:
    alpha: float = 0.0
    alternative: Alternative = Alternative.TWO_SIDED
    correction: Correction = Correction.NONE
    cuped: CupedSettings = field(default_factory=CupedSettings)
    sequential: SequentialSettings = field(default_factory=SequentialSettings)
    srm_p_value_threshold: float = 0.0
    stop_on_srm: bool = False

    @property
    def effective_alpha(self) -> float:
        return self.alpha or DEFAULT_ALPHA

    @property
    def effective_srm_threshold(self) -> float:
        return self.srm_p_value_threshold or DEFAULT_SRM_THRESHOLD


@dataclass(frozen=True)
class StopReason:
    cause: StopCause
    message: str = ""
    guardrail_metric_id: str = ""
    guardrail_variant_id: str = ""


@dataclass(frozen=True)
class Conclusion:
    winning_variant_id: str = ""
    summary: str = ""
    analysis: str = ""


@dataclass(frozen=True)
class StateTransition:
    from_state: ExperimentState | None
    to_state: ExperimentState
    reason: str
    actor: str
    time: dt.datetime


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    variants: tuple[Variant, ...]
    coverage_bps: int
    hashing: Hashing
    metrics: tuple[MetricDefinition, ...]
    residency_region: str
    display_name: str = ""
    description: str = ""
    hypothesis: str = ""
    state: ExperimentState = ExperimentState.DRAFT
    bucket_ranges: tuple[BucketRange, ...] = ()
    targeting: Targeting = field(default_factory=Targeting)
    guardrails: tuple[Guardrail, ...] = ()
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    config_revision: int = 1
    start_time: dt.datetime | None = None
    stop_time: dt.datetime | None = None
    stop_reason: StopReason | None = None
    conclusion: Conclusion | None = None
    state_history: tuple[StateTransition, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    created_by: str = ""
    created_at: dt.datetime | None = None
    updated_by: str = ""
    updated_at: dt.datetime | None = None
    etag: str = ""

    @property
    def name(self) -> str:
        return experiment_name(self.experiment_id)

    @property
    def control(self) -> Variant:
        return next(v for v in self.variants if v.control)

    def variant(self, variant_id: str) -> Variant | None:
        return next((v for v in self.variants if v.variant_id == variant_id), None)

    def metric(self, metric_id: str) -> MetricDefinition | None:
        return next((m for m in self.metrics if m.metric_id == metric_id), None)

    @property
    def weights(self) -> dict[str, int]:
        return {v.variant_id: v.weight_bps for v in self.variants}


# -- names -----------------------------------------------------------------------------


def experiment_name(experiment_id: str) -> str:
    return f"experiments/{experiment_id}"


def parse_experiment_name(name: str, field_name: str = "name") -> str:
    """The id in `experiments/{id}`; INVALID_ARGUMENT for anything else."""
    prefix, _, experiment_id = name.partition("/")
    if prefix != "experiments" or not EXPERIMENT_ID_PATTERN.match(experiment_id):
        raise InvalidArgument(
            f"{field_name} must look like 'experiments/{{experiment_id}}', got {name!r}",
            reason="INVALID_EXPERIMENT_NAME",
            metadata={"field": field_name},
        )
    return experiment_id


def analysis_name(experiment_id: str, analysis_id: str) -> str:
    return f"experiments/{experiment_id}/analyses/{analysis_id}"


def parse_analysis_name(name: str) -> tuple[str, str]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "experiments" or parts[2] != "analyses" or not parts[3] or not EXPERIMENT_ID_PATTERN.match(parts[1]):
        raise InvalidArgument(
            f"name must look like 'experiments/{{experiment_id}}/analyses/{{analysis_id}}', got {name!r}",
            reason="INVALID_ANALYSIS_NAME",
        )
    return parts[1], parts[3]


def validate_experiment_id(experiment_id: str) -> None:
    if not EXPERIMENT_ID_PATTERN.match(experiment_id):
        raise InvalidArgument(
            f"experiment_id {experiment_id!r} must be 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit",
            reason="INVALID_EXPERIMENT_ID",
        )


# -- validation ------------------------------------------------------------------------


def _invalid(message: str, reason: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata=metadata)


def _check_duration(value: dt.timedelta | None, what: str) -> None:
    if value is not None and value < dt.timedelta(0):
        raise _invalid(f"{what} must not be negative", "NEGATIVE_DURATION", field=what)


def _check_probability(value: float, what: str, *, upper_inclusive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or value > 1 or (value == 1 and not upper_inclusive):
        raise _invalid(f"{what} must be in [0, 1), got {value}", "INVALID_PROBABILITY", field=what)


def validate_variants(variants: Iterable[Variant]) -> None:
    variants = tuple(variants)
    if len(variants) < 2:
        raise _invalid("an experiment needs at least two variants (a control and a treatment)", "TOO_FEW_VARIANTS")
    seen: set[str] = set()
    for variant in variants:
        if not VARIANT_ID_PATTERN.match(variant.variant_id):
            raise _invalid(f"variant_id {variant.variant_id!r} must be 1-128 letters, digits, '_', '.' or '-'", "INVALID_VARIANT_ID")
        if variant.variant_id in seen:
            raise _invalid(f"variant_id {variant.variant_id!r} is used twice", "DUPLICATE_VARIANT", variant_id=variant.variant_id)
        seen.add(variant.variant_id)
        if bool(variant.model_version) == bool(variant.deployment):
            raise _invalid(
                f"variant {variant.variant_id!r} must be bound to exactly one of model_version or deployment",
                "VARIANT_BINDING_REQUIRED",
                variant_id=variant.variant_id,
            )
    controls = [v.variant_id for v in variants if v.control]
    if len(controls) != 1:
        raise _invalid(f"exactly one variant must be the control, found {len(controls)}", "CONTROL_REQUIRED")


def validate_allocation(variants: Iterable[Variant], coverage_bps: int) -> None:
    variants = tuple(variants)
    if not 1 <= coverage_bps <= TOTAL_BPS:
        raise _invalid(f"coverage_bps must be between 1 and {TOTAL_BPS}, got {coverage_bps}", "INVALID_COVERAGE")
    for variant in variants:
        if variant.weight_bps < 0:
            raise _invalid(f"weight of variant {variant.variant_id!r} is negative", "INVALID_WEIGHT", variant_id=variant.variant_id)
    total = sum(v.weight_bps for v in variants)
    if total != TOTAL_BPS:
        raise _invalid(
            f"variant weights must sum to {TOTAL_BPS} basis points (100%), they sum to {total} ({total / 100:g}%)",
            "ALLOCATION_NOT_100_PERCENT",
            weight_sum_bps=str(total),
        )


def validate_targeting(targeting: Targeting) -> None:
    for clause in targeting.any_of:
        if not clause.all_of:
            raise _invalid("a targeting clause needs at least one condition", "EMPTY_TARGETING_CLAUSE")
        for condition in clause.all_of:
            if not condition.attribute:
                raise _invalid("a targeting condition needs an attribute", "INVALID_TARGETING")
            operator = condition.operator
            count = len(condition.values)
            if operator is ConditionOperator.EXISTS and count:
                raise _invalid(f"EXISTS on {condition.attribute!r} takes no values", "INVALID_TARGETING")
            if operator in (ConditionOperator.IN, ConditionOperator.NOT_IN) and count == 0:
                raise _invalid(f"{operator} on {condition.attribute!r} needs at least one value", "INVALID_TARGETING")
            if operator not in (ConditionOperator.EXISTS, ConditionOperator.IN, ConditionOperator.NOT_IN) and count != 1:
                raise _invalid(f"{operator} on {condition.attribute!r} needs exactly one value", "INVALID_TARGETING")
            if operator is ConditionOperator.MATCHES_REGEX:
                pattern = condition.values[0]
                if not isinstance(pattern, str):
                    raise _invalid(f"MATCHES_REGEX on {condition.attribute!r} needs a string pattern", "INVALID_TARGETING")
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise _invalid(f"regular expression {pattern!r} does not compile: {error}", "INVALID_TARGETING") from None


def validate_metrics(metrics: Iterable[MetricDefinition]) -> None:
    metrics = tuple(metrics)
    if not metrics:
        raise _invalid("an experiment needs at least one metric", "METRIC_REQUIRED")
    seen: set[str] = set()
    for metric in metrics:
        if not METRIC_ID_PATTERN.match(metric.metric_id):
            raise _invalid(f"metric_id {metric.metric_id!r} must be 1-128 letters, digits, '_', '.', ':' or '-'", "INVALID_METRIC_ID")
        if metric.metric_id in seen:
            raise _invalid(f"metric_id {metric.metric_id!r} is used twice", "DUPLICATE_METRIC", metric_id=metric.metric_id)
        seen.add(metric.metric_id)
        if metric.aggregation is not None and metric.aggregation not in ALLOWED_AGGREGATIONS[metric.type]:
            allowed = ", ".join(ALLOWED_AGGREGATIONS[metric.type])
            raise _invalid(
                f"metric {metric.metric_id!r} of type {metric.type} cannot aggregate by {metric.aggregation}; use one of {allowed}",
                "INVALID_AGGREGATION",
                metric_id=metric.metric_id,
            )
        _check_duration(metric.conversion_window, f"conversion_window of {metric.metric_id}")


def validate_guardrails(guardrails: Iterable[Guardrail], metrics: Iterable[MetricDefinition]) -> None:
    metric_ids = {m.metric_id for m in metrics}
    seen: set[str] = set()
    for guardrail in guardrails:
        if guardrail.metric_id not in metric_ids:
            raise _invalid(
                f"guardrail metric {guardrail.metric_id!r} is not a metric of the experiment",
                "UNKNOWN_METRIC",
                metric_id=guardrail.metric_id,
            )
        if guardrail.metric_id in seen:
            raise _invalid(f"metric {guardrail.metric_id!r} has two guardrails", "DUPLICATE_GUARDRAIL", metric_id=guardrail.metric_id)
        seen.add(guardrail.metric_id)
        if not math.isfinite(guardrail.max_relative_degradation) or guardrail.max_relative_degradation < 0:
            raise _invalid("max_relative_degradation must be a non-negative number", "INVALID_GUARDRAIL", metric_id=guardrail.metric_id)
        _check_probability(guardrail.alpha, f"alpha of guardrail {guardrail.metric_id}")
        if guardrail.min_units_per_variant < 0:
            raise _invalid("min_units_per_variant must not be negative", "INVALID_GUARDRAIL", metric_id=guardrail.metric_id)
        _check_duration(guardrail.check_interval, f"check_interval of guardrail {guardrail.metric_id}")


def validate_analysis(settings: AnalysisSettings, metrics: Iterable[MetricDefinition]) -> None:
    _check_probability(settings.alpha, "analysis alpha")
    _check_probability(settings.srm_p_value_threshold, "srm_p_value_threshold")
    _check_duration(settings.cuped.pre_period, "cuped pre_period")
    if settings.cuped.covariate_metric_id and settings.cuped.covariate_metric_id not in {m.metric_id for m in metrics}:
        raise _invalid(
            f"CUPED covariate metric {settings.cuped.covariate_metric_id!r} is not a metric of the experiment",
            "UNKNOWN_METRIC",
            metric_id=settings.cuped.covariate_metric_id,
        )
    if settings.sequential.tuning_units < 0:
        raise _invalid("sequential tuning_units must not be negative", "INVALID_SEQUENTIAL")


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.match(key) or len(value) > 256:
            raise _invalid(f"label {key!r} must be a lowercase key of up to 63 characters with a value of up to 256", "INVALID_LABEL")


def validate_design(experiment: Experiment) -> None:
    """Everything a stored experiment must satisfy, whatever its state."""
    validate_experiment_id(experiment.experiment_id)
    validate_variants(experiment.variants)
    validate_allocation(experiment.variants, experiment.coverage_bps)
    if not experiment.hashing.unit_attribute:
        raise _invalid("hashing.unit_attribute is required (for example 'user_id')", "UNIT_ATTRIBUTE_REQUIRED")
    validate_targeting(experiment.targeting)
    validate_metrics(experiment.metrics)
    validate_guardrails(experiment.guardrails, experiment.metrics)
    validate_analysis(experiment.analysis, experiment.metrics)
    validate_labels(experiment.labels)


# -- lifecycle -------------------------------------------------------------------------


def _transition(experiment: Experiment, to_state: ExperimentState, reason: str, actor: str, now: dt.datetime, **changes: Any) -> Experiment:
    history = (*experiment.state_history, StateTransition(experiment.state, to_state, reason, actor, now))
    return with_etag(
        replace(
            experiment,
            state=to_state,
            state_history=history,
            # Start and stop change what assignment answers, so caches must refresh.
            config_revision=experiment.config_revision + (1 if to_state in (ExperimentState.RUNNING, ExperimentState.STOPPED) else 0),
            updated_by=actor,
            updated_at=now,
            **changes,
        )
    )


_PAST = {"start": "started", "stop": "stopped", "conclude": "concluded", "delete": "deleted", "change": "changed"}


def _require_state(experiment: Experiment, action: str, *allowed: ExperimentState) -> None:
    if experiment.state not in allowed:
        raise FailedPrecondition(
            f"cannot {action} experiment {experiment.experiment_id!r}: it is {experiment.state}, "
            f"and only {' or '.join(allowed)} experiments can be {_PAST.get(action, action)}",
            reason="INVALID_STATE",
            metadata={"state": str(experiment.state), "action": action},
        )


def created(experiment: Experiment, actor: str, now: dt.datetime) -> Experiment:
    """A new experiment in DRAFT with its history started."""
    draft = replace(
        experiment,
        state=ExperimentState.DRAFT,
        config_revision=1,
        state_history=(StateTransition(None, ExperimentState.DRAFT, "created", actor, now),),
        created_by=actor,
        created_at=now,
        updated_by=actor,
        updated_at=now,
        start_time=None,
        stop_time=None,
        stop_reason=None,
        conclusion=None,
    )
    return with_etag(draft)


def start(experiment: Experiment, actor: str, now: dt.datetime, reason: str) -> Experiment:
    _require_state(experiment, "start", ExperimentState.DRAFT)
    return _transition(experiment, ExperimentState.RUNNING, reason or "started", actor, now, start_time=now)


def stop(experiment: Experiment, actor: str, now: dt.datetime, reason: StopReason) -> Experiment:
    _require_state(experiment, "stop", ExperimentState.RUNNING)
    words = reason.message or ("stopped by a user" if reason.cause is StopCause.USER else str(reason.cause))
    return _transition(experiment, ExperimentState.STOPPED, words, actor, now, stop_time=now, stop_reason=reason)


def conclude(experiment: Experiment, actor: str, now: dt.datetime, conclusion: Conclusion) -> Experiment:
    _require_state(experiment, "conclude", ExperimentState.STOPPED)
    if not conclusion.summary.strip():
        raise _invalid("a conclusion needs a summary of the decision and its grounds", "CONCLUSION_SUMMARY_REQUIRED")
    if conclusion.winning_variant_id and experiment.variant(conclusion.winning_variant_id) is None:
        raise _invalid(
            f"winning_variant_id {conclusion.winning_variant_id!r} is not a variant of the experiment",
            "UNKNOWN_VARIANT",
            variant_id=conclusion.winning_variant_id,
        )
    return _transition(experiment, ExperimentState.CONCLUDED, conclusion.summary, actor, now, conclusion=conclusion)


# Fields an update may change, by state (UpdateExperimentRequest's contract).
UPDATABLE_FIELDS = (
    "display_name",
    "description",
    "hypothesis",
    "variants",
    "allocation",
    "hashing",
    "targeting",
    "metrics",
    "guardrails",
    "analysis_config",
    "labels",
)
UPDATABLE_BY_STATE: dict[ExperimentState, frozenset[str]] = {
    ExperimentState.DRAFT: frozenset(UPDATABLE_FIELDS),
    ExperimentState.RUNNING: frozenset({"allocation", "guardrails", "analysis_config", "metrics", "description", "labels"}),
    ExperimentState.STOPPED: frozenset({"description", "labels"}),
    ExperimentState.CONCLUDED: frozenset({"description", "labels"}),
}
# Changing these can change an assignment, so caches must refresh.
ASSIGNMENT_FIELDS = frozenset({"variants", "allocation", "hashing", "targeting"})


def check_update_paths(experiment: Experiment, paths: Iterable[str]) -> list[str]:
    """The update mask's paths, refused when unknown or not changeable in the current state."""
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise _invalid("update_mask is required: name the fields to change", "UPDATE_MASK_REQUIRED")
    for path in paths:
        if path in ("name", "state", "residency", "config_revision", "bucket_ranges", "etag") or path not in UPDATABLE_FIELDS:
            raise _invalid(f"field {path!r} cannot be updated", "FIELD_NOT_UPDATABLE", field=path)
        if path not in UPDATABLE_BY_STATE[experiment.state]:
            raise FailedPrecondition(
                f"field {path!r} cannot change while the experiment is {experiment.state}",
                reason="FIELD_FROZEN_IN_STATE",
                metadata={"field": path, "state": str(experiment.state)},
            )
    return paths


def check_running_metric_change(before: Iterable[MetricDefinition], after: Iterable[MetricDefinition]) -> None:
    """While running, metrics may only be added: the ones analysed so far must stay as they were."""
    after_by_id = {m.metric_id: m for m in after}
    for metric in before:
        if after_by_id.get(metric.metric_id) != metric:
            raise FailedPrecondition(
                f"metric {metric.metric_id!r} cannot be removed or changed while the experiment is RUNNING; only new metrics can be added",
                reason="FIELD_FROZEN_IN_STATE",
                metadata={"field": "metrics", "metric_id": metric.metric_id},
            )


# -- etag and serialization ------------------------------------------------------------


def with_etag(experiment: Experiment) -> Experiment:
    """The experiment with its etag set to a checksum of its stored state."""
    payload = json.dumps(
        {
            "design": design_to_dict(experiment),
            "state": experiment.state,
            "revision": experiment.config_revision,
            "variants": [variant_to_dict(v) for v in experiment.variants],
            "ranges": [[r.variant_id, r.start, r.end] for r in experiment.bucket_ranges],
            "coverage": experiment.coverage_bps,
            "hashing": [experiment.hashing.unit_attribute, experiment.hashing.salt, experiment.hashing.algorithm],
            "text": [experiment.display_name, experiment.description, experiment.hypothesis],
            "labels": dict(sorted(experiment.labels.items())),
            "updated": [experiment.updated_by, experiment.updated_at.isoformat() if experiment.updated_at else ""],
            "history": len(experiment.state_history),
        },
        sort_keys=True,
        default=str,
    )
    return replace(experiment, etag=hashlib.sha256(payload.encode()).hexdigest()[:32])


def _seconds(value: dt.timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _delta(value: Any) -> dt.timedelta | None:
    return None if value is None else dt.timedelta(seconds=float(value))


def variant_to_dict(variant: Variant) -> dict[str, Any]:
    return {
        "variant_id": variant.variant_id,
        "display_name": variant.display_name,
        "description": variant.description,
        "control": variant.control,
        "weight_bps": variant.weight_bps,
        "model_version": variant.model_version,
        "deployment": variant.deployment,
    }


def design_to_dict(experiment: Experiment) -> dict[str, Any]:
    """Targeting, metrics, guardrails and analysis settings as plain JSON-able data."""
    analysis = experiment.analysis
    return {
        "targeting": [
            [[c.attribute, str(c.operator), [_typed_value(v) for v in c.values]] for c in clause.all_of]
            for clause in experiment.targeting.any_of
        ],
        "metrics": [
            {
                "metric_id": m.metric_id,
                "type": str(m.type),
                "role": str(m.role),
                "display_name": m.display_name,
                "direction": str(m.direction),
                "aggregation": str(m.aggregation) if m.aggregation else None,
                "conversion_window_s": _seconds(m.conversion_window),
            }
            for m in experiment.metrics
        ],
        "guardrails": [
            {
                "metric_id": g.metric_id,
                "max_relative_degradation": g.max_relative_degradation,
                "alpha": g.alpha,
                "min_units_per_variant": g.min_units_per_variant,
                "action": str(g.action),
                "check_interval_s": _seconds(g.check_interval),
            }
            for g in experiment.guardrails
        ],
        "analysis": analysis_to_dict(analysis),
    }


def analysis_to_dict(analysis: AnalysisSettings) -> dict[str, Any]:
    return {
        "alpha": analysis.alpha,
        "alternative": str(analysis.alternative),
        "correction": str(analysis.correction),
        "cuped": {
            "enabled": analysis.cuped.enabled,
            "pre_period_s": _seconds(analysis.cuped.pre_period),
            "covariate_metric_id": analysis.cuped.covariate_metric_id,
        },
        "sequential": {
            "enabled": analysis.sequential.enabled,
            "method": str(analysis.sequential.method),
            "tuning_units": analysis.sequential.tuning_units,
        },
        "srm_p_value_threshold": analysis.srm_p_value_threshold,
        "stop_on_srm": analysis.stop_on_srm,
    }


def _typed_value(value: AttributeScalar) -> list[Any]:
    # JSON cannot tell 1 from 1.0 from true reliably, so keep the type beside the value.
    kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float" if isinstance(value, float) else "str"
    return [kind, value]


def _untyped_value(pair: list[Any]) -> AttributeScalar:
    kind, value = pair
    converters: dict[str, Any] = {"bool": bool, "int": int, "float": float, "str": str}
    result: AttributeScalar = converters[kind](value)
    return result


@dataclass(frozen=True)
class Design:
    targeting: Targeting
    metrics: tuple[MetricDefinition, ...]
    guardrails: tuple[Guardrail, ...]
    analysis: AnalysisSettings


def analysis_from_dict(data: Mapping[str, Any]) -> AnalysisSettings:
    cuped = data.get("cuped", {})
    sequential = data.get("sequential", {})
    return AnalysisSettings(
        alpha=float(data.get("alpha", 0.0)),
        alternative=Alternative(data.get("alternative", Alternative.TWO_SIDED)),
        correction=Correction(data.get("correction", Correction.NONE)),
        cuped=CupedSettings(
            enabled=bool(cuped.get("enabled", False)),
            pre_period=_delta(cuped.get("pre_period_s")),
            covariate_metric_id=str(cuped.get("covariate_metric_id", "")),
        ),
        sequential=SequentialSettings(
            enabled=bool(sequential.get("enabled", False)),
            method=SequentialMethod(sequential.get("method", SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE)),
            tuning_units=int(sequential.get("tuning_units", 0)),
        ),
        srm_p_value_threshold=float(data.get("srm_p_value_threshold", 0.0)),
        stop_on_srm=bool(data.get("stop_on_srm", False)),
    )


def design_from_dict(data: Mapping[str, Any]) -> Design:
    return Design(
        targeting=Targeting(
            tuple(
                TargetingClause(
                    tuple(
                        AttributeCondition(attr, ConditionOperator(op), tuple(_untyped_value(v) for v in values))
                        for attr, op, values in clause
                    )
                )
                for clause in data.get("targeting", [])
            )
        ),
        metrics=tuple(
            MetricDefinition(
                metric_id=m["metric_id"],
                type=MetricType(m["type"]),
                role=MetricRole(m["role"]),
                display_name=m.get("display_name", ""),
                direction=ImprovementDirection(m.get("direction", ImprovementDirection.INCREASE)),
                aggregation=UnitAggregation(m["aggregation"]) if m.get("aggregation") else None,
                conversion_window=_delta(m.get("conversion_window_s")),
            )
            for m in data.get("metrics", [])
        ),
        guardrails=tuple(
            Guardrail(
                metric_id=g["metric_id"],
                max_relative_degradation=float(g.get("max_relative_degradation", 0.0)),
                alpha=float(g.get("alpha", 0.0)),
                min_units_per_variant=int(g.get("min_units_per_variant", 0)),
                action=GuardrailAction(g.get("action", GuardrailAction.STOP)),
                check_interval=_delta(g.get("check_interval_s")),
            )
            for g in data.get("guardrails", [])
        ),
        analysis=analysis_from_dict(data.get("analysis", {})),
    )


def history_to_list(history: Iterable[StateTransition]) -> list[dict[str, Any]]:
    return [
        {
            "from": str(t.from_state) if t.from_state else None,
            "to": str(t.to_state),
            "reason": t.reason,
            "actor": t.actor,
            "time": t.time.isoformat(),
        }
        for t in history
    ]


def history_from_list(items: Iterable[Mapping[str, Any]]) -> tuple[StateTransition, ...]:
    return tuple(
        StateTransition(
            ExperimentState(item["from"]) if item.get("from") else None,
            ExperimentState(item["to"]),
            item.get("reason", ""),
            item.get("actor", ""),
            dt.datetime.fromisoformat(item["time"]),
        )
        for item in items
    )
