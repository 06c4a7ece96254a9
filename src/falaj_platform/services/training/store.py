"""SQLAlchemy store of the training service: training jobs and the model registry.

Registered models own their versions, aliases and promotion requests. Nested proto
parts that are only ever read whole (job spec, evaluation, lineage, signature) are kept
as JSON text; what is filtered, joined or checked is a column. The store knows nothing
of protobuf: it takes and returns plain records and JSON strings.

Writes take the caller's session, so a write, its idempotency record and its audit
report commit or roll back together.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from falaj_platform.runtime.db import Database, request_log_columns
from falaj_platform.runtime.validate import int64
from falaj_platform.services.training.artifacts import StoredArtifact

metadata = sa.MetaData()

training_jobs = sa.Table(
    "training_jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("phase", sa.String(32), nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False),
    # Registered model the spec registers into; the job's result lands there.
    sa.Column("target_model", sa.String(128), nullable=True),
    # Filled as the job runs: progress, failure, data summary, evaluation, gate, export,
    # environment and workers.
    sa.Column("status_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_training_jobs_state_created_at", "state", "created_at"),
    sa.Index("ix_training_jobs_request_id", "request_id", unique=True),
)

registered_models = sa.Table(
    "registered_models",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("latest_version_number", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model", sa.String(128), sa.ForeignKey("registered_models.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("version_number", sa.BigInteger, primary_key=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("training_job", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="SET NULL"), nullable=True, index=True),
    sa.Column("signature_json", sa.Text, nullable=False),
    sa.Column("metrics_json", sa.Text, nullable=False, server_default="{}"),
    # Evaluation, gate result and ONNX export with parity, for trained versions.
    sa.Column("results_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("lineage_json", sa.Text, nullable=False),
    # The encrypted artifact; the wrapped data key never leaves the service.
    sa.Column("artifact_format", sa.String(32), nullable=False),
    sa.Column("artifact_path", sa.Text, nullable=False),
    sa.Column("artifact_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("encryption_algorithm", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(128), nullable=False),
    sa.Column("wrapped_data_key", sa.LargeBinary, nullable=False),
    sa.Column("chunk_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("chunk_count", sa.BigInteger, nullable=False),
    sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("trained_by", sa.String(256), nullable=False),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# An alias names exactly one version of its model. The version key is NO ACTION (checked
# at the end of the statement), so an aliased version cannot be deleted on its own while
# deleting the whole model still cascades through versions and aliases together.
model_aliases = sa.Table(
    "model_aliases",
    metadata,
    sa.Column("model", sa.String(128), sa.ForeignKey("registered_models.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("version_number", sa.BigInteger, nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["model", "version_number"],
        ["model_versions.model", "model_versions.version_number"],
        name="fk_model_aliases_version",
    ),
    sa.Index("ix_model_aliases_model_version_number", "model", "version_number"),
)

# Requests to move a protected alias, approved by someone other than the trainer.
promotion_requests = sa.Table(
    "promotion_requests",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(128), sa.ForeignKey("registered_models.name", ondelete="CASCADE"), nullable=False),
    sa.Column("version_number", sa.BigInteger, nullable=False),
    sa.Column("alias", sa.String(128), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("justification", sa.Text, nullable=False, server_default=""),
    sa.Column("previous_version_number", sa.BigInteger, nullable=True),
    sa.Column("gate_result_json", sa.Text, nullable=True),
    sa.Column("trained_by", sa.String(256), nullable=False),
    sa.Column("requested_by", sa.String(256), nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_by", sa.String(256), nullable=True),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("decision_comment", sa.Text, nullable=False, server_default=""),
    sa.Column("gate_overridden", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.ForeignKeyConstraint(
        ["model", "version_number"],
        ["model_versions.model", "model_versions.version_number"],
        name="fk_promotion_requests_version",
        ondelete="CASCADE",
    ),
    sa.Index("ix_promotion_requests_model_state", "model", "state"),
    sa.Index("ix_promotion_requests_model_version_number", "model", "version_number"),
)

# Progress reports of a job, in order; streams replay them by sequence.
training_job_progress = sa.Table(
    "training_job_progress",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("progress_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# Which service process runs a job; renewed while it runs. A lease not renewed within
# the stale limit means the process died: the job is marked failed (worker lost).
training_job_leases = sa.Table(
    "training_job_leases",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("runner_id", sa.String(64), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


FINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _utc_or_none(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else _utc(value)


def _changed(result: Any) -> bool:
    """Whether an UPDATE or DELETE touched a row."""
    return bool(getattr(result, "rowcount", 0))


def _tags(raw: str | None) -> dict[str, str]:
    return dict(json.loads(raw or "{}"))


def _has_tags(tags: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(tags.get(key) == value for key, value in wanted.items())


# -- records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    id: str
    display_name: str
    spec_json: str
    state: str
    phase: str
    residency_region: str
    target_model: str | None
    status_json: str
    labels: dict[str, str]
    request_id: str | None
    created_by: str
    created_at: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES


@dataclass(frozen=True)
class RegisteredModelRecord:
    name: str
    display_name: str
    description: str
    owner: str
    residency_region: str
    task: str
    tags: dict[str, str]
    latest_version_number: int
    etag: str
    created_by: str
    created_at: dt.datetime
    updated_by: str
    updated_at: dt.datetime
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersionRecord:
    model: str
    version_number: int
    source: str
    state: str
    residency_region: str
    training_job: str | None
    signature_json: str
    metrics: dict[str, float]
    results_json: str
    lineage_json: str
    artifact_format: str
    artifact: StoredArtifact
    tags: dict[str, str]
    description: str
    trained_by: str
    etag: str
    created_by: str
    created_at: dt.datetime
    updated_by: str
    updated_at: dt.datetime
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromotionRecord:
    id: str
    model: str
    version_number: int
    alias: str
    state: str
    justification: str
    previous_version_number: int | None
    gate_result_json: str | None
    trained_by: str
    requested_by: str
    requested_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    decision_comment: str
    gate_overridden: bool


def _job(row: Any) -> JobRecord:
    return JobRecord(
        id=row.id,
        display_name=row.display_name,
        spec_json=row.spec_json,
        state=row.state,
        phase=row.phase,
        residency_region=row.residency_region,
        target_model=row.target_model,
        status_json=row.status_json,
        labels=_tags(row.labels_json),
        request_id=row.request_id,
        created_by=row.created_by,
        created_at=_utc(row.created_at),
        start_time=_utc_or_none(row.start_time),
        end_time=_utc_or_none(row.end_time),
    )


def _model(row: Any, aliases: dict[str, int]) -> RegisteredModelRecord:
    return RegisteredModelRecord(
        name=row.name,
        display_name=row.display_name,
        description=row.description,
        owner=row.owner,
        residency_region=row.residency_region,
        task=row.task,
        tags=_tags(row.tags_json),
        latest_version_number=int(row.latest_version_number),
        etag=row.etag,
        created_by=row.created_by,
        created_at=_utc(row.created_at),
        updated_by=row.updated_by,
        updated_at=_utc(row.updated_at),
        aliases=aliases,
    )


def _version(row: Any, aliases: tuple[str, ...]) -> ModelVersionRecord:
    return ModelVersionRecord(
        model=row.model,
        version_number=int(row.version_number),
        source=row.source,
        state=row.state,
        residency_region=row.residency_region,
        training_job=row.training_job,
        signature_json=row.signature_json,
        metrics={k: float(v) for k, v in json.loads(row.metrics_json or "{}").items()},
        results_json=row.results_json,
        lineage_json=row.lineage_json,
        artifact_format=row.artifact_format,
        artifact=StoredArtifact(
            path=row.artifact_path,
            size_bytes=int(row.artifact_size_bytes),
            sha256=row.artifact_sha256,
            key_id=row.key_id,
            wrapped_data_key=bytes(row.wrapped_data_key),
            chunk_size_bytes=int(row.chunk_size_bytes),
            chunk_count=int(row.chunk_count),
            algorithm=row.encryption_algorithm,
        ),
        tags=_tags(row.tags_json),
        description=row.description,
        trained_by=row.trained_by,
        etag=row.etag,
        created_by=row.created_by,
        created_at=_utc(row.created_at),
        updated_by=row.updated_by,
        updated_at=_utc(row.updated_at),
        aliases=aliases,
    )


def _promotion(row: Any) -> PromotionRecord:
    return PromotionRecord(
        id=row.id,
        model=row.model,
        version_number=int(row.version_number),
        alias=row.alias,
        state=row.state,
        justification=row.justification,
        previous_version_number=None if row.previous_version_number is None else int(row.previous_version_number),
        gate_result_json=row.gate_result_json,
        trained_by=row.trained_by,
        requested_by=row.requested_by,
        requested_at=_utc(row.requested_at),
        decided_by=row.decided_by,
        decided_at=_utc_or_none(row.decided_at),
        decision_comment=row.decision_comment,
        gate_overridden=bool(row.gate_overridden),
    )


def artifact_columns(artifact: StoredArtifact) -> dict[str, Any]:
    """The model_versions columns that record an encrypted artifact."""
    return {
        "artifact_path": artifact.path,
        "artifact_size_bytes": artifact.size_bytes,
        "artifact_sha256": artifact.sha256,
        "encryption_algorithm": artifact.algorithm,
        "key_id": artifact.key_id,
        "wrapped_data_key": artifact.wrapped_data_key,
        "chunk_size_bytes": artifact.chunk_size_bytes,
        "chunk_count": artifact.chunk_count,
    }


class TrainingStore:
    """Every read and write of jobs and the model registry goes through here."""

    def __init__(self, database: Database):
        self.database = database

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction (commit on success, roll back on error, driver errors translated)."""
        with self.database.session_scope() as session:
            yield session

    def resolve_alias(self, model: str, alias: str) -> int | None:
        """Version number `alias` points at in `model`, or None when the alias is not set."""
        query = sa.select(model_aliases.c.version_number).where(model_aliases.c.model == model, model_aliases.c.alias == alias)
        with self.database.session_scope() as session:
            version = session.execute(query).scalar_one_or_none()
        return None if version is None else int(version)

    # -- training jobs --------------------------------------------------------------------
    def insert_job(self, session: Session, **values: Any) -> None:
        session.execute(training_jobs.insert().values(**values))

    def get_job(self, session: Session, job_id: str) -> JobRecord | None:
        row = session.execute(sa.select(training_jobs).where(training_jobs.c.id == job_id)).first()
        return None if row is None else _job(row)

    def list_jobs(
        self,
        session: Session,
        *,
        limit: int,
        after: tuple[dt.datetime, str] | None,
        state: str = "",
        target_model: str = "",
        created_by: str = "",
    ) -> list[JobRecord]:
        """Jobs newest first, after the (created_at, id) cursor."""
        query = sa.select(training_jobs)
        if state:
            query = query.where(training_jobs.c.state == state)
        if target_model:
            query = query.where(training_jobs.c.target_model == target_model)
        if created_by:
            query = query.where(training_jobs.c.created_by == created_by)
        if after is not None:
            created_at, job_id = after
            query = query.where(
                sa.or_(
                    training_jobs.c.created_at < created_at,
                    sa.and_(training_jobs.c.created_at == created_at, training_jobs.c.id < job_id),
                )
            )
        query = query.order_by(training_jobs.c.created_at.desc(), training_jobs.c.id.desc()).limit(limit)
        return [_job(row) for row in session.execute(query)]

    def update_job(self, session: Session, job_id: str, *, only_from: Sequence[str] = (), **values: Any) -> bool:
        """Change a job; with `only_from`, only when its state is one of those. True when changed."""
        statement = training_jobs.update().where(training_jobs.c.id == job_id)
        if only_from:
            statement = statement.where(training_jobs.c.state.in_(only_from))
        return _changed(session.execute(statement.values(**values)))

    def queued_job_ids(self, session: Session) -> list[str]:
        query = sa.select(training_jobs.c.id).where(training_jobs.c.state == "QUEUED").order_by(training_jobs.c.created_at)
        return [str(job_id) for job_id in session.execute(query).scalars()]

    def claim_job(self, session: Session, job_id: str, runner_id: str, now: dt.datetime) -> bool:
        """QUEUED -> RUNNING for this runner, atomically; False when another took it or it was cancelled."""
        if not self.update_job(session, job_id, only_from=("QUEUED",), state="RUNNING", phase="PREPARING_DATA", start_time=now):
            return False
        session.execute(training_job_leases.insert().values(job_id=job_id, runner_id=runner_id, heartbeat_at=now))
        return True

    def renew_lease(self, session: Session, job_id: str, now: dt.datetime) -> None:
        session.execute(training_job_leases.update().where(training_job_leases.c.job_id == job_id).values(heartbeat_at=now))

    def release_lease(self, session: Session, job_id: str) -> None:
        session.execute(training_job_leases.delete().where(training_job_leases.c.job_id == job_id))

    def stale_job_ids(self, session: Session, older_than: dt.datetime) -> list[str]:
        """Running or cancelling jobs whose lease was not renewed since `older_than` (or has none)."""
        query = (
            sa.select(training_jobs.c.id)
            .select_from(training_jobs.outerjoin(training_job_leases, training_job_leases.c.job_id == training_jobs.c.id))
            .where(
                training_jobs.c.state.in_(("RUNNING", "CANCELLING")),
                sa.or_(training_job_leases.c.heartbeat_at.is_(None), training_job_leases.c.heartbeat_at < older_than),
            )
        )
        return [str(job_id) for job_id in session.execute(query).scalars()]

    def append_progress(self, session: Session, job_id: str, progress_json: str, now: dt.datetime, sequence: int) -> None:
        session.execute(
            training_job_progress.insert().values(job_id=job_id, sequence=sequence, progress_json=progress_json, created_at=now)
        )

    def last_progress_sequence(self, session: Session, job_id: str) -> int:
        query = sa.select(sa.func.max(training_job_progress.c.sequence)).where(training_job_progress.c.job_id == job_id)
        return int(session.execute(query).scalar_one_or_none() or 0)

    def list_progress(self, session: Session, job_id: str, after_sequence: int, limit: int = 1000) -> list[tuple[int, str]]:
        query = (
            sa.select(training_job_progress.c.sequence, training_job_progress.c.progress_json)
            .where(training_job_progress.c.job_id == job_id, training_job_progress.c.sequence > after_sequence)
            .order_by(training_job_progress.c.sequence)
            .limit(limit)
        )
        return [(int(row.sequence), str(row.progress_json)) for row in session.execute(query)]

    # -- registered models ----------------------------------------------------------------
    def _aliases(self, session: Session, model: str) -> dict[str, int]:
        query = sa.select(model_aliases.c.alias, model_aliases.c.version_number).where(model_aliases.c.model == model)
        return {str(row.alias): int(row.version_number) for row in session.execute(query)}

    def get_model(self, session: Session, name: str) -> RegisteredModelRecord | None:
        row = session.execute(sa.select(registered_models).where(registered_models.c.name == name)).first()
        return None if row is None else _model(row, self._aliases(session, name))

    def insert_model(self, session: Session, **values: Any) -> None:
        session.execute(registered_models.insert().values(**values))

    def update_model(self, session: Session, name: str, **values: Any) -> None:
        session.execute(registered_models.update().where(registered_models.c.name == name).values(**values))

    def delete_model(self, session: Session, name: str) -> list[str]:
        """Delete a model with its versions, aliases and requests; returns the artifact paths to remove."""
        paths = [str(p) for p in session.execute(sa.select(model_versions.c.artifact_path).where(model_versions.c.model == name)).scalars()]
        # Aliases reference versions without cascade; remove them first so the order of the
        # cascading deletes cannot matter.
        session.execute(model_aliases.delete().where(model_aliases.c.model == name))
        session.execute(promotion_requests.delete().where(promotion_requests.c.model == name))
        session.execute(model_versions.delete().where(model_versions.c.model == name))
        session.execute(registered_models.delete().where(registered_models.c.name == name))
        return paths

    def list_models(
        self, session: Session, *, limit: int, after_name: str, owner: str = "", region: str = "", tags: Mapping[str, str] | None = None
    ) -> list[RegisteredModelRecord]:
        """Models ordered by name, after `after_name`; tag filters apply before the limit."""
        query = sa.select(registered_models).where(registered_models.c.name > after_name).order_by(registered_models.c.name)
        if owner:
            query = query.where(registered_models.c.owner == owner)
        if region:
            query = query.where(registered_models.c.residency_region == region)
        found: list[RegisteredModelRecord] = []
        for row in session.execute(query):
            if tags and not _has_tags(_tags(row.tags_json), tags):
                continue
            found.append(_model(row, self._aliases(session, row.name)))
            if len(found) >= limit:
                break
        return found

    def next_version_number(self, session: Session, model: str) -> int:
        """Reserve the model's next version number (atomic: concurrent registrations never collide)."""
        statement = (
            registered_models.update()
            .where(registered_models.c.name == model)
            .values(latest_version_number=registered_models.c.latest_version_number + 1)
            .returning(registered_models.c.latest_version_number)
        )
        return int(session.execute(statement).scalar_one())

    # -- model versions -------------------------------------------------------------------
    def _version_aliases(self, session: Session, model: str, number: int) -> tuple[str, ...]:
        query = (
            sa.select(model_aliases.c.alias)
            .where(model_aliases.c.model == model, model_aliases.c.version_number == number)
            .order_by(model_aliases.c.alias)
        )
        return tuple(str(a) for a in session.execute(query).scalars())

    def insert_version(self, session: Session, **values: Any) -> None:
        session.execute(model_versions.insert().values(**values))

    def get_version(self, session: Session, model: str, number: int) -> ModelVersionRecord | None:
        int64(number, "version number")  # SQLite's INTEGER; a larger number overflows the query
        query = sa.select(model_versions).where(model_versions.c.model == model, model_versions.c.version_number == number)
        row = session.execute(query).first()
        return None if row is None else _version(row, self._version_aliases(session, model, number))

    def list_versions(
        self, session: Session, model: str, *, limit: int, before_number: int | None, state: str = "", tags: Mapping[str, str] | None = None
    ) -> list[ModelVersionRecord]:
        """A model's versions newest first, before the cursor."""
        query = sa.select(model_versions).where(model_versions.c.model == model).order_by(model_versions.c.version_number.desc())
        if before_number is not None:
            query = query.where(model_versions.c.version_number < before_number)
        if state:
            query = query.where(model_versions.c.state == state)
        found: list[ModelVersionRecord] = []
        for row in session.execute(query):
            if tags and not _has_tags(_tags(row.tags_json), tags):
                continue
            found.append(_version(row, self._version_aliases(session, model, int(row.version_number))))
            if len(found) >= limit:
                break
        return found

    def update_version(self, session: Session, model: str, number: int, **values: Any) -> None:
        statement = model_versions.update().where(model_versions.c.model == model, model_versions.c.version_number == number)
        session.execute(statement.values(**values))

    def delete_version(self, session: Session, model: str, number: int) -> None:
        session.execute(
            promotion_requests.delete().where(promotion_requests.c.model == model, promotion_requests.c.version_number == number)
        )
        session.execute(model_versions.delete().where(model_versions.c.model == model, model_versions.c.version_number == number))

    def count_versions(self, session: Session, model: str) -> int:
        query = sa.select(sa.func.count()).select_from(model_versions).where(model_versions.c.model == model)
        return int(session.execute(query).scalar_one())

    # -- aliases --------------------------------------------------------------------------
    def set_alias(self, session: Session, model: str, alias: str, number: int, actor: str, now: dt.datetime) -> int | None:
        """Point `alias` at version `number`; returns the version it pointed at before (None if unset)."""
        key = (model_aliases.c.model == model, model_aliases.c.alias == alias)
        previous = session.execute(sa.select(model_aliases.c.version_number).where(*key)).scalar_one_or_none()
        if previous is None:
            session.execute(
                model_aliases.insert().values(model=model, alias=alias, version_number=number, updated_by=actor, updated_at=now)
            )
        else:
            session.execute(model_aliases.update().where(*key).values(version_number=number, updated_by=actor, updated_at=now))
        return None if previous is None else int(previous)

    def delete_alias(self, session: Session, model: str, alias: str) -> bool:
        statement = model_aliases.delete().where(model_aliases.c.model == model, model_aliases.c.alias == alias)
        return _changed(session.execute(statement))

    def alias_target(self, session: Session, model: str, alias: str) -> int | None:
        query = sa.select(model_aliases.c.version_number).where(model_aliases.c.model == model, model_aliases.c.alias == alias)
        version = session.execute(query).scalar_one_or_none()
        return None if version is None else int(version)

    # -- promotion requests ---------------------------------------------------------------
    def insert_promotion(self, session: Session, **values: Any) -> None:
        session.execute(promotion_requests.insert().values(**values))

    def get_promotion(self, session: Session, model: str, request_id: str) -> PromotionRecord | None:
        query = sa.select(promotion_requests).where(promotion_requests.c.model == model, promotion_requests.c.id == request_id)
        row = session.execute(query).first()
        return None if row is None else _promotion(row)

    def update_promotion(self, session: Session, request_id: str, *, only_from: str, **values: Any) -> bool:
        statement = promotion_requests.update().where(promotion_requests.c.id == request_id, promotion_requests.c.state == only_from)
        return _changed(session.execute(statement.values(**values)))

    def list_promotions(
        self, session: Session, *, model: str, limit: int, after: tuple[dt.datetime, str] | None, state: str = ""
    ) -> list[PromotionRecord]:
        """Requests newest first; `model` empty lists across all models."""
        query = sa.select(promotion_requests)
        if model:
            query = query.where(promotion_requests.c.model == model)
        if state:
            query = query.where(promotion_requests.c.state == state)
        if after is not None:
            requested_at, request_id = after
            query = query.where(
                sa.or_(
                    promotion_requests.c.requested_at < requested_at,
                    sa.and_(promotion_requests.c.requested_at == requested_at, promotion_requests.c.id < request_id),
                )
            )
        query = query.order_by(promotion_requests.c.requested_at.desc(), promotion_requests.c.id.desc()).limit(limit)
        return [_promotion(row) for row in session.execute(query)]
