"""Protobuf <-> domain conversions of the experiments contract (no gRPC, no SQL).

Enums map by name: `METRIC_TYPE_BINARY` <-> `MetricType.BINARY`. An unset proto enum
becomes the documented default or, where the contract has none, INVALID_ARGUMENT.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from falaj.common.v1 import common_pb2
from falaj.experiments.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.services.experiments import analysis as an
from falaj_platform.services.experiments.assignment import Assignment
from falaj_platform.services.experiments.model import (
    TOTAL_BPS,
    Alternative,
    AnalysisSettings,
    AttributeCondition,
    AttributeScalar,
    Conclusion,
    ConditionOperator,
    Correction,
    CupedSettings,
    EventKind,
    Experiment,
    ExperimentState,
    Guardrail,
    GuardrailAction,
    HashAlgorithm,
    Hashing,
    ImprovementDirection,
    MetricDefinition,
    MetricRole,
    MetricType,
    SequentialMethod,
    SequentialSettings,
    StopCause,
    StopReason,
    Targeting,
    TargetingClause,
    UnitAggregation,
    Variant,
)
from falaj_platform.services.experiments.statistics import Interval

E = TypeVar("E", bound=StrEnum)

_PREFIXES: dict[type[StrEnum], tuple[Any, str]] = {
    ExperimentState: (pb.ExperimentState, "EXPERIMENT_STATE_"),
    HashAlgorithm: (pb.HashAlgorithm, "HASH_ALGORITHM_"),
    ConditionOperator: (pb.ConditionOperator, "CONDITION_OPERATOR_"),
    MetricType: (pb.MetricType, "METRIC_TYPE_"),
    MetricRole: (pb.MetricRole, "METRIC_ROLE_"),
    ImprovementDirection: (pb.ImprovementDirection, "IMPROVEMENT_DIRECTION_"),
    UnitAggregation: (pb.UnitAggregation, "UNIT_AGGREGATION_"),
    GuardrailAction: (pb.GuardrailAction, "GUARDRAIL_ACTION_"),
    StopCause: (pb.StopCause, "STOP_CAUSE_"),
    Alternative: (pb.Alternative, "ALTERNATIVE_"),
    Correction: (pb.MultipleComparisonCorrection, "MULTIPLE_COMPARISON_CORRECTION_"),
    SequentialMethod: (pb.SequentialMethod, "SEQUENTIAL_METHOD_"),
    EventKind: (pb.EventKind, "EVENT_KIND_"),
}


def enum_from_proto(kind: type[E], value: int, *, default: E | None = None, field: str = "") -> E:
    """The domain member of a proto enum value; unset gives `default` or INVALID_ARGUMENT."""
    wrapper, prefix = _PREFIXES[kind]
    if value == 0:
        if default is None:
            raise InvalidArgument(f"{field or kind.__name__} must be set", reason="FIELD_REQUIRED", metadata={"field": field})
        return default
    try:
        name = wrapper.Name(value).removeprefix(prefix)
    except ValueError:
        raise InvalidArgument(
            f"{field or kind.__name__} has an unknown value {value}", reason="INVALID_ENUM", metadata={"field": field}
        ) from None
    return kind(name)


def enum_to_proto(member: StrEnum | None) -> Any:
    # Any: each proto field has its own enum ValueType; the name lookup guarantees the match.
    if member is None:
        return 0
    wrapper, prefix = _PREFIXES[type(member)]
    return int(wrapper.Value(prefix + str(member)))


def duration_from_proto(message: Any, present: bool) -> dt.timedelta | None:
    return message.ToTimedelta() if present else None


def duration_to_proto(value: dt.timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def timestamp_to_proto(value: dt.datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value.astimezone(dt.UTC))
    return message


def timestamp_from_proto(message: timestamp_pb2.Timestamp) -> dt.datetime:
    return message.ToDatetime(tzinfo=dt.UTC)


def stamp(actor: str, time: dt.datetime | None) -> common_pb2.AuditStamp:
    result = common_pb2.AuditStamp(actor=actor)
    if time is not None:
        result.time.CopyFrom(timestamp_to_proto(time))
    return result


# -- design ----------------------------------------------------------------------------


def attribute_from_proto(value: pb.AttributeValue) -> AttributeScalar:
    kind = value.WhichOneof("value")
    if kind is None:
        raise InvalidArgument("an attribute value must be set (string, int, double or bool)", reason="INVALID_ATTRIBUTE")
    result: AttributeScalar = getattr(value, kind)
    if isinstance(result, float) and not math.isfinite(result):
        raise InvalidArgument("attribute values must be finite numbers", reason="INVALID_ATTRIBUTE")
    return result


def attribute_to_proto(value: AttributeScalar) -> pb.AttributeValue:
    if isinstance(value, bool):
        return pb.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return pb.AttributeValue(int_value=value)
    if isinstance(value, float):
        return pb.AttributeValue(double_value=value)
    return pb.AttributeValue(string_value=value)


def attributes_from_proto(attributes: Mapping[str, pb.AttributeValue]) -> dict[str, AttributeScalar]:
    return {key: attribute_from_proto(value) for key, value in attributes.items()}


def targeting_from_proto(message: pb.Targeting) -> Targeting:
    return Targeting(
        tuple(
            TargetingClause(
                tuple(
                    AttributeCondition(
                        c.attribute,
                        enum_from_proto(ConditionOperator, c.operator, field="targeting condition operator"),
                        tuple(attribute_from_proto(v) for v in c.values),
                    )
                    for c in clause.all_of
                )
            )
            for clause in message.any_of
        )
    )


def targeting_to_proto(targeting: Targeting) -> pb.Targeting:
    return pb.Targeting(
        any_of=[
            pb.TargetingClause(
                all_of=[
                    pb.AttributeCondition(
                        attribute=c.attribute, operator=enum_to_proto(c.operator), values=[attribute_to_proto(v) for v in c.values]
                    )
                    for c in clause.all_of
                ]
            )
            for clause in targeting.any_of
        ]
    )


def metric_from_proto(message: pb.MetricDefinition) -> MetricDefinition:
    field = f"metric {message.metric_id!r}"
    return MetricDefinition(
        metric_id=message.metric_id,
        display_name=message.display_name,
        type=enum_from_proto(MetricType, message.type, field=f"type of {field}"),
        role=enum_from_proto(MetricRole, message.role, field=f"role of {field}"),
        direction=enum_from_proto(ImprovementDirection, message.direction, default=ImprovementDirection.INCREASE),
        aggregation=enum_from_proto(UnitAggregation, message.aggregation, default=None) if message.aggregation else None,
        conversion_window=duration_from_proto(message.conversion_window, message.HasField("conversion_window")),
    )


def metric_to_proto(metric: MetricDefinition) -> pb.MetricDefinition:
    message = pb.MetricDefinition(
        metric_id=metric.metric_id,
        display_name=metric.display_name,
        type=enum_to_proto(metric.type),
        role=enum_to_proto(metric.role),
        direction=enum_to_proto(metric.direction),
        aggregation=enum_to_proto(metric.aggregation),
    )
    if metric.conversion_window is not None:
        message.conversion_window.CopyFrom(duration_to_proto(metric.conversion_window))
    return message


def guardrail_from_proto(message: pb.Guardrail) -> Guardrail:
    return Guardrail(
        metric_id=message.metric_id,
        max_relative_degradation=message.max_relative_degradation,
        alpha=message.alpha,
        min_units_per_variant=message.min_units_per_variant,
        action=enum_from_proto(GuardrailAction, message.action, default=GuardrailAction.STOP),
        check_interval=duration_from_proto(message.check_interval, message.HasField("check_interval")),
    )


def guardrail_to_proto(guardrail: Guardrail) -> pb.Guardrail:
    message = pb.Guardrail(
        metric_id=guardrail.metric_id,
        max_relative_degradation=guardrail.max_relative_degradation,
        alpha=guardrail.alpha,
        min_units_per_variant=guardrail.min_units_per_variant,
        action=enum_to_proto(guardrail.action),
    )
    if guardrail.check_interval is not None:
        message.check_interval.CopyFrom(duration_to_proto(guardrail.check_interval))
    return message


def analysis_config_from_proto(message: pb.AnalysisConfig) -> AnalysisSettings:
    return AnalysisSettings(
        alpha=message.alpha,
        alternative=enum_from_proto(Alternative, message.alternative, default=Alternative.TWO_SIDED),
        correction=enum_from_proto(Correction, message.correction, default=Correction.NONE),
        cuped=CupedSettings(
            enabled=message.cuped.enabled,
            pre_period=duration_from_proto(message.cuped.pre_period, message.cuped.HasField("pre_period")),
            covariate_metric_id=message.cuped.covariate_metric_id,
        ),
        sequential=SequentialSettings(
            enabled=message.sequential.enabled,
            method=enum_from_proto(SequentialMethod, message.sequential.method, default=SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE),
            tuning_units=message.sequential.tuning_units,
        ),
        srm_p_value_threshold=message.srm_p_value_threshold,
        stop_on_srm=message.stop_on_srm,
    )


def analysis_config_to_proto(settings: AnalysisSettings) -> pb.AnalysisConfig:
    message = pb.AnalysisConfig(
        alpha=settings.alpha,
        alternative=enum_to_proto(settings.alternative),
        correction=enum_to_proto(settings.correction),
        cuped=pb.CupedConfig(enabled=settings.cuped.enabled, covariate_metric_id=settings.cuped.covariate_metric_id),
        sequential=pb.SequentialConfig(
            enabled=settings.sequential.enabled,
            method=enum_to_proto(settings.sequential.method),
            tuning_units=settings.sequential.tuning_units,
        ),
        srm_p_value_threshold=settings.srm_p_value_threshold,
        stop_on_srm=settings.stop_on_srm,
    )
    if settings.cuped.pre_period is not None:
        message.cuped.pre_period.CopyFrom(duration_to_proto(settings.cuped.pre_period))
    return message


def variants_from_proto(message: pb.Experiment) -> tuple[Variant, ...]:
    """The variants with their weights from the allocation (0 where the allocation leaves one out)."""
    weights: dict[str, int] = {}
    known = {v.variant_id for v in message.variants}
    for weight in message.allocation.weights:
        if weight.variant_id not in known:
            raise InvalidArgument(
                f"allocation names variant {weight.variant_id!r}, which is not a variant of the experiment",
                reason="UNKNOWN_VARIANT",
                metadata={"variant_id": weight.variant_id},
            )
        if weight.variant_id in weights:
            raise InvalidArgument(f"allocation names variant {weight.variant_id!r} twice", reason="DUPLICATE_VARIANT")
        weights[weight.variant_id] = weight.weight_bps
    return tuple(
        Variant(
            variant_id=v.variant_id,
            display_name=v.display_name,
            description=v.description,
            control=v.control,
            weight_bps=weights.get(v.variant_id, 0),
            model_version=v.model_version or None,
            deployment=v.deployment or None,
        )
        for v in message.variants
    )


def coverage_from_proto(message: pb.Allocation) -> int:
    # Coverage 0 (unset) means everyone: an experiment that admits no unit is never intended.
    return message.coverage_bps or TOTAL_BPS


def experiment_from_proto(experiment_id: str, message: pb.Experiment, region: str) -> Experiment:
    """A new experiment's design from a CreateExperiment request; output-only fields are ignored."""
    return Experiment(
        experiment_id=experiment_id,
        display_name=message.display_name,
        description=message.description,
        hypothesis=message.hypothesis,
        variants=variants_from_proto(message),
        coverage_bps=coverage_from_proto(message.allocation),
        hashing=hashing_from_proto(message.hashing, experiment_id),
        targeting=targeting_from_proto(message.targeting),
        metrics=tuple(metric_from_proto(m) for m in message.metrics),
        guardrails=tuple(guardrail_from_proto(g) for g in message.guardrails),
        analysis=analysis_config_from_proto(message.analysis_config),
        residency_region=message.residency.region or region,
        labels=dict(message.labels),
    )


