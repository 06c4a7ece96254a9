"""SQLAlchemy store of the monitoring service: reference profiles, model monitors, prediction
logs and labels, drift reports and window metrics, alert rules, the alerts they raise,
notification channels and deliveries, retraining starts and erasure receipts.

A monitor watches one model version against one reference profile; alert rules watch a
monitor's metrics; alerts keep their history after the rule that raised them is gone.
(`alerts.notifications_json` and `alerts.retraining_json` from the first migration are
superseded by the `notification_deliveries` and `retraining_starts` tables.)
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

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

# -- added by migration 0002: logs, windows, reports, channels, deliveries, erasures ---------

# SQLite gives rowid aliases only to INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

prediction_logs = sa.Table(
    "prediction_logs",
    metadata,
    sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=False),
    sa.Column("request_id", sa.String(256), nullable=False),
    # Arrival order within the monitor; count windows are cut on it.
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("model_version", sa.String(256), nullable=False),
    sa.Column("deployment", sa.String(256), nullable=False, server_default=""),
    sa.Column("prediction_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=True),
    sa.Column("status_code", sa.Integer, nullable=False, server_default="0"),
    sa.Column("subject_id", sa.String(256), nullable=True),
    # The profile's columns of the row, normalized (numbers or category keys).
    sa.Column("values_json", sa.Text, nullable=False),
    sa.Column("label_json", sa.Text, nullable=True),
    sa.Column("label_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_prediction_logs_monitor_time", "monitor", "prediction_time"),
    sa.Index("ix_prediction_logs_monitor_sequence", "monitor", "sequence", unique=True),
    sa.Index("ix_prediction_logs_monitor_request_id", "monitor", "request_id", unique=True),
    sa.Index("ix_prediction_logs_request_id", "request_id"),
    sa.Index("ix_prediction_logs_subject_id", "subject_id"),
)

# Batch ids already committed, so that a retried stream skips them.
ingested_batches = sa.Table(
    "ingested_batches",
    metadata,
    sa.Column("stream_kind", sa.String(16), primary_key=True),
    sa.Column("batch_id", sa.String(256), primary_key=True),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_ingested_batches_received_at", "received_at"),
)

# Per-monitor counters and window progress.
monitor_state = sa.Table(
    "monitor_state",
    metadata,
    sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("next_sequence", sa.BigInteger, nullable=False, server_default="0"),
    # Count windows are numbered from this sequence (moved when the window size changes).
    sa.Column("count_base_sequence", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("evaluated_count_windows", sa.BigInteger, nullable=False, server_default="0"),
    # Every time window ending at or before this has been evaluated.
    sa.Column("evaluated_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("accepted_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rejected_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unknown_model_version_rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("duplicate_batches", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("joined_labels", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unmatched_labels", sa.BigInteger, nullable=False, server_default="0"),
)

# Rejected rows by reason and time, for reports and the REJECTED_ROWS alert metric.
ingestion_rejections = sa.Table(
    "ingestion_rejections",
    metadata,
    sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=True),
    sa.Column("model_version", sa.String(256), nullable=False, server_default=""),
    sa.Column("stream_kind", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("example", sa.Text, nullable=False, server_default=""),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_ingestion_rejections_monitor_received_at", "monitor", "received_at"),
)

drift_reports = sa.Table(
    "drift_reports",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), nullable=False),
    # Set for reports of closed windows, so that a window is reported once.
    sa.Column("window_key", sa.String(64), nullable=True),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("drift_share", sa.Float, nullable=False),
    sa.Column("dataset_drift", sa.Boolean, nullable=False),
    # The falaj.monitoring.v1.DriftReport, serialized.
    sa.Column("report_proto", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_drift_reports_monitor_window_start", "monitor", "window_start"),
    sa.Index("ix_drift_reports_monitor_window_key", "monitor", "window_key", unique=True),
)

# Quality and operational figures per closed window (quality is updated as labels arrive).
window_metrics = sa.Table(
    "window_metrics",
    metadata,
    sa.Column("monitor", sa.String(128), sa.ForeignKey("model_monitors.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("window_key", sa.String(64), primary_key=True),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
    # The QualityWindowMetrics or OperationalWindowMetrics, serialized.
    sa.Column("metrics_proto", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_window_metrics_monitor_kind_start", "monitor", "kind", "window_start"),
)

notification_channels = sa.Table(
    "notification_channels",
    metadata,
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

# One notification of one alert transition to one channel; the worker retries due ones.
notification_deliveries = sa.Table(
    "notification_deliveries",
    metadata,
    sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    sa.Column("alert", sa.String(128), sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    # No foreign key: the delivery history outlives a deleted channel.
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
    sa.Index("ix_notification_deliveries_alert", "alert"),
    sa.Index("ix_notification_deliveries_state_next_attempt", "state", "next_attempt_time"),
)

# Retraining started by a firing alert; the worker makes the call to training.
retraining_starts = sa.Table(
    "retraining_starts",
    metadata,
    sa.Column("alert", sa.String(128), sa.ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("alert_rule", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("action_json", sa.Text, nullable=False),
    sa.Column("training_job", sa.String(256), nullable=False, server_default=""),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("request_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("next_attempt_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_retraining_starts_rule_request_time", "alert_rule", "request_time"),
    sa.Index("ix_retraining_starts_state_next_attempt", "state", "next_attempt_time"),
)

# Applied erasure receipts: applying one again is a no-op that returns the first result.
erasure_receipts = sa.Table(
    "erasure_receipts",
    metadata,
    sa.Column("receipt", sa.String(256), primary_key=True),
    sa.Column("subject_count", sa.Integer, nullable=False),
    sa.Column("prediction_log_rows_erased", sa.BigInteger, nullable=False),
    sa.Column("label_rows_erased", sa.BigInteger, nullable=False),
    sa.Column("erased_by", sa.String(256), nullable=False),
    sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


def _rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE touched (a CursorResult's rowcount)."""
    return int(getattr(result, "rowcount", 0) or 0)


