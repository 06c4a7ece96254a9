"""SQLAlchemy store of the serving service: deployments, their traffic-split revisions
(rollouts) and the model versions loaded for inference.

A deployment's live traffic split is the split of its current revision; every change
opens a new rollout row, so the history of splits and of canary promotions and
rollbacks is the rollouts table. Proto-shaped settings are kept as JSON (protobuf's
JSON mapping with field names as in the .proto), so old rows stay readable as the
contract grows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from falaj_platform.runtime.db import Database, request_log_columns

metadata = sa.MetaData()

deployments = sa.Table(
    "deployments",
    metadata,
    # The id is the OIP model name callers send.
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    sa.Column("current_revision", sa.BigInteger, nullable=False),
    # ONNX Runtime, batching and warm-up settings.
    sa.Column("runtime_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("feature_enrichment_json", sa.Text, nullable=True),
    sa.Column("prediction_log_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per traffic-split revision of a deployment.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("deployment", sa.String(128), sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("revision", sa.BigInteger, primary_key=True),
    # The TrafficSplit: single, canary or A-B strategy, plus shadows.
    sa.Column("traffic_split_json", sa.Text, nullable=False),
    sa.Column("previous_revision", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("canary_step", sa.Integer, nullable=False, server_default="0"),
    # Route metrics when the rollout ended.
    sa.Column("route_statuses_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
)

served_models = sa.Table(
    "served_models",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(256), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("runtime_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("load_start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ready_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_served_models_model_version", "model_version", unique=True),
)

# Batch prediction jobs; the runner that claimed a RUNNING job renews heartbeat_at while
# it runs, so a job whose replica died is found and failed rather than left RUNNING.
batch_prediction_jobs = sa.Table(
    "batch_prediction_jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    # The job as submitted (target, input, output, passthrough, batch size), proto JSON.
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("resolved_model_version", sa.String(256), nullable=False, server_default=""),
    sa.Column("output_dataset_version", sa.String(256), nullable=False, server_default=""),
    sa.Column("total_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("processed_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failed_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("runner_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


@dataclass(frozen=True)
class DeploymentRow:
    id: str
    display_name: str
    description: str
    model: str
    residency_region: str
    current_revision: int
    runtime_json: str
    feature_enrichment_json: str | None
    prediction_log_json: str
    state: str
    state_reason: str
    labels_json: str
    etag: str
    created_by: str
    created_at: dt.datetime
    updated_by: str
    updated_at: dt.datetime


@dataclass(frozen=True)
class RolloutRow:
    deployment: str
    revision: int
    traffic_split_json: str
    previous_revision: int
    state: str
    trigger: str
    reason: str
    canary_step: int
    route_statuses_json: str
    created_by: str
    created_at: dt.datetime
    end_time: dt.datetime | None


@dataclass(frozen=True)
class ServedModelRow:
    id: str
    model_version: str
    state: str
    state_reason: str
    runtime_json: str
    residency_region: str
    artifact_sha256: str
    created_by: str
    created_at: dt.datetime
    load_start_time: dt.datetime | None
    ready_time: dt.datetime | None


@dataclass(frozen=True)
class BatchJobRow:
    id: str
    spec_json: str
    residency_region: str
    state: str
    error_message: str
    resolved_model_version: str
    output_dataset_version: str
    total_rows: int
    processed_rows: int
    failed_rows: int
    runner_id: str
    heartbeat_at: dt.datetime | None
    created_by: str
    created_at: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _deployment(row: Any) -> DeploymentRow:
    values = dict(row._mapping)
    values["created_at"] = _utc(values["created_at"])
    values["updated_at"] = _utc(values["updated_at"])
    return DeploymentRow(**values)


def _rollout(row: Any) -> RolloutRow:
    values = dict(row._mapping)
    values["created_at"] = _utc(values["created_at"])
    values["end_time"] = _utc(values["end_time"])
    return RolloutRow(**values)


def _served(row: Any) -> ServedModelRow:
    values = dict(row._mapping)
    for name in ("created_at", "load_start_time", "ready_time"):
        values[name] = _utc(values[name])
    return ServedModelRow(**values)


def _batch_job(row: Any) -> BatchJobRow:
    values = dict(row._mapping)
    for name in ("heartbeat_at", "created_at", "start_time", "end_time"):
        values[name] = _utc(values[name])
    return BatchJobRow(**values)


class ServingStore:
    """Every read and write of deployments, rollouts, served models and batch jobs goes through here."""

    def __init__(self, database: Database):
        self.database = database

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction (commit on success, domain errors for driver errors)."""
        with self.database.session_scope() as session:
            yield session

    # -- deployments -----------------------------------------------------------------------
    def current_traffic_split_json(self, deployment_id: str) -> str | None:
        """The traffic split (JSON) of the deployment's current revision; None for an unknown deployment."""
        query = (
            sa.select(rollouts.c.traffic_split_json)
            .join(deployments, sa.and_(rollouts.c.deployment == deployments.c.id, rollouts.c.revision == deployments.c.current_revision))
            .where(deployments.c.id == deployment_id)
        )
        with self.database.session_scope() as session:
            return session.execute(query).scalar_one_or_none()

    @staticmethod
    def get_deployment(session: Session, deployment_id: str, *, for_update: bool = False) -> DeploymentRow | None:
        query = sa.select(deployments).where(deployments.c.id == deployment_id)
        if for_update:
            query = query.with_for_update()
        row = session.execute(query).first()
        return _deployment(row) if row is not None else None

    @staticmethod
    def list_deployments(
        session: Session, *, after: str = "", limit: int = 50, model: str = "", state: str = "", region: str = ""
    ) -> list[DeploymentRow]:
        query = sa.select(deployments).where(deployments.c.id > after).order_by(deployments.c.id).limit(limit)
        if model:
            query = query.where(deployments.c.model == model)
        if state:
            query = query.where(deployments.c.state == state)
        if region:
            query = query.where(deployments.c.residency_region == region)
        return [_deployment(row) for row in session.execute(query)]

    @staticmethod
    def deployment_revisions(session: Session) -> dict[str, tuple[int, str]]:
        """Every deployment's current revision and etag (what a replica compares to sync)."""
        rows = session.execute(sa.select(deployments.c.id, deployments.c.current_revision, deployments.c.etag))
        return {row.id: (int(row.current_revision), row.etag) for row in rows}

    @staticmethod
    def insert_deployment(session: Session, values: dict[str, Any]) -> None:
        session.execute(deployments.insert().values(**values))

    @staticmethod
    def update_deployment(session: Session, deployment_id: str, values: dict[str, Any], *, expected_revision: int | None = None) -> bool:
        """Change a deployment; with expected_revision, only while it is still at that revision."""
        statement = deployments.update().where(deployments.c.id == deployment_id).values(**values)
        if expected_revision is not None:
            statement = statement.where(deployments.c.current_revision == expected_revision)
        return bool(cast(Any, session.execute(statement)).rowcount)

    @staticmethod
    def delete_deployment(session: Session, deployment_id: str) -> None:
        session.execute(rollouts.delete().where(rollouts.c.deployment == deployment_id))
        session.execute(deployments.delete().where(deployments.c.id == deployment_id))

    # -- rollouts --------------------------------------------------------------------------
    @staticmethod
    def insert_rollout(session: Session, values: dict[str, Any]) -> None:
        session.execute(rollouts.insert().values(**values))

    @staticmethod
    def get_rollout(session: Session, deployment_id: str, revision: int) -> RolloutRow | None:
        row = session.execute(sa.select(rollouts).where(rollouts.c.deployment == deployment_id, rollouts.c.revision == revision)).first()
        return _rollout(row) if row is not None else None

    @staticmethod
    def list_rollouts(session: Session, deployment_id: str, *, before: int | None = None, limit: int = 50) -> list[RolloutRow]:
        query = sa.select(rollouts).where(rollouts.c.deployment == deployment_id).order_by(rollouts.c.revision.desc()).limit(limit)
        if before is not None:
            query = query.where(rollouts.c.revision < before)
        return [_rollout(row) for row in session.execute(query)]

    @staticmethod
    def update_rollout(session: Session, deployment_id: str, revision: int, values: dict[str, Any]) -> None:
        session.execute(rollouts.update().where(rollouts.c.deployment == deployment_id, rollouts.c.revision == revision).values(**values))

    @staticmethod
    def current_splits(session: Session) -> dict[str, str]:
        """Current traffic split JSON of every deployment, by deployment id."""
        query = sa.select(deployments.c.id, rollouts.c.traffic_split_json).join(
            rollouts, sa.and_(rollouts.c.deployment == deployments.c.id, rollouts.c.revision == deployments.c.current_revision)
        )
        return {row.id: row.traffic_split_json for row in session.execute(query)}

    # -- served models ---------------------------------------------------------------------
    @staticmethod
    def get_served_model(session: Session, served_id: str) -> ServedModelRow | None:
        row = session.execute(sa.select(served_models).where(served_models.c.id == served_id)).first()
        return _served(row) if row is not None else None

    @staticmethod
    def served_model_of_version(session: Session, model_version: str) -> ServedModelRow | None:
        row = session.execute(sa.select(served_models).where(served_models.c.model_version == model_version)).first()
        return _served(row) if row is not None else None

    @staticmethod
    def list_served_models(
        session: Session, *, after: str = "", limit: int = 50, model_version: str = "", state: str = ""
    ) -> list[ServedModelRow]:
        query = sa.select(served_models).where(served_models.c.id > after).order_by(served_models.c.id).limit(limit)
        if model_version:
            query = query.where(served_models.c.model_version == model_version)
        if state:
            query = query.where(served_models.c.state == state)
        return [_served(row) for row in session.execute(query)]

    @staticmethod
    def insert_served_model(session: Session, values: dict[str, Any]) -> None:
        session.execute(served_models.insert().values(**values))

    @staticmethod
    def update_served_model(session: Session, served_id: str, values: dict[str, Any]) -> None:
        session.execute(served_models.update().where(served_models.c.id == served_id).values(**values))

    # -- batch prediction jobs ---------------------------------------------------------------
    @staticmethod
    def insert_batch_job(session: Session, values: dict[str, Any]) -> None:
        session.execute(batch_prediction_jobs.insert().values(**values))

    @staticmethod
    def get_batch_job(session: Session, job_id: str) -> BatchJobRow | None:
        row = session.execute(sa.select(batch_prediction_jobs).where(batch_prediction_jobs.c.id == job_id)).first()
        return _batch_job(row) if row is not None else None

    @staticmethod
    def list_batch_jobs(
        session: Session, *, after: tuple[dt.datetime, str] | None = None, limit: int = 50, state: str = ""
    ) -> list[BatchJobRow]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        jobs = batch_prediction_jobs.c
        query = sa.select(batch_prediction_jobs).order_by(jobs.created_at.desc(), jobs.id.desc()).limit(limit)
        if after is not None:
            created_at, job_id = after
            query = query.where(sa.or_(jobs.created_at < created_at, sa.and_(jobs.created_at == created_at, jobs.id < job_id)))
        if state:
            query = query.where(jobs.state == state)
        return [_batch_job(row) for row in session.execute(query)]

    @staticmethod
    def update_batch_job(session: Session, job_id: str, values: dict[str, Any], *, only_from: tuple[str, ...] = ()) -> bool:
        """Change a job; with `only_from`, only while its state is one of those. True when changed."""
        statement = batch_prediction_jobs.update().where(batch_prediction_jobs.c.id == job_id).values(**values)
        if only_from:
            statement = statement.where(batch_prediction_jobs.c.state.in_(only_from))
        return bool(cast(Any, session.execute(statement)).rowcount)

    @staticmethod
    def queued_batch_job_ids(session: Session) -> list[str]:
        jobs = batch_prediction_jobs.c
        query = sa.select(jobs.id).where(jobs.state == "QUEUED").order_by(jobs.created_at, jobs.id)
        return [str(job_id) for job_id in session.execute(query).scalars()]

    @staticmethod
    def stale_batch_jobs(session: Session, older_than: dt.datetime) -> list[BatchJobRow]:
        """Running or cancelling jobs whose runner has not renewed its heartbeat since `older_than`."""
        jobs = batch_prediction_jobs.c
        query = sa.select(batch_prediction_jobs).where(
            jobs.state.in_(("RUNNING", "CANCELLING")), sa.or_(jobs.heartbeat_at.is_(None), jobs.heartbeat_at < older_than)
        )
        return [_batch_job(row) for row in session.execute(query)]
