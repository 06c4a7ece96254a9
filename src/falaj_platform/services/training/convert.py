"""Records of the store <-> protobuf messages of the contract, and proto JSON columns."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, TypeVar

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from falaj.common.v1 import common_pb2
from falaj.training.v1 import message_pb2 as pb
from falaj_platform.services.training import names
from falaj_platform.services.training.store import JobRecord, ModelVersionRecord, PromotionRecord, RegisteredModelRecord

MessageT = TypeVar("MessageT", bound=Message)


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None, sort_keys=True)


def from_json(text: str | None, message_type: type[MessageT]) -> MessageT:
    message = message_type()
    if text:
        json_format.Parse(text, message, ignore_unknown_fields=True)
    return message


def _json_safe(value: Any) -> Any:
    """Proto JSON wants non-finite doubles as strings ("NaN", "Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def from_dict(value: dict[str, Any], message_type: type[MessageT]) -> MessageT:
    message = message_type()
    json_format.ParseDict(_json_safe(value), message)
    return message


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value.astimezone(dt.UTC))
    return message


def stamp(actor: str | None, when: dt.datetime | None) -> common_pb2.AuditStamp | None:
    if not actor or when is None:
        return None
    return common_pb2.AuditStamp(actor=actor, time=timestamp(when))


def enum_value(enum: Any, prefix: str, name: str) -> int:
    """`TASK_TYPE_` + 'REGRESSION' -> the enum number (0 when unknown)."""
    try:
        return int(enum.Value(prefix + name))
    except ValueError:
        return 0


def job_to_proto(record: JobRecord) -> pb.TrainingJob:
    job = from_json(record.status_json, pb.TrainingJob)
    job.name = names.job_name(record.id)
    job.display_name = record.display_name
    job.spec.CopyFrom(from_json(record.spec_json, pb.TrainingJobSpec))
    job.state = enum_value(pb.TrainingJobState, "TRAINING_JOB_STATE_", record.state)  # type: ignore[assignment]
    job.phase = enum_value(pb.TrainingPhase, "TRAINING_PHASE_", record.phase)  # type: ignore[assignment]
    job.residency.region = record.residency_region
    job.request_id = record.request_id or ""
    job.create_stamp.actor = record.created_by
    job.create_stamp.time.CopyFrom(timestamp(record.created_at))
    if record.start_time is not None:
        job.start_time.CopyFrom(timestamp(record.start_time))
    if record.end_time is not None:
        job.end_time.CopyFrom(timestamp(record.end_time))
    job.labels.clear()
    job.labels.update(record.labels)
    return job


def model_to_proto(record: RegisteredModelRecord) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=names.model_name(record.name),
        display_name=record.display_name,
        description=record.description,
        owner=record.owner,
        residency=common_pb2.Residency(region=record.residency_region),
        task=enum_value(pb.TaskType, "TASK_TYPE_", record.task),  # type: ignore[arg-type]
        tags=record.tags,
        aliases={alias: names.version_name(record.name, number) for alias, number in record.aliases.items()},
        latest_version_number=record.latest_version_number,
        create_stamp=stamp(record.created_by, record.created_at),
        update_stamp=stamp(record.updated_by, record.updated_at),
        etag=record.etag,
    )


def version_to_proto(record: ModelVersionRecord) -> pb.ModelVersion:
    version = from_json(record.results_json, pb.ModelVersion)  # evaluation, gate_result, export_result
    version.MergeFrom(
        pb.ModelVersion(
            name=names.version_name(record.model, record.version_number),
            version_number=record.version_number,
            source=enum_value(pb.ModelVersionSource, "MODEL_VERSION_SOURCE_", record.source),  # type: ignore[arg-type]
            state=enum_value(pb.ModelVersionState, "MODEL_VERSION_STATE_", record.state),  # type: ignore[arg-type]
            signature=from_json(record.signature_json, pb.ModelSignature),
            metrics=record.metrics,
            lineage=from_json(record.lineage_json, pb.ModelLineage),
            artifact=pb.ArtifactInfo(
                format=enum_value(pb.ArtifactFormat, "ARTIFACT_FORMAT_", record.artifact_format),  # type: ignore[arg-type]
                size_bytes=record.artifact.size_bytes,
                sha256=record.artifact.sha256,
                encryption_algorithm=enum_value(pb.EncryptionAlgorithm, "ENCRYPTION_ALGORITHM_", record.artifact.algorithm),  # type: ignore[arg-type]
                key_id=record.artifact.key_id,
                chunk_size_bytes=record.artifact.chunk_size_bytes,
                chunk_count=record.artifact.chunk_count,
                create_time=timestamp(record.created_at),
            ),
            tags=record.tags,
            aliases=list(record.aliases),
            residency=common_pb2.Residency(region=record.residency_region),
            description=record.description,
            trained_by=record.trained_by,
            create_stamp=stamp(record.created_by, record.created_at),
            update_stamp=stamp(record.updated_by, record.updated_at),
            etag=record.etag,
        )
    )
    return version


def promotion_to_proto(record: PromotionRecord) -> pb.PromotionRequest:
    return pb.PromotionRequest(
        name=names.promotion_name(record.model, record.id),
        model_version=names.version_name(record.model, record.version_number),
        alias=record.alias,
        state=enum_value(pb.PromotionRequestState, "PROMOTION_REQUEST_STATE_", record.state),  # type: ignore[arg-type]
        justification=record.justification,
        previous_model_version=(
            names.version_name(record.model, record.previous_version_number) if record.previous_version_number is not None else ""
        ),
        gate_result=from_json(record.gate_result_json, pb.PromotionGateResult) if record.gate_result_json else None,
        trained_by=record.trained_by,
        request_stamp=stamp(record.requested_by, record.requested_at),
        decision_stamp=stamp(record.decided_by, record.decided_at),
        decision_comment=record.decision_comment,
        gate_overridden=record.gate_overridden,
    )
