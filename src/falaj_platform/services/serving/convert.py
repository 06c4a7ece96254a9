"""Stored rows <-> `falaj.serving.v1` messages, enum names, page tokens."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.runtime.validate import enum_name
from falaj_platform.services.serving.prediction_log import LogPolicy
from falaj_platform.services.serving.store import DeploymentRow, RolloutRow, ServedModelRow

M = TypeVar("M", bound=Message)


def to_json(message: Message) -> str:
    """Protobuf JSON with .proto field names (the stored form)."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None, sort_keys=True)


def from_json(text: str | None, message_type: type[M]) -> M:
    message = message_type()
    if text:
        json_format.Parse(text, message, ignore_unknown_fields=True)
    return message


def enum_value(enum: Any, prefix: str, name: str) -> Any:
    try:
        return int(enum.Value(prefix + name))
    except ValueError:
        return 0


def deployment_state(name: str) -> Any:
    return enum_value(pb.DeploymentState, "DEPLOYMENT_STATE_", name)


# Enum names are stored without their prefix: `READY` for DEPLOYMENT_STATE_READY.
def deployment_state_name(value: int, field: str = "state") -> str:
    return enum_name(pb.DeploymentState, value, field, prefix="DEPLOYMENT_STATE_")


def rollout_state_name(value: int, field: str = "state") -> str:
    return enum_name(pb.RolloutState, value, field, prefix="ROLLOUT_STATE_")


def trigger_name(value: int, field: str = "trigger") -> str:
    return enum_name(pb.RolloutTrigger, value, field, prefix="ROLLOUT_TRIGGER_")


def served_state(name: str) -> Any:
    return enum_value(pb.ServedModelState, "SERVED_MODEL_STATE_", name)


def served_state_name(value: int, field: str = "state") -> str:
    return enum_name(pb.ServedModelState, value, field, prefix="SERVED_MODEL_STATE_")


def stamp(message: Any, actor: str, when: dt.datetime | None) -> None:
    message.actor = actor
    if when is not None:
        message.time.FromDatetime(when)


def deployment_to_proto(row: DeploymentRow) -> pb.Deployment:
    deployment = pb.Deployment(
        name=f"deployments/{row.id}",
        display_name=row.display_name,
        description=row.description,
        model=row.model,
        runtime=from_json(row.runtime_json, pb.ModelRuntimeConfig),
        prediction_log=from_json(row.prediction_log_json, pb.PredictionLogConfig),
        state=deployment_state(row.state),
        state_reason=row.state_reason,
        revision=row.current_revision,
        etag=row.etag,
    )
    deployment.residency.region = row.residency_region
    if row.feature_enrichment_json:
        deployment.feature_enrichment.CopyFrom(from_json(row.feature_enrichment_json, pb.FeatureEnrichmentConfig))
    deployment.labels.update(json.loads(row.labels_json or "{}"))
    stamp(deployment.created, row.created_by, row.created_at)
    stamp(deployment.updated, row.updated_by, row.updated_at)
    return deployment


def rollout_to_proto(row: RolloutRow) -> pb.Rollout:
    rollout = pb.Rollout(
        name=f"deployments/{row.deployment}/rollouts/{row.revision}",
        revision=row.revision,
        traffic_split=from_json(row.traffic_split_json, pb.TrafficSplit),
        previous_revision=row.previous_revision,
        state=enum_value(pb.RolloutState, "ROLLOUT_STATE_", row.state),
        trigger=enum_value(pb.RolloutTrigger, "ROLLOUT_TRIGGER_", row.trigger),
        reason=row.reason,
        canary_step=row.canary_step,
    )
    for item in json.loads(row.route_statuses_json or "[]"):
        json_format.ParseDict(item, rollout.route_statuses.add(), ignore_unknown_fields=True)
    stamp(rollout.created, row.created_by, row.created_at)
    if row.end_time is not None:
        rollout.end_time.FromDatetime(row.end_time)
    return rollout


def served_model_to_proto(row: ServedModelRow) -> pb.ServedModel:
    served = pb.ServedModel(
        name=f"servedModels/{row.id}",
        model_version=row.model_version,
        state=served_state(row.state),
        state_reason=row.state_reason,
        runtime=from_json(row.runtime_json, pb.ModelRuntimeConfig),
        artifact_sha256=row.artifact_sha256,
    )
    served.residency.region = row.residency_region
    if row.load_start_time is not None:
        served.load_start_time.FromDatetime(row.load_start_time)
    if row.ready_time is not None:
        served.ready_time.FromDatetime(row.ready_time)
    stamp(served.created, row.created_by, row.created_at)
    return served


def log_policy(config: pb.PredictionLogConfig, defaults: LogPolicy) -> LogPolicy:
    if not config.enabled:
        return LogPolicy(enabled=False)
    return LogPolicy(
        enabled=True,
        sample_rate=config.sample_rate or 1.0,
        log_inputs=config.log_inputs,
        log_features=config.log_features,
        log_outputs=config.log_outputs,
        queue_capacity=config.queue_capacity or defaults.queue_capacity,
        max_batch_rows=config.max_batch_rows or defaults.max_batch_rows,
        flush_interval_s=config.flush_interval.ToTimedelta().total_seconds()
        if config.HasField("flush_interval")
        else defaults.flush_interval_s,
        subject_id_parameter=config.subject_id_parameter,
    )


# -- pages ----------------------------------------------------------------------------------


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    return min(requested or 50, 1000)


def encode_token(kind: str, value: str | int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": kind, "v": value}).encode()).decode()


def decode_token(token: str, kind: str) -> Any:
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        if decoded["k"] != kind:
            raise ValueError(kind)
        return decoded["v"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not one this list returned", reason="INVALID_PAGE_TOKEN") from None
