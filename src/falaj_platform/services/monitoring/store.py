"""SQLAlchemy store of the monitoring service: reference profiles, model monitors, alert
rules and the alerts they raise.

A monitor watches one model version against one reference profile; alert rules watch a
monitor's metrics; alerts keep their history after the rule that raised them is gone.
"""

from __future__ import annotations

import sqlalchemy as sa

from falaj_platform.runtime.db import Database, request_log_columns

metadata = sa.MetaData()

reference_profiles = sa.Table(
    "reference_profiles",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(256), nullable=False, index=True),
    sa.Column("dataset_version", sa.String(256), nullable=False, server_default=""),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("max_sample_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("row_count", sa.BigInteger, nullable=False, server_default="0"),
    # Column roles and types, per-column summaries and training-time quality.
    sa.Column("columns_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("column_profiles_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("training_metrics_json", sa.Text, nullable=False, server_default="[]"),
    # Sampled reference rows the drift tests read (Arrow IPC file under the data dir).
    sa.Column("sample_path", sa.Text, nullable=True),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

model_monitors = sa.Table(
    "model_monitors",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("model_version", sa.String(256), nullable=False),
    sa.Column("deployment", sa.String(256), nullable=False, server_default=""),
    sa.Column("reference_profile", sa.String(128), sa.ForeignKey("reference_profiles.id", ondelete="RESTRICT"), nullable=False, index=True),
    # Window, drift, quality and retention settings.
    sa.Column("config_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Prediction logs carrying a model version are attributed to its one monitor.
    sa.Index("ix_model_monitors_model_version", "model_version", unique=True),
)

alert_rules = sa.Table(
    "alert_rules",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=False, index=True),
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

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("alert_rule", sa.String(128), sa.ForeignKey("alert_rules.id", ondelete="SET NULL"), nullable=True, index=True),
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
    sa.Index("ix_alerts_monitor_state", "monitor", "state"),
    sa.Index("ix_alerts_state_start_time", "state", "start_time"),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


class MonitoringStore:
    """Every read and write of profiles, monitors, rules and alerts goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def count_alerts_by_state(self, monitor_id: str | None = None) -> dict[str, int]:
        """Alerts per state, of one monitor when `monitor_id` is given, else of all."""
        query = sa.select(alerts.c.state, sa.func.count()).group_by(alerts.c.state)
        if monitor_id is not None:
            query = query.where(alerts.c.monitor == monitor_id)
        with self.database.session_scope() as session:
            return {state: int(count) for state, count in session.execute(query)}