class MonitoringStore:
    """Every read and write of profiles, monitors, logs, reports, rules and alerts goes through here.

    Methods that take a `session` run inside the caller's transaction (`transaction()`),
    so that one use case commits all its writes or none.
    """

    def __init__(self, database: Database):
        self.database = database

    def transaction(self) -> AbstractContextManager[Session]:
        return self.database.session_scope()

    @property
    def is_postgresql(self) -> bool:
        return self.database.engine.dialect.name == "postgresql"

    # -- alerts summary ----------------------------------------------------------------------
    def count_alerts_by_state(self, monitor_id: str | None = None) -> dict[str, int]:
        """Alerts per state, of one monitor when `monitor_id` is given, else of all."""
        query = sa.select(alerts.c.state, sa.func.count()).group_by(alerts.c.state)
        if monitor_id is not None:
            query = query.where(alerts.c.monitor == monitor_id)
        with self.database.session_scope() as session:
            return {state: int(count) for state, count in session.execute(query)}

    # -- generic rows ------------------------------------------------------------------------
    @staticmethod
    def insert(session: Session, table: sa.Table, values: Mapping[str, Any]) -> None:
        session.execute(table.insert().values(**values))

    @staticmethod
    def get(session: Session, table: sa.Table, key: Any, *, for_update: bool = False) -> sa.Row[Any] | None:
        primary = list(table.primary_key.columns)[0]
        query = sa.select(table).where(primary == key)
        if for_update:
            query = query.with_for_update()
        return session.execute(query).first()

    @staticmethod
    def update(session: Session, table: sa.Table, key: Any, values: Mapping[str, Any]) -> int:
        primary = list(table.primary_key.columns)[0]
        return _rowcount(session.execute(table.update().where(primary == key).values(**values)))

    @staticmethod
    def delete(session: Session, table: sa.Table, key: Any) -> int:
        primary = list(table.primary_key.columns)[0]
        return _rowcount(session.execute(table.delete().where(primary == key)))

    @staticmethod
    def page(
        session: Session, table: sa.Table, *, where: Sequence[sa.ColumnElement[bool]], order_by: Sequence[Any], offset: int, limit: int
    ) -> tuple[list[sa.Row[Any]], bool]:
        """One page of rows and whether more follow."""
        query = sa.select(table).where(*where).order_by(*order_by).offset(offset).limit(limit + 1)
        rows = list(session.execute(query))
        return rows[:limit], len(rows) > limit

    # -- profiles and monitors ---------------------------------------------------------------
    @staticmethod
    def monitors_using_profile(session: Session, profile_id: str) -> list[str]:
        query = sa.select(model_monitors.c.id).where(model_monitors.c.reference_profile == profile_id).order_by(model_monitors.c.id)
        return list(session.execute(query).scalars())

    @staticmethod
    def monitor_by_model_version(session: Session, model_version: str) -> sa.Row[Any] | None:
        return session.execute(sa.select(model_monitors).where(model_monitors.c.model_version == model_version)).first()

    @staticmethod
    def monitored_versions(session: Session, model_versions: Sequence[str]) -> list[sa.Row[Any]]:
        """Monitor id, model version, deployment and the profile's column specs of watched versions."""
        query = (
            sa.select(
                model_monitors.c.id,
                model_monitors.c.model_version,
                model_monitors.c.deployment,
                model_monitors.c.config_json,
                reference_profiles.c.columns_json,
            )
            .join(reference_profiles, reference_profiles.c.id == model_monitors.c.reference_profile)
            .where(model_monitors.c.model_version.in_(list(model_versions)))
        )
        return list(session.execute(query))

    @staticmethod
    def all_monitor_ids(session: Session) -> list[str]:
        return list(session.execute(sa.select(model_monitors.c.id).order_by(model_monitors.c.id)).scalars())

    # -- monitor state -----------------------------------------------------------------------
    @staticmethod
    def add_counters(session: Session, monitor_id: str, **deltas: int) -> None:
        values = {name: getattr(monitor_state.c, name) + delta for name, delta in deltas.items() if delta}
        if values:
            session.execute(monitor_state.update().where(monitor_state.c.monitor == monitor_id).values(**values))

    @staticmethod
    def reserve_sequences(session: Session, monitor_id: str, count: int) -> int:
        """First of `count` consecutive arrival sequences; the row lock orders concurrent streams."""
        statement = (
            monitor_state.update()
            .where(monitor_state.c.monitor == monitor_id)
            .values(next_sequence=monitor_state.c.next_sequence + count)
            .returning(monitor_state.c.next_sequence)
        )
        after = int(session.execute(statement).scalar_one())
        return after - count

    # -- batches and logs --------------------------------------------------------------------
    @staticmethod
    def batch_seen(session: Session, stream_kind: str, batch_id: str) -> bool:
        query = sa.select(ingested_batches.c.batch_id).where(
            ingested_batches.c.stream_kind == stream_kind, ingested_batches.c.batch_id == batch_id
        )
        return session.execute(query).first() is not None

    @staticmethod
    def existing_request_ids(session: Session, monitor_id: str, request_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(request_ids), 500):
            chunk = list(request_ids[start : start + 500])
            query = sa.select(prediction_logs.c.request_id).where(
                prediction_logs.c.monitor == monitor_id, prediction_logs.c.request_id.in_(chunk)
            )
            found.update(session.execute(query).scalars())
        return found

    @staticmethod
    def insert_many(session: Session, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            session.execute(table.insert(), list(rows))

    @staticmethod
    def logs_by_sequence(session: Session, monitor_id: str, first: int, end: int) -> list[sa.Row[Any]]:
        query = (
            sa.select(prediction_logs)
            .where(prediction_logs.c.monitor == monitor_id, prediction_logs.c.sequence >= first, prediction_logs.c.sequence < end)
            .order_by(prediction_logs.c.sequence)
        )
        return list(session.execute(query))

    @staticmethod
    def logs_in_span(session: Session, monitor_id: str, start: dt.datetime, end: dt.datetime, limit: int) -> list[sa.Row[Any]]:
        query = (
            sa.select(prediction_logs)
            .where(
                prediction_logs.c.monitor == monitor_id, prediction_logs.c.prediction_time >= start, prediction_logs.c.prediction_time < end
            )
            .order_by(prediction_logs.c.prediction_time, prediction_logs.c.sequence)
            .limit(limit)
        )
        return list(session.execute(query))

    @staticmethod
    def first_log_time(session: Session, monitor_id: str, at_or_after: dt.datetime | None) -> dt.datetime | None:
        query = sa.select(sa.func.min(prediction_logs.c.prediction_time)).where(prediction_logs.c.monitor == monitor_id)
        if at_or_after is not None:
            query = query.where(prediction_logs.c.prediction_time >= at_or_after)
        value = session.execute(query).scalar_one_or_none()
        return value if isinstance(value, dt.datetime) else None

    @staticmethod
    def logs_by_request_ids(session: Session, request_ids: Sequence[str]) -> list[sa.Row[Any]]:
        rows: list[sa.Row[Any]] = []
        for start in range(0, len(request_ids), 500):
            chunk = list(request_ids[start : start + 500])
            query = sa.select(
                prediction_logs.c.id,
                prediction_logs.c.monitor,
                prediction_logs.c.request_id,
                prediction_logs.c.sequence,
                prediction_logs.c.prediction_time,
                prediction_logs.c.label_json,
            ).where(prediction_logs.c.request_id.in_(chunk))
            rows.extend(session.execute(query))
        return rows

    @staticmethod
    def set_label(session: Session, log_id: int, label_json: str, label_time: dt.datetime | None, labeled_at: dt.datetime) -> bool:
        """Attach a label unless one is there already (the first label is kept)."""
        statement = (
            prediction_logs.update()
            .where(prediction_logs.c.id == log_id, prediction_logs.c.label_json.is_(None))
            .values(label_json=label_json, label_time=label_time, labeled_at=labeled_at)
        )
        return _rowcount(session.execute(statement)) > 0

    @staticmethod
    def rejected_rows_since(session: Session, monitor_id: str, since: dt.datetime) -> int:
        query = sa.select(sa.func.coalesce(sa.func.sum(ingestion_rejections.c.row_count), 0)).where(
            ingestion_rejections.c.monitor == monitor_id,
            ingestion_rejections.c.received_at >= since,
            ingestion_rejections.c.stream_kind == "logs",
        )
        return int(session.execute(query).scalar_one())

    # -- reports and window metrics ----------------------------------------------------------
    @staticmethod
    def latest_report(session: Session, monitor_id: str) -> sa.Row[Any] | None:
        query = (
            sa.select(drift_reports)
            .where(drift_reports.c.monitor == monitor_id, drift_reports.c.window_key.is_not(None))
            .order_by(drift_reports.c.window_start.desc(), drift_reports.c.created_at.desc())
            .limit(1)
        )
        return session.execute(query).first()

    @staticmethod
    def report_exists(session: Session, monitor_id: str, window_key: str) -> bool:
        query = sa.select(drift_reports.c.id).where(drift_reports.c.monitor == monitor_id, drift_reports.c.window_key == window_key)
        return session.execute(query).first() is not None

    @staticmethod
    def upsert_window_metrics(session: Session, values: Mapping[str, Any]) -> None:
        key = (
            window_metrics.c.monitor == values["monitor"],
            window_metrics.c.kind == values["kind"],
            window_metrics.c.window_key == values["window_key"],
        )
        updated = _rowcount(session.execute(window_metrics.update().where(*key).values(**values)))
        if not updated:
            session.execute(window_metrics.insert().values(**values))

    @staticmethod
    def latest_window_metrics(session: Session, monitor_id: str, kind: str) -> sa.Row[Any] | None:
        query = (
            sa.select(window_metrics)
            .where(window_metrics.c.monitor == monitor_id, window_metrics.c.kind == kind)
            .order_by(window_metrics.c.window_start.desc())
            .limit(1)
        )
        return session.execute(query).first()

    @staticmethod
    def window_metrics_for_keys(session: Session, monitor_id: str, kind: str, keys: Sequence[str]) -> list[sa.Row[Any]]:
        query = sa.select(window_metrics).where(
            window_metrics.c.monitor == monitor_id, window_metrics.c.kind == kind, window_metrics.c.window_key.in_(list(keys))
        )
        return list(session.execute(query))

    # -- rules, alerts, deliveries, retraining ------------------------------------------------
    @staticmethod
    def enabled_rules(session: Session, monitor_id: str) -> list[sa.Row[Any]]:
        query = (
            sa.select(alert_rules).where(alert_rules.c.monitor == monitor_id, alert_rules.c.enabled.is_(True)).order_by(alert_rules.c.id)
        )
        return list(session.execute(query))

    @staticmethod
    def open_alert(session: Session, rule_id: str) -> sa.Row[Any] | None:
        query = (
            sa.select(alerts)
            .where(alerts.c.alert_rule == rule_id, alerts.c.state.in_(["PENDING", "FIRING"]))
            .order_by(alerts.c.start_time.desc())
            .limit(1)
        )
        return session.execute(query).first()

    @staticmethod
    def firing_count(session: Session, monitor_id: str) -> int:
        query = sa.select(sa.func.count()).select_from(alerts).where(alerts.c.monitor == monitor_id, alerts.c.state == "FIRING")
        return int(session.execute(query).scalar_one())

    @staticmethod
    def deliveries_of(session: Session, alert_id: str) -> list[sa.Row[Any]]:
        query = sa.select(notification_deliveries).where(notification_deliveries.c.alert == alert_id).order_by(notification_deliveries.c.id)
        return list(session.execute(query))

    @staticmethod
    def due_deliveries(session: Session, now: dt.datetime, limit: int) -> list[sa.Row[Any]]:
        query = (
            sa.select(notification_deliveries)
            .where(notification_deliveries.c.state.in_(["PENDING", "RETRYING"]), notification_deliveries.c.next_attempt_time <= now)
            .order_by(notification_deliveries.c.next_attempt_time, notification_deliveries.c.id)
            .limit(limit)
        )
        return list(session.execute(query))

    @staticmethod
    def next_due_time(session: Session) -> dt.datetime | None:
        candidates = [
            session.execute(
                sa.select(sa.func.min(notification_deliveries.c.next_attempt_time)).where(
                    notification_deliveries.c.state.in_(["PENDING", "RETRYING"])
                )
            ).scalar_one_or_none(),
            session.execute(
                sa.select(sa.func.min(retraining_starts.c.next_attempt_time)).where(retraining_starts.c.state == "PENDING")
            ).scalar_one_or_none(),
        ]
        times = [c for c in candidates if isinstance(c, dt.datetime)]
        return min(times) if times else None

    @staticmethod
    def due_retraining(session: Session, now: dt.datetime, limit: int) -> list[sa.Row[Any]]:
        query = (
            sa.select(retraining_starts)
            .where(retraining_starts.c.state == "PENDING", retraining_starts.c.next_attempt_time <= now)
            .order_by(retraining_starts.c.next_attempt_time)
            .limit(limit)
        )
        return list(session.execute(query))

    @staticmethod
    def last_retraining(session: Session, rule_id: str) -> sa.Row[Any] | None:
        query = (
            sa.select(retraining_starts)
            .where(retraining_starts.c.alert_rule == rule_id, retraining_starts.c.state.in_(["PENDING", "STARTED"]))
            .order_by(retraining_starts.c.request_time.desc())
            .limit(1)
        )
        return session.execute(query).first()

    @staticmethod
    def rules_using_channel(session: Session, channel_name: str) -> list[sa.Row[Any]]:
        query = sa.select(alert_rules).where(alert_rules.c.notification_channels_json.like(f'%"{channel_name}"%'))
        return [row for row in session.execute(query) if channel_name in json.loads(row.notification_channels_json)]

    # -- retention and erasure ---------------------------------------------------------------
    @staticmethod
    def delete_logs_before(session: Session, monitor_id: str, before: dt.datetime) -> int:
        statement = prediction_logs.delete().where(prediction_logs.c.monitor == monitor_id, prediction_logs.c.prediction_time < before)
        return _rowcount(session.execute(statement))

    @staticmethod
    def delete_metrics_before(session: Session, monitor_id: str, before: dt.datetime) -> int:
        reports = _rowcount(
            session.execute(drift_reports.delete().where(drift_reports.c.monitor == monitor_id, drift_reports.c.window_end < before))
        )
        windows = _rowcount(
            session.execute(window_metrics.delete().where(window_metrics.c.monitor == monitor_id, window_metrics.c.window_end < before))
        )
        session.execute(
            ingestion_rejections.delete().where(ingestion_rejections.c.monitor == monitor_id, ingestion_rejections.c.received_at < before)
        )
        return reports + windows

    @staticmethod
    def delete_batches_before(session: Session, before: dt.datetime) -> None:
        session.execute(ingested_batches.delete().where(ingested_batches.c.received_at < before))

    @staticmethod
    def erase_subjects(session: Session, subject_ids: Sequence[str]) -> tuple[int, int]:
        """Delete the subjects' prediction logs; (rows deleted, of which labelled)."""
        logs_erased = labels_erased = 0
        for start in range(0, len(subject_ids), 500):
            where = prediction_logs.c.subject_id.in_(list(subject_ids[start : start + 500]))
            counts = sa.select(sa.func.count(), sa.func.count(prediction_logs.c.label_json)).where(where)
            rows, labelled = session.execute(counts).one()
            logs_erased += int(rows)
            labels_erased += int(labelled)
            session.execute(prediction_logs.delete().where(where))
        return logs_erased, labels_erased