def hashing_from_proto(message: pb.HashingConfig, experiment_id: str) -> Hashing:
    return Hashing(
        unit_attribute=message.unit_attribute,
        salt=message.salt or experiment_id,
        algorithm=enum_from_proto(HashAlgorithm, message.algorithm, default=HashAlgorithm.SHA256),
    )


def variant_to_proto(variant: Variant) -> pb.Variant:
    message = pb.Variant(
        variant_id=variant.variant_id, display_name=variant.display_name, description=variant.description, control=variant.control
    )
    if variant.model_version:
        message.model_version = variant.model_version
    elif variant.deployment:
        message.deployment = variant.deployment
    return message


def hashing_to_proto(hashing: Hashing) -> pb.HashingConfig:
    return pb.HashingConfig(unit_attribute=hashing.unit_attribute, salt=hashing.salt, algorithm=enum_to_proto(hashing.algorithm))


def bucket_ranges_to_proto(experiment: Experiment) -> list[pb.VariantBucketRange]:
    return [pb.VariantBucketRange(variant_id=r.variant_id, start_bucket=r.start, end_bucket=r.end) for r in experiment.bucket_ranges]


def stop_reason_to_proto(reason: StopReason) -> pb.StopReason:
    return pb.StopReason(
        cause=enum_to_proto(reason.cause),
        message=reason.message,
        guardrail_metric_id=reason.guardrail_metric_id,
        guardrail_variant_id=reason.guardrail_variant_id,
    )


