"""Features catalog, second step: on-demand views, per-view materialization state,
offline snapshots of ingest versions, erasure applications.

Revision ID: features_0002
Revises: features_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "features_0002"
down_revision = "features_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "on_demand_feature_views",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("definition_json", sa.Text, nullable=False),
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
    op.create_index("ix_on_demand_feature_views_residency_region", "on_demand_feature_views", ["residency_region"])
    op.create_table(
        "feature_view_state",
        sa.Column("feature_view", sa.String(128), sa.ForeignKey("feature_views.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("offline_dataset_version", sa.String(256), nullable=True),
        sa.Column("materialized_dataset_version", sa.String(256), nullable=True),
        sa.Column("materialized_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("newest_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_materialization", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "offline_snapshots",
        sa.Column("dataset_version", sa.String(256), primary_key=True),
        sa.Column("dataset", sa.String(256), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False, server_default=""),
        sa.Column("row_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("min_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_offline_snapshots_dataset", "offline_snapshots", ["dataset"])
    op.create_table(
        "erasure_applications",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("erasure_receipt", sa.String(256), nullable=False),
        sa.Column("receipt_digest", sa.String(64), nullable=False, server_default=""),
        sa.Column("state", sa.String(48), nullable=False),
        sa.Column("feature_views_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("offline_rows_removed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("online_keys_removed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=False, server_default=""),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_erasure_applications_erasure_receipt", "erasure_applications", ["erasure_receipt"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_erasure_applications_erasure_receipt", "erasure_applications")
    op.drop_table("erasure_applications")
    op.drop_index("ix_offline_snapshots_dataset", "offline_snapshots")
    op.drop_table("offline_snapshots")
    op.drop_table("feature_view_state")
    op.drop_index("ix_on_demand_feature_views_residency_region", "on_demand_feature_views")
    op.drop_table("on_demand_feature_views")
