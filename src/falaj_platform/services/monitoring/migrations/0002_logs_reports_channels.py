"""Prediction logs and labels, window progress, drift reports, window metrics,
notification channels and deliveries, retraining starts, erasure receipts.

Revision ID: monitoring_0002
Revises: monitoring_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "monitoring_0002"
down_revision = "monitoring_0001"
branch_labels = None
depends_on = None

AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "prediction_logs",
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=False),
        sa.Column("request_id", sa.String(256), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("deployment", sa.String(256), nullable=False, server_default=""),
        sa.Column("prediction_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=False, server_default="0"),
        sa.Column("subject_id", sa.String(256), nullable=True),
        sa.Column("values_json", sa.Text, nullable=False),
        sa.Column("label_json", sa.Text, nullable=True),
        sa.Column("label_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_prediction_logs_monitor_time", "prediction_logs", ["monitor", "prediction_time"])
    op.create_index("ix_prediction_logs_monitor_sequence", "prediction_logs", ["monitor", "sequence"], unique=True)
    op.create_index("ix_prediction_logs_monitor_request_id", "prediction_logs", ["monitor", "request_id"], unique=True)
    op.create_index("ix_prediction_logs_request_id", "prediction_logs", ["request_id"])
    op.create_index("ix_prediction_logs_subject_id", "prediction_logs", ["subject_id"])
    op.create_table(
        "ingested_batches",
        sa.Column("stream_kind", sa.String(16), primary_key=True),
        sa.Column("batch_id", sa.String(256), primary_key=True),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ingested_batches_received_at", "ingested_batches", ["received_at"])
    op.create_table(
        "monitor_state",
        sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("next_sequence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("count_base_sequence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("evaluated_count_windows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("evaluated_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("accepted_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rejected_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("unknown_model_version_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("duplicate_batches", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("joined_labels", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("unmatched_labels", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "ingestion_rejections",
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=True),
        sa.Column("model_version", sa.String(256), nullable=False, server_default=""),
        sa.Column("stream_kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("example", sa.Text, nullable=False, server_default=""),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ingestion_rejections_monitor_received_at", "ingestion_rejections", ["monitor", "received_at"])
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=False),
        sa.Column("window_key", sa.String(64), nullable=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("drift_share", sa.Float, nullable=False),
        sa.Column("dataset_drift", sa.Boolean, nullable=False),
        sa.Column("report_proto", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_drift_reports_monitor_window_start", "drift_reports", ["monitor", "window_start"])
    op.create_index("ix_drift_reports_monitor_window_key", "drift_reports", ["monitor", "window_key"], unique=True)
    op.create_table(
        "window_metrics",
        sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("window_key", sa.String(64), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics_proto", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_window_metrics_monitor_kind_start", "window_metrics", ["monitor", "kind", "window_start"])
    op.create_table(
        "notification_channels",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("webhook_url", sa.Text, nullable=False),
        sa.Column("signing_secret", sa.Text, nullable=True),
        sa.Column("headers_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("timeout_seconds", sa.Float, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("initial_backoff_seconds", sa.Float, nullable=False),
        sa.Column("max_backoff_seconds", sa.Float, nullable=False),
        sa.Column("notify_on_resolve", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "notification_deliveries",
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("alert", sa.String(128), sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("alert_state", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_http_status", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("last_attempt_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payload_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_notification_deliveries_alert", "notification_deliveries", ["alert"])
    op.create_index("ix_notification_deliveries_state_next_attempt", "notification_deliveries", ["state", "next_attempt_time"])
    op.create_table(
        "retraining_starts",
        sa.Column("alert", sa.String(128), sa.ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("alert_rule", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("action_json", sa.Text, nullable=False),
        sa.Column("training_job", sa.String(256), nullable=False, server_default=""),
        sa.Column("error_message", sa.Text, nullable=False, server_default=""),
        sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("request_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_retraining_starts_rule_request_time", "retraining_starts", ["alert_rule", "request_time"])
    op.create_index("ix_retraining_starts_state_next_attempt", "retraining_starts", ["state", "next_attempt_time"])
    op.create_table(
        "erasure_receipts",
        sa.Column("receipt", sa.String(256), primary_key=True),
        sa.Column("subject_count", sa.Integer, nullable=False),
        sa.Column("prediction_log_rows_erased", sa.BigInteger, nullable=False),
        sa.Column("label_rows_erased", sa.BigInteger, nullable=False),
        sa.Column("erased_by", sa.String(256), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("erasure_receipts")
    op.drop_index("ix_retraining_starts_state_next_attempt", "retraining_starts")
    op.drop_index("ix_retraining_starts_rule_request_time", "retraining_starts")
    op.drop_table("retraining_starts")
    op.drop_index("ix_notification_deliveries_state_next_attempt", "notification_deliveries")
    op.drop_index("ix_notification_deliveries_alert", "notification_deliveries")
    op.drop_table("notification_deliveries")
    op.drop_table("notification_channels")
    op.drop_index("ix_window_metrics_monitor_kind_start", "window_metrics")
    op.drop_table("window_metrics")
    op.drop_index("ix_drift_reports_monitor_window_key", "drift_reports")
    op.drop_index("ix_drift_reports_monitor_window_start", "drift_reports")
    op.drop_table("drift_reports")
    op.drop_index("ix_ingestion_rejections_monitor_received_at", "ingestion_rejections")
    op.drop_table("ingestion_rejections")
    op.drop_table("monitor_state")
    op.drop_index("ix_ingested_batches_received_at", "ingested_batches")
    op.drop_table("ingested_batches")
    op.drop_index("ix_prediction_logs_subject_id", "prediction_logs")
    op.drop_index("ix_prediction_logs_request_id", "prediction_logs")
    op.drop_index("ix_prediction_logs_monitor_request_id", "prediction_logs")
    op.drop_index("ix_prediction_logs_monitor_sequence", "prediction_logs")
    op.drop_index("ix_prediction_logs_monitor_time", "prediction_logs")
    op.drop_table("prediction_logs")