def conclusion_to_proto(conclusion: Conclusion) -> pb.Conclusion:
    return pb.Conclusion(winning_variant_id=conclusion.winning_variant_id, summary=conclusion.summary, analysis=conclusion.analysis)


def experiment_to_proto(experiment: Experiment) -> pb.Experiment:
    message = pb.Experiment(
        name=experiment.name,
        display_name=experiment.display_name,
        description=experiment.description,
        hypothesis=experiment.hypothesis,
        state=enum_to_proto(experiment.state),
        variants=[variant_to_proto(v) for v in experiment.variants],
        allocation=pb.Allocation(
            coverage_bps=experiment.coverage_bps,
            weights=[pb.VariantWeight(variant_id=v.variant_id, weight_bps=v.weight_bps) for v in experiment.variants],
        ),
        hashing=hashing_to_proto(experiment.hashing),
        targeting=targeting_to_proto(experiment.targeting),
        metrics=[metric_to_proto(m) for m in experiment.metrics],
        guardrails=[guardrail_to_proto(g) for g in experiment.guardrails],
        analysis_config=analysis_config_to_proto(experiment.analysis),
        residency=common_pb2.Residency(region=experiment.residency_region),
        config_revision=experiment.config_revision,
        bucket_ranges=bucket_ranges_to_proto(experiment),
        state_history=[
            pb.StateTransition(
                from_state=enum_to_proto(t.from_state),
                to_state=enum_to_proto(t.to_state),
                reason=t.reason,
                changed=stamp(t.actor, t.time),
            )
            for t in experiment.state_history
        ],
        labels=dict(experiment.labels),
        created=stamp(experiment.created_by, experiment.created_at),
        updated=stamp(experiment.updated_by, experiment.updated_at),
        etag=experiment.etag,
    )
    if experiment.start_time:
        message.start_time.CopyFrom(timestamp_to_proto(experiment.start_time))
    if experiment.stop_time:
        message.stop_time.CopyFrom(timestamp_to_proto(experiment.stop_time))
    if experiment.stop_reason:
        message.stop_reason.CopyFrom(stop_reason_to_proto(experiment.stop_reason))
    if experiment.conclusion:
        message.conclusion.CopyFrom(conclusion_to_proto(experiment.conclusion))
    return message


