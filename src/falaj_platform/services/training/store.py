"""SQLAlchemy store of the training service: training jobs and the model registry.

Registered models own their versions, aliases and promotion requests. Nested proto
parts that are only ever read whole (job spec, evaluation, lineage, signature) are kept
as JSON text; what is filtered, joined or checked is a column.
"""

from __future__ import annotations

import sqlalchemy as sa

from falaj_platform.runtime.db import Database, request_log_columns

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

request_log = sa.Table("request_log", metadata, *request_log_columns())


class TrainingStore:
    """Every read and write of jobs and the model registry goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def resolve_alias(self, model: str, alias: str) -> int | None:
        """Version number `alias` points at in `model`, or None when the alias is not set."""
        query = sa.select(model_aliases.c.version_number).where(model_aliases.c.model == model, model_aliases.c.alias == alias)
        with self.database.session_scope() as session:
            version = session.execute(query).scalar_one_or_none()
        return None if version is None else int(version)
