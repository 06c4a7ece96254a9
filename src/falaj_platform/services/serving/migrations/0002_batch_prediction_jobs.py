"""Serving: batch prediction jobs (spec, state, progress, runner heartbeat).

Revision ID: serving_0002
Revises: serving_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "serving_0002"
down_revision = "serving_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_prediction_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("error_message", sa.Text, nullable=False, server_default=""),
        sa.Column("resolved_model_version", sa.String(256), nullable=False, server_default=""),
        sa.Column("output_dataset_version", sa.String(256), nullable=False, server_default=""),
        sa.Column("total_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("processed_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("runner_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_batch_prediction_jobs_state", "batch_prediction_jobs", ["state"])
    op.create_index("ix_batch_prediction_jobs_created_at", "batch_prediction_jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_batch_prediction_jobs_created_at", "batch_prediction_jobs")
    op.drop_index("ix_batch_prediction_jobs_state", "batch_prediction_jobs")
    op.drop_table("batch_prediction_jobs")