def assignment_config_to_proto(experiment: Experiment) -> pb.AssignmentConfig:
    return pb.AssignmentConfig(
        experiment=experiment.name,
        config_revision=experiment.config_revision,
        state=enum_to_proto(experiment.state),
        hashing=hashing_to_proto(experiment.hashing),
        coverage_bps=experiment.coverage_bps,
        bucket_ranges=bucket_ranges_to_proto(experiment),
        targeting=targeting_to_proto(experiment.targeting),
        variants=[variant_to_proto(v) for v in experiment.variants],
    )


def assignment_to_proto(experiment_name: str, assignment: Assignment) -> pb.Assignment:
    return pb.Assignment(
        experiment=experiment_name,
        unit_id=assignment.unit_id,
        variant_id=assignment.variant.variant_id,
        in_experiment=assignment.in_experiment,
        reason=pb.AssignmentReason.Value("ASSIGNMENT_REASON_" + str(assignment.reason)),
        config_revision=assignment.config_revision,
        model_version=assignment.variant.model_version or "",
        deployment=assignment.variant.deployment or "",
    )


# -- analysis --------------------------------------------------------------------------


def estimate_to_proto(interval: Interval, confidence_level: float) -> pb.Estimate:
    return pb.Estimate(value=interval.value, ci_lower=interval.lower, ci_upper=interval.upper, confidence_level=confidence_level)


