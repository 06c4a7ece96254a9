"""Features catalog: entities, feature views and their entities, feature services,
materialization runs, request log.

Revision ID: features_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "features_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "entities",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("join_keys_json", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "feature_views",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("source_dataset", sa.String(256), nullable=False),
        sa.Column("pinned_dataset_version", sa.String(256), nullable=True),
        sa.Column("definition_json", sa.Text, nullable=False),
        sa.Column("ttl_seconds", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("materialization_schedule", sa.String(128), nullable=False, server_default=""),
        sa.Column("materialize_on_new_dataset_version", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feature_views_source_dataset", "feature_views", ["source_dataset"])
    op.create_index("ix_feature_views_residency_region", "feature_views", ["residency_region"])
    op.create_table(
        "feature_view_entities",
        sa.Column("feature_view", sa.String(128), sa.ForeignKey("feature_views.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("entity", sa.String(128), sa.ForeignKey("entities.name", ondelete="RESTRICT"), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
    )
    op.create_index("ix_feature_view_entities_entity", "feature_view_entities", ["entity"])
    op.create_table(
        "feature_services",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("projections_json", sa.Text, nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feature_services_residency_region", "feature_services", ["residency_region"])
    op.create_table(
        "materialization_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("feature_views_json", sa.Text, nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("results_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("rows_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=False, server_default=""),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_end_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_materialization_runs_state_created_at", "materialization_runs", ["state", "created_at"])
    op.create_index("ix_materialization_runs_request_id", "materialization_runs", ["request_id"], unique=True)
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_index("ix_materialization_runs_request_id", "materialization_runs")
    op.drop_index("ix_materialization_runs_state_created_at", "materialization_runs")
    op.drop_table("materialization_runs")
    op.drop_index("ix_feature_services_residency_region", "feature_services")
    op.drop_table("feature_services")
    op.drop_index("ix_feature_view_entities_entity", "feature_view_entities")
    op.drop_table("feature_view_entities")
    op.drop_index("ix_feature_views_residency_region", "feature_views")
    op.drop_index("ix_feature_views_source_dataset", "feature_views")
    op.drop_table("feature_views")
    op.drop_table("entities")
