"""Monitoring catalog: reference profiles, model monitors, alert rules, alerts, request log.

Revision ID: monitoring_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "monitoring_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reference_profiles",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("dataset_version", sa.String(256), nullable=False, server_default=""),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("max_sample_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("row_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("columns_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("column_profiles_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("training_metrics_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("sample_path", sa.Text, nullable=True),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reference_profiles_model_version", "reference_profiles", ["model_version"])
    op.create_table(
        "model_monitors",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("deployment", sa.String(256), nullable=False, server_default=""),
        sa.Column("reference_profile", sa.String(128), sa.ForeignKey("reference_profiles.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("config_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_model_monitors_reference_profile", "model_monitors", ["reference_profile"])
    op.create_index("ix_model_monitors_model_version", "model_monitors", ["model_version"], unique=True)
    op.create_table(
        "alert_rules",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("column_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("quality_metric", sa.String(64), nullable=False, server_default=""),
        sa.Column("comparator", sa.String(32), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("evaluation_window_seconds", sa.Float, nullable=True),
        sa.Column("for_duration_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("severity", sa.String(32), nullable=False),
        sa.Column("notification_channels_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("retraining_json", sa.Text, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_alert_rules_monitor", "alert_rules", ["monitor"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("alert_rule", sa.String(128), sa.ForeignKey("alert_rules.id", ondelete="SET NULL"), nullable=True),
        sa.Column("monitor", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(32), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolve_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(256), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notifications_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("retraining_json", sa.Text, nullable=True),
    )
    op.create_index("ix_alerts_alert_rule", "alerts", ["alert_rule"])
    op.create_index("ix_alerts_monitor_state", "alerts", ["monitor", "state"])
    op.create_index("ix_alerts_state_start_time", "alerts", ["state", "start_time"])
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_index("ix_alerts_state_start_time", "alerts")
    op.drop_index("ix_alerts_monitor_state", "alerts")
    op.drop_index("ix_alerts_alert_rule", "alerts")
    op.drop_table("alerts")
    op.drop_index("ix_alert_rules_monitor", "alert_rules")
    op.drop_table("alert_rules")
    op.drop_index("ix_model_monitors_model_version", "model_monitors")
    op.drop_index("ix_model_monitors_reference_profile", "model_monitors")
    op.drop_table("model_monitors")
    op.drop_index("ix_reference_profiles_model_version", "reference_profiles")
    op.drop_table("reference_profiles")
