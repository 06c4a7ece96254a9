"""Training jobs and model registry: jobs, registered models, versions, aliases,
promotion requests, request log.

Revision ID: training_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "training_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("target_model", sa.String(128), nullable=True),
        sa.Column("status_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_training_jobs_state_created_at", "training_jobs", ["state", "created_at"])
    op.create_index("ix_training_jobs_request_id", "training_jobs", ["request_id"], unique=True)
    op.create_table(
        "registered_models",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("latest_version_number", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_registered_models_residency_region", "registered_models", ["residency_region"])
    op.create_table(
        "model_versions",
        sa.Column("model", sa.String(128), sa.ForeignKey("registered_models.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("version_number", sa.BigInteger, primary_key=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("training_job", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("signature_json", sa.Text, nullable=False),
        sa.Column("metrics_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("results_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("lineage_json", sa.Text, nullable=False),
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
    op.create_index("ix_model_versions_training_job", "model_versions", ["training_job"])
    op.create_table(
        "model_aliases",
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
    )
    op.create_index("ix_model_aliases_model_version_number", "model_aliases", ["model", "version_number"])
    op.create_table(
        "promotion_requests",
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
    )
    op.create_index("ix_promotion_requests_model_state", "promotion_requests", ["model", "state"])
    op.create_index("ix_promotion_requests_model_version_number", "promotion_requests", ["model", "version_number"])
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_index("ix_promotion_requests_model_version_number", "promotion_requests")
    op.drop_index("ix_promotion_requests_model_state", "promotion_requests")
    op.drop_table("promotion_requests")
    op.drop_index("ix_model_aliases_model_version_number", "model_aliases")
    op.drop_table("model_aliases")
    op.drop_index("ix_model_versions_training_job", "model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_registered_models_residency_region", "registered_models")
    op.drop_table("registered_models")
    op.drop_index("ix_training_jobs_request_id", "training_jobs")
    op.drop_index("ix_training_jobs_state_created_at", "training_jobs")
    op.drop_table("training_jobs")