def analysis_to_proto(
    name: str, result: an.AnalysisResult, actor: str, created_at: dt.datetime, compute: dt.timedelta
) -> pb.ExperimentAnalysis:
    confidence = 1 - result.settings.effective_alpha
    srm = result.sample_ratio
    message = pb.ExperimentAnalysis(
        name=name,
        config=analysis_config_to_proto(result.settings),
        config_revision=result.config_revision,
        traffic=[
            pb.VariantTraffic(
                variant_id=t.variant_id, units=t.units, expected_fraction=t.expected_fraction, observed_fraction=t.observed_fraction
            )
            for t in result.traffic
        ],
        sample_ratio_mismatch=pb.SampleRatioMismatch(
            chi_square=srm.chi_square,
            degrees_of_freedom=srm.degrees_of_freedom,
            p_value=srm.p_value,
            p_value_threshold=srm.threshold,
            mismatch=srm.mismatch,
        ),
        metric_results=[
            pb.MetricResult(
                metric_id=m.metric.metric_id,
                type=enum_to_proto(m.metric.type),
                role=enum_to_proto(m.metric.role),
                variants=[
                    pb.VariantStatistics(
                        variant_id=v.variant_id,
                        units=v.units,
                        mean=v.mean,
                        variance=v.variance,
                        standard_error=v.standard_error,
                        cuped_adjusted_mean=v.cuped_mean,
                        cuped_adjusted_variance=v.cuped_variance,
                    )
                    for v in m.variants
                ],
                comparisons=[comparison_to_proto(c, confidence) for c in m.comparisons],
            )
            for m in result.metrics
        ],
        guardrail_results=[
            pb.GuardrailResult(
                metric_id=g.metric_id,
                variant_id=g.variant_id,
                relative_lift=estimate_to_proto(g.relative_lift, g.confidence_level),
                triggered=g.triggered,
                message=g.message,
            )
            for g in result.guardrails
        ],
        events_analysed=result.events_analysed,
        created=stamp(actor, created_at),
    )
    message.as_of_time.CopyFrom(timestamp_to_proto(result.as_of_time))
    message.compute_duration.CopyFrom(duration_to_proto(compute))
    return message


def comparison_to_proto(comparison: an.Comparison, confidence: float) -> pb.VariantComparison:
    message = pb.VariantComparison(
        variant_id=comparison.variant_id,
        control_variant_id=comparison.control_variant_id,
        absolute_lift=estimate_to_proto(comparison.absolute_lift, confidence),
        relative_lift=estimate_to_proto(comparison.relative_lift, confidence),
        test=pb.HypothesisTest(
            method=pb.TestMethod.Value("TEST_METHOD_" + comparison.test.method),
            statistic=comparison.test.statistic,
            degrees_of_freedom=comparison.test.degrees_of_freedom,
            p_value=comparison.test.p_value,
        ),
        adjusted_p_value=comparison.adjusted_p_value,
        significant=comparison.significant,
        cuped_applied=comparison.cuped_applied,
        cuped_variance_reduction=comparison.cuped_variance_reduction,
        cuped_theta=comparison.cuped_theta,
    )
    if comparison.sequential is not None:
        message.sequential.CopyFrom(
            pb.SequentialResult(
                method=enum_to_proto(comparison.sequential.method),
                p_value=comparison.sequential.p_value,
                absolute_lift=estimate_to_proto(comparison.sequential.absolute_lift, confidence),
            )
        )
    return message
