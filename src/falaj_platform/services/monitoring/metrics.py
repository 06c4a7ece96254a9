"""Drift, quality and serving figures as Prometheus gauges, next to the runtime's RPC metrics.

Gauges hold the latest window's values per monitor; they are set whenever a window is
evaluated, so a scrape always shows what the last report said.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from falaj_platform.services.monitoring.drift import DatasetDrift
from falaj_platform.services.monitoring.quality import Metric, OperationalFigures


class MonitoringMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        labels = ["monitor", "model_version"]
        self.drift_share = Gauge(
            "falaj_monitoring_drift_share", "Share of drifted features in the latest window.", labels, registry=registry
        )
        self.dataset_drift = Gauge(
            "falaj_monitoring_dataset_drift", "1 when the latest window's dataset drifted, else 0.", labels, registry=registry
        )
        self.column_drift = Gauge(
            "falaj_monitoring_column_drift_statistic",
            "Drift statistic of each column in the latest window.",
            [*labels, "column", "method"],
            registry=registry,
        )
        self.column_drifted = Gauge(
            "falaj_monitoring_column_drifted", "1 when the column drifted in the latest window.", [*labels, "column"], registry=registry
        )
        self.quality = Gauge(
            "falaj_monitoring_quality", "Model quality metric over the latest labelled window.", [*labels, "metric"], registry=registry
        )
        self.latency_p99 = Gauge(
            "falaj_monitoring_latency_p99_seconds", "p99 serving latency in the latest window.", labels, registry=registry
        )
        self.error_rate = Gauge("falaj_monitoring_error_rate", "Share of failed requests in the latest window.", labels, registry=registry)
        self.throughput = Gauge(
            "falaj_monitoring_throughput_per_second", "Requests per second in the latest window.", labels, registry=registry
        )
        self.ingested_rows = Counter(
            "falaj_monitoring_ingested_rows", "Prediction log rows received, by outcome.", ["outcome"], registry=registry
        )
        self.alerts_firing = Gauge("falaj_monitoring_alerts_firing", "Alerts firing now.", ["monitor"], registry=registry)
        self.notifications = Counter(
            "falaj_monitoring_notification_attempts", "Webhook delivery attempts, by result.", ["result"], registry=registry
        )

    def observe_drift(self, monitor: str, model_version: str, result: DatasetDrift) -> None:
        self.drift_share.labels(monitor, model_version).set(result.drift_share)
        self.dataset_drift.labels(monitor, model_version).set(1.0 if result.dataset_drift else 0.0)
        for column in result.columns:
            if column.tested:
                self.column_drift.labels(monitor, model_version, column.column, column.method.value).set(column.statistic)
                self.column_drifted.labels(monitor, model_version, column.column).set(1.0 if column.drifted else 0.0)

    def observe_quality(self, monitor: str, model_version: str, values: dict[Metric, float]) -> None:
        for metric, value in values.items():
            self.quality.labels(monitor, model_version, metric.value).set(value)

    def observe_operations(self, monitor: str, model_version: str, figures: OperationalFigures) -> None:
        self.latency_p99.labels(monitor, model_version).set(figures.latency_p99_ms / 1000.0)
        self.error_rate.labels(monitor, model_version).set(figures.error_rate)
        self.throughput.labels(monitor, model_version).set(figures.throughput_per_second)
