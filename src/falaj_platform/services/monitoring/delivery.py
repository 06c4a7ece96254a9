"""Work the worker does outside requests: webhook deliveries with retries, retraining
starts through the gateway, time windows closing, and retention.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from google.protobuf import json_format

from falaj.monitoring.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import FalajError, NotFound, Unavailable
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.monitoring import alerting, evaluation, webhooks
from falaj_platform.services.monitoring import messages as m
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.store import notification_channels, notification_deliveries, retraining_starts

BATCH = 50
log = get_logger()


def _schedule(channel: Any) -> alerting.RetrySchedule:
    return alerting.RetrySchedule(
        max_attempts=channel.max_attempts,
        initial=dt.timedelta(seconds=channel.initial_backoff_seconds),
        maximum=dt.timedelta(seconds=channel.max_backoff_seconds),
    )


def _post(ctx: Context, channel: Any, body: bytes) -> webhooks.Attempt:
    attempt = webhooks.post(
        channel.webhook_url,
        body,
        headers=json.loads(channel.headers_json or "{}"),
        secret=channel.signing_secret,
        timeout=channel.timeout_seconds,
    )
    ctx.metrics.notifications.labels("delivered" if alerting.is_delivered(attempt.http_status) else "failed").inc()
    return attempt


def deliver_due_notifications(ctx: Context) -> int:
    """One attempt for each due delivery; failures are rescheduled with backoff or given up."""
    with ctx.store.transaction() as session:
        due = ctx.store.due_deliveries(session, ctx.now(), BATCH)
    for delivery in due:
        with ctx.store.transaction() as session:
            channel = ctx.store.get(session, notification_channels, delivery.channel)
        if channel is None or not channel.enabled:
            with ctx.store.transaction() as session:
                ctx.store.update(
                    session,
                    notification_deliveries,
                    delivery.id,
                    {"state": "FAILED", "last_error": "channel was deleted or disabled", "next_attempt_time": None},
                )
            continue
        attempt = _post(ctx, channel, delivery.payload_json.encode())
        count = delivery.attempt_count + 1
        now = ctx.now()
        values: dict[str, Any] = {
            "attempt_count": count,
            "last_http_status": attempt.http_status,
            "last_error": attempt.error,
            "last_attempt_time": now,
            "next_attempt_time": None,
        }
        schedule = _schedule(channel)
        if alerting.is_delivered(attempt.http_status):
            values["state"] = "DELIVERED"
        elif alerting.is_retryable(attempt.http_status) and not schedule.gives_up_after(count):
            values.update(state="RETRYING", next_attempt_time=now + schedule.delay_after(count))
        else:
            values["state"] = "FAILED"
            log.warning("notification given up", channel=channel.id, alert=delivery.alert, attempts=count, error=attempt.error)
        with ctx.store.transaction() as session:
            ctx.store.update(session, notification_deliveries, delivery.id, values)
    return len(due)


def test_channel(ctx: Context, name: str) -> pb.NotificationDelivery:
    """One test notification through a channel now (no retries, nothing stored)."""
    channel_id = m.parse_name(name, "notificationChannels")
    with ctx.store.transaction() as session:
        channel = ctx.store.get(session, notification_channels, channel_id)
    if channel is None:
        raise NotFound(f"{name} does not exist", reason="CHANNEL_NOT_FOUND")
    now = ctx.now()
    body = alerting.notification_body(
        {
            "kind": "falaj.monitoring.test",
            "channel": name,
            "summary": "Test notification from Falaj monitoring",
            "id": uuid.uuid4().hex,
            "time": now.isoformat(),
        }
    )
    attempt = _post(ctx, channel, body)
    return pb.NotificationDelivery(
        channel=name,
        state=pb.DELIVERY_STATE_DELIVERED if alerting.is_delivered(attempt.http_status) else pb.DELIVERY_STATE_FAILED,
        attempt_count=1,
        last_http_status=attempt.http_status,
        last_error=attempt.error,
        last_attempt_time=m.timestamp(now),
    )


def start_due_retraining(ctx: Context) -> int:
    """Ask training (through the gateway) for each pending retraining job."""
    with ctx.store.transaction() as session:
        due = ctx.store.due_retraining(session, ctx.now(), BATCH)
    for start in due:
        action = json_format.Parse(start.action_json, pb.RetrainingAction())
        count = start.attempt_count + 1
        values: dict[str, Any] = {"attempt_count": count}
        try:
            job = ctx.clients.start_retraining(
                action.template_training_job,
                overrides=dict(action.parameter_overrides),
                use_latest_dataset_version=action.use_latest_dataset_version,
                # The same id on every attempt: training creates the job once.
                request_id=f"monitoring-retraining-{start.alert}",
                display_name=f"retraining by alertRules/{start.alert_rule}",
                labels={"falaj-alert": start.alert, "falaj-alert-rule": start.alert_rule, "falaj-trigger": "monitoring"},
            )
            values.update(state="STARTED", training_job=job, error_message="", next_attempt_time=None)
            log.info("retraining started", alert=start.alert, training_job=job)
        except Unavailable as error:
            if count >= ctx.config.retraining_attempts:
                values.update(state="FAILED", error_message=error.message, next_attempt_time=None)
            else:
                delay = ctx.config.retraining_backoff_seconds * 2 ** (count - 1)
                values.update(error_message=error.message, next_attempt_time=ctx.now() + dt.timedelta(seconds=delay))
        except FalajError as error:
            values.update(state="FAILED", error_message=error.message, next_attempt_time=None)
        with ctx.store.transaction() as session:
            ctx.store.update(session, retraining_starts, start.alert, values)
    return len(due)


def close_time_windows(ctx: Context) -> None:
    with ctx.store.transaction() as session:
        monitor_ids = ctx.store.all_monitor_ids(session)
    for monitor_id in monitor_ids:
        evaluation.evaluate_due_windows(ctx, monitor_id)


def evaluate_all_rules(ctx: Context) -> None:
    with ctx.store.transaction() as session:
        monitor_ids = ctx.store.all_monitor_ids(session)
    for monitor_id in monitor_ids:
        evaluation.evaluate_rules(ctx, monitor_id)


def apply_retention(ctx: Context) -> None:
    now = ctx.now()
    with ctx.store.transaction() as session:
        monitor_ids = ctx.store.all_monitor_ids(session)
    for monitor_id in monitor_ids:
        with ctx.store.transaction() as session:
            view = evaluation.load_view(ctx, session, monitor_id)
            if view is None:
                continue
            logs = ctx.store.delete_logs_before(session, monitor_id, now - view.retention.prediction_logs)
            metrics = ctx.store.delete_metrics_before(session, monitor_id, now - view.retention.metrics)
        if logs or metrics:
            log.info("retention applied", monitor=monitor_id, prediction_logs=logs, reports_and_windows=metrics)
    with ctx.store.transaction() as session:
        ctx.store.delete_batches_before(session, now - m.DEFAULT_LOG_RETENTION)
