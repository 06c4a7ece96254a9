"""Alert rules close the loop: an alert fires, reaches a real webhook receiver (retried when
the receiver fails), resolves; a rule starts a retraining job in training through the
gateway."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from falaj.monitoring.v1 import message_pb2 as pb
from falaj.monitoring.v1 import request_response_pb2 as rr
from tests.monitoring.conftest import FakeGateway, MonitoringClient, WebhookReceiver, eventually, log_table

SECRET = "webhook-signing-secret"


def _channel(monitoring: MonitoringClient, webhook: WebhookReceiver, **retry: object) -> str:
    channel = pb.NotificationChannel(
        display_name="risk on-call",
        webhook=pb.WebhookConfig(url=webhook.url, signing_secret=SECRET, headers={"X-Team": "risk"}),
        retry=pb.RetryPolicy(max_attempts=3, initial_backoff=duration_pb2.Duration(nanos=50_000_000), **retry),  # type: ignore[arg-type]
        notify_on_resolve=True,
        enabled=True,
    )
    created = monitoring.CreateNotificationChannel(rr.CreateNotificationChannelRequest(channel_id="oncall", channel=channel)).channel
    assert created.webhook.has_signing_secret and not created.webhook.signing_secret
    return created.name


def _drift_rule(monitoring: MonitoringClient, channel: str, **fields: object) -> pb.AlertRule:
    rule = pb.AlertRule(
        display_name="Churn inputs drifted",
        description="Half the churn model's inputs moved; check the upstream feature pipeline.",
        monitor="modelMonitors/churn",
        metric=pb.ALERT_METRIC_DRIFT_SHARE,
        comparator=pb.COMPARATOR_GREATER_THAN,
        threshold=0.3,
        severity=pb.ALERT_SEVERITY_CRITICAL,
        notification_channels=[channel],
        enabled=True,
        labels={"runbook": "drift"},
        **fields,  # type: ignore[arg-type]
    )
    return monitoring.CreateAlertRule(rr.CreateAlertRuleRequest(rule_id="churn-drift", rule=rule)).rule


def test_alert_fires_reaches_the_webhook_and_resolves(monitoring: MonitoringClient, webhook: WebhookReceiver) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=400)
    channel = _channel(monitoring, webhook)
    _drift_rule(monitoring, channel)
    webhook.statuses.extend([503])  # the first attempt fails; the retry gets through

    monitoring.ingest(log_table(400, shift=0.8))
    [firing] = monitoring.ListAlerts(rr.ListAlertsRequest(monitor="modelMonitors/churn")).alerts
    assert firing.state == pb.ALERT_STATE_FIRING and firing.severity == pb.ALERT_SEVERITY_CRITICAL
    assert firing.value > 0.3 and "drift share" in firing.summary
    assert firing.labels["team"] == "risk" and firing.labels["runbook"] == "drift"

    first, second = webhook.wait_for(2)[:2]
    assert first.body == second.body  # the retry resends the same notification
    notice = second.json
    assert (notice["state"], notice["alert"], notice["severity"]) == ("FIRING", firing.name, "CRITICAL")
    assert second.headers["x-team"] == "risk"
    assert second.headers["x-falaj-signature"] == "sha256=" + hmac.new(SECRET.encode(), second.body, hashlib.sha256).hexdigest()
    eventually(
        lambda: monitoring.GetAlert(rr.GetAlertRequest(name=firing.name)).alert.notifications[0].state == pb.DELIVERY_STATE_DELIVERED
    )
    [delivery] = monitoring.GetAlert(rr.GetAlertRequest(name=firing.name)).alert.notifications
    assert (delivery.attempt_count, delivery.last_http_status, delivery.alert_state) == (2, 204, pb.ALERT_STATE_FIRING)

    acknowledged = monitoring.AcknowledgeAlert(rr.AcknowledgeAlertRequest(name=firing.name, note="looking")).alert
    assert acknowledged.acknowledged.actor == "spiffe://falaj.local/client/alice" and acknowledged.state == pb.ALERT_STATE_FIRING

    monitoring.ingest(log_table(400, start=400, seed=9))
    resolved = monitoring.GetAlert(rr.GetAlertRequest(name=firing.name)).alert
    assert resolved.state == pb.ALERT_STATE_RESOLVED and resolved.resolve_time.seconds > 0
    assert webhook.wait_for(3)[2].json["state"] == "RESOLVED"
    history = monitoring.ListAlerts(rr.ListAlertsRequest(alert_rule="alertRules/churn-drift", state=pb.ALERT_STATE_RESOLVED)).alerts
    assert [a.name for a in history] == [firing.name]
    assert monitoring.running.metrics.registry.get_sample_value("falaj_monitoring_alerts_firing", {"monitor": "churn"}) == 0.0


def test_for_duration_keeps_an_alert_pending_until_it_held_long_enough(monitoring: MonitoringClient, webhook: WebhookReceiver) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=400)
    _drift_rule(monitoring, _channel(monitoring, webhook), for_duration=duration_pb2.Duration(nanos=600_000_000))
    monitoring.ingest(log_table(400, shift=0.8))
    [pending] = monitoring.ListAlerts(rr.ListAlertsRequest()).alerts
    assert pending.state == pb.ALERT_STATE_PENDING and not webhook.deliveries
    # The worker re-checks rules and fires once the condition held for 0.6 s.
    eventually(lambda: monitoring.GetAlert(rr.GetAlertRequest(name=pending.name)).alert.state == pb.ALERT_STATE_FIRING)
    assert webhook.wait_for(1)[0].json["state"] == "FIRING"


def test_a_firing_rule_starts_a_retraining_job_through_the_gateway(
    monitoring: MonitoringClient, webhook: WebhookReceiver, fake_gateway: FakeGateway
) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=400)
    action = pb.RetrainingAction(
        enabled=True,
        template_training_job="trainingJobs/churn-base",
        parameter_overrides={"hyperparameters.learning_rate": "0.0005", "hyperparameters.epochs": "20"},
        use_latest_dataset_version=True,
        cooldown=duration_pb2.Duration(seconds=3600),
    )
    rule = _drift_rule(monitoring, _channel(monitoring, webhook), retraining=action)
    assert rule.retraining.parameter_overrides["hyperparameters.epochs"] == "20"
    fake_gateway.training_down = True  # the first attempt finds training unavailable; it is retried

    monitoring.ingest(log_table(400, shift=0.8))
    [alert] = monitoring.ListAlerts(rr.ListAlertsRequest()).alerts
    eventually(lambda: bool(monitoring.GetAlert(rr.GetAlertRequest(name=alert.name)).alert.retraining.error_message))
    assert "UNAVAILABLE" in monitoring.GetAlert(rr.GetAlertRequest(name=alert.name)).alert.retraining.error_message
    fake_gateway.training_down = False
    eventually(lambda: bool(monitoring.GetAlert(rr.GetAlertRequest(name=alert.name)).alert.retraining.training_job), timeout=20)
    started = monitoring.GetAlert(rr.GetAlertRequest(name=alert.name)).alert.retraining
    assert started.training_job == "trainingJobs/retrain-1" and started.error_message == ""

    [create] = fake_gateway.named("CreateTrainingJob")
    assert create.training_job.spec.hyperparameters.learning_rate == 0.0005
    assert create.training_job.spec.hyperparameters.epochs == 20
    assert create.training_job.spec.seed == 7  # the rest of the template's spec is kept
    assert create.training_job.spec.data.entities.dataset_version == "datasets/churn/versions/9"
    assert create.request_id == f"monitoring-retraining-{alert.name.split('/')[1]}"
    assert create.training_job.labels["falaj-alert-rule"] == "churn-drift"
    assert {identity for name, identity, _ in fake_gateway.calls} == {"spiffe://falaj.local/service/monitoring"}

    # Resolved and fired again within the cooldown: no second job.
    monitoring.ingest(log_table(400, start=400, seed=9))
    monitoring.ingest(log_table(400, start=800, seed=10, shift=0.8))
    second = monitoring.ListAlerts(rr.ListAlertsRequest(state=pb.ALERT_STATE_FIRING)).alerts[0]
    assert second.name != alert.name and second.retraining.error_message.startswith("cooldown")
    assert len(fake_gateway.named("CreateTrainingJob")) == 1


def test_rules_and_channels_are_validated_and_managed(monitoring: MonitoringClient, webhook: WebhookReceiver) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor()
    channel = _channel(monitoring, webhook)

    def refused(rule: pb.AlertRule) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as raised:
            monitoring.CreateAlertRule(rr.CreateAlertRuleRequest(rule_id="bad", rule=rule))
        return raised.value.code()

    base = {"monitor": "modelMonitors/churn", "comparator": pb.COMPARATOR_GREATER_THAN, "threshold": 1.0}
    assert refused(pb.AlertRule(metric=pb.ALERT_METRIC_COLUMN_DRIFT_STATISTIC, **base)) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[arg-type]
    assert refused(pb.AlertRule(metric=pb.ALERT_METRIC_QUALITY, **base)) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[arg-type]
    override = pb.RetrainingAction(enabled=True, template_training_job="trainingJobs/x", parameter_overrides={"hyperparameters.nope": "1"})
    assert refused(pb.AlertRule(metric=pb.ALERT_METRIC_ERROR_RATE, retraining=override, **base)) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[arg-type]
    missing = pb.AlertRule(metric=pb.ALERT_METRIC_ERROR_RATE, notification_channels=["notificationChannels/none"], **base)  # type: ignore[arg-type]
    assert refused(missing) == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as raised:
        monitoring.CreateNotificationChannel(
            rr.CreateNotificationChannelRequest(
                channel_id="plain", channel=pb.NotificationChannel(webhook=pb.WebhookConfig(url="http://example.com/hook"))
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "https" in (raised.value.details() or "")

    rule = _drift_rule(monitoring, channel)
    mask = field_mask_pb2.FieldMask(paths=["threshold", "enabled"])
    updated = monitoring.UpdateAlertRule(rr.UpdateAlertRuleRequest(rule=pb.AlertRule(name=rule.name, threshold=0.6), update_mask=mask)).rule
    assert updated.threshold == 0.6 and not updated.enabled and updated.notification_channels == [channel]
    with pytest.raises(grpc.RpcError) as raised:
        monitoring.DeleteNotificationChannel(rr.DeleteNotificationChannelRequest(name=channel))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    monitoring.DeleteNotificationChannel(rr.DeleteNotificationChannelRequest(name=channel, force=True))
    assert list(monitoring.GetAlertRule(rr.GetAlertRuleRequest(name=rule.name)).rule.notification_channels) == []
    monitoring.DeleteAlertRule(rr.DeleteAlertRuleRequest(name=rule.name))
    assert monitoring.ListAlertRules(rr.ListAlertRulesRequest(monitor="modelMonitors/churn")).rules == []


def test_test_notification_reports_the_delivery(monitoring: MonitoringClient, webhook: WebhookReceiver) -> None:
    channel = _channel(monitoring, webhook)
    webhook.statuses.append(500)
    failed = monitoring.TestNotificationChannel(rr.TestNotificationChannelRequest(name=channel)).delivery
    assert (failed.state, failed.last_http_status, failed.attempt_count) == (pb.DELIVERY_STATE_FAILED, 500, 1)
    delivered = monitoring.TestNotificationChannel(rr.TestNotificationChannelRequest(name=channel)).delivery
    assert delivered.state == pb.DELIVERY_STATE_DELIVERED and webhook.deliveries[-1].json["kind"] == "falaj.monitoring.test"
    assert dt.timedelta(seconds=1) > dt.timedelta(0)
