"""An alert's life in the store: started, fired, resolved; each transition queues its
webhook notifications, and firing queues the rule's retraining start.

Every function here runs inside the caller's transaction, so a transition and the work
it queues are committed together; the worker does the network calls afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from google.protobuf import json_format
from sqlalchemy.orm import Session

from falaj.monitoring.v1 import message_pb2 as pb
from falaj_platform.services.monitoring import alerting
from falaj_platform.services.monitoring import messages as m
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.store import alerts, notification_channels, notification_deliveries, retraining_starts

METRIC_LABELS = {
    "DRIFT_SHARE": "drift share",
    "DATASET_DRIFT": "dataset drift",
    "COLUMN_DRIFT_STATISTIC": "drift statistic",
    "COLUMN_DRIFT_P_VALUE": "drift p-value",
    "QUALITY": "quality",
    "QUALITY_DROP": "quality drop",
    "LATENCY_P99_SECONDS": "p99 latency (s)",
    "ERROR_RATE": "error rate",
    "THROUGHPUT": "throughput (req/s)",
    "REJECTED_ROWS": "rejected rows",
}


def summary(rule: Any, model_version: str, value: float | None) -> str:
    what = METRIC_LABELS.get(rule.metric, rule.metric.lower())
    if rule.quality_metric:
        what = f"{what} {rule.quality_metric.lower()}"
    if rule.column_name:
        what = f"{what} of {rule.column_name}"
    shown = "no data" if value is None else f"{value:.4g}"
    symbol = alerting.Comparator(rule.comparator).symbol
    return f"{what} {shown} {symbol} {rule.threshold:g} on {model_version}"


def _labels(rule: Any, monitor_labels: dict[str, str]) -> dict[str, str]:
    labels = {**monitor_labels, **json.loads(rule.labels_json or "{}"), "metric": rule.metric}
    if rule.column_name:
        labels["column"] = rule.column_name
    return labels


def start(
    ctx: Context,
    session: Session,
    rule: Any,
    *,
    model_version: str,
    monitor_labels: dict[str, str],
    value: float | None,
    firing: bool,
    now: dt.datetime,
) -> str:
    alert_id = uuid.uuid4().hex[:20]
    ctx.store.insert(
        session,
        alerts,
        {
            "id": alert_id,
            "alert_rule": rule.id,
            "monitor": rule.monitor,
            "model_version": model_version,
            "state": "FIRING" if firing else "PENDING",
            "severity": rule.severity,
            "value": value if value is not None else 0.0,
            "threshold": rule.threshold,
            "summary": summary(rule, model_version, value),
            "labels_json": json.dumps(_labels(rule, monitor_labels), sort_keys=True),
            "start_time": now,
            "fire_time": now if firing else None,
        },
    )
    if firing:
        _on_fire(ctx, session, alert_id, rule, now)
    return alert_id


def observe(ctx: Context, session: Session, alert_id: str, rule: Any, model_version: str, value: float | None) -> None:
    if value is not None:
        ctx.store.update(session, alerts, alert_id, {"value": value, "summary": summary(rule, model_version, value)})


def fire(ctx: Context, session: Session, alert_id: str, rule: Any, model_version: str, value: float | None, now: dt.datetime) -> None:
    values: dict[str, Any] = {"state": "FIRING", "fire_time": now}
    if value is not None:
        values.update(value=value, summary=summary(rule, model_version, value))
    ctx.store.update(session, alerts, alert_id, values)
    _on_fire(ctx, session, alert_id, rule, now)


def drop_pending(ctx: Context, session: Session, alert_id: str) -> None:
    ctx.store.delete(session, alerts, alert_id)


def resolve(ctx: Context, session: Session, alert_id: str, rule: Any, now: dt.datetime, value: float | None = None) -> None:
    values: dict[str, Any] = {"state": "RESOLVED", "resolve_time": now}
    if value is not None:
        values["value"] = value
    ctx.store.update(session, alerts, alert_id, values)
    queue_notifications(ctx, session, alert_id, rule, "RESOLVED", now)


def _on_fire(ctx: Context, session: Session, alert_id: str, rule: Any, now: dt.datetime) -> None:
    queue_notifications(ctx, session, alert_id, rule, "FIRING", now)
    if rule.retraining_json:
        action = json_format.Parse(rule.retraining_json, pb.RetrainingAction())
        if action.enabled:
            _queue_retraining(ctx, session, alert_id, rule, action, now)


def payload(alert: Any, rule: Any, state: str) -> dict[str, object]:
    """The JSON a webhook receives: stable keys, ISO-8601 times, the alert as it was at the transition."""
    return {
        "kind": "falaj.monitoring.alert",
        "alert": f"alerts/{alert.id}",
        "state": state,
        "alert_rule": f"alertRules/{rule.id}",
        "rule_display_name": rule.display_name,
        "description": rule.description,
        "monitor": f"modelMonitors/{alert.monitor}",
        "model_version": alert.model_version,
        "severity": alert.severity,
        "summary": alert.summary,
        "value": alert.value,
        "threshold": alert.threshold,
        "labels": json.loads(alert.labels_json or "{}"),
        "start_time": m.utc(alert.start_time).isoformat(),
        "fire_time": m.utc(alert.fire_time).isoformat() if alert.fire_time else None,
        "resolve_time": m.utc(alert.resolve_time).isoformat() if alert.resolve_time else None,
    }


def queue_notifications(ctx: Context, session: Session, alert_id: str, rule: Any, state: str, now: dt.datetime) -> int:
    alert = ctx.store.get(session, alerts, alert_id)
    queued = 0
    for channel_name in json.loads(rule.notification_channels_json or "[]"):
        channel = ctx.store.get(session, notification_channels, channel_name.removeprefix("notificationChannels/"))
        if channel is None or not channel.enabled or (state == "RESOLVED" and not channel.notify_on_resolve):
            continue
        ctx.store.insert(
            session,
            notification_deliveries,
            {
                "alert": alert_id,
                "channel": channel.id,
                "alert_state": state,
                "state": "PENDING",
                "payload_json": json.dumps(payload(alert, rule, state), sort_keys=True),
                "next_attempt_time": now,
                "created_at": now,
            },
        )
        queued += 1
    if queued:
        ctx.wake.set()
    return queued


def _queue_retraining(ctx: Context, session: Session, alert_id: str, rule: Any, action: pb.RetrainingAction, now: dt.datetime) -> None:
    row: dict[str, Any] = {
        "alert": alert_id,
        "alert_rule": rule.id,
        "state": "PENDING",
        "action_json": json_format.MessageToJson(action, indent=None, sort_keys=True),
        "request_time": now,
        "next_attempt_time": now,
    }
    last = ctx.store.last_retraining(session, rule.id)
    if last is not None and action.HasField("cooldown"):
        ready = m.utc(last.request_time) + action.cooldown.ToTimedelta()
        if now < ready:
            row.update(
                state="SKIPPED",
                next_attempt_time=None,
                error_message=f"cooldown: the rule started a retraining at {m.utc(last.request_time).isoformat()}; next allowed at {ready.isoformat()}",
            )
    ctx.store.insert(session, retraining_starts, row)
    ctx.wake.set()
