"""Serving catalog: deployments, rollouts (traffic-split revisions), served models,
request log.

Revision ID: serving_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "serving_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("current_revision", sa.BigInteger, nullable=False),
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
    op.create_index("ix_deployments_model", "deployments", ["model"])
    op.create_index("ix_deployments_residency_region", "deployments", ["residency_region"])
    op.create_table(
        "rollouts",
        sa.Column("deployment", sa.String(128), sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("revision", sa.BigInteger, primary_key=True),
        sa.Column("traffic_split_json", sa.Text, nullable=False),
        sa.Column("previous_revision", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("canary_step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("route_statuses_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "served_models",
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
    )
    op.create_index("ix_served_models_model_version", "served_models", ["model_version"], unique=True)
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_index("ix_served_models_model_version", "served_models")
    op.drop_table("served_models")
    op.drop_table("rollouts")
    op.drop_index("ix_deployments_residency_region", "deployments")
    op.drop_index("ix_deployments_model", "deployments")
    op.drop_table("deployments")
