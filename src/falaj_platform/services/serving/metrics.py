"""Serving's own Prometheus series, read at scrape time (nothing is counted on the request path).

Route windows, batcher counters and prediction-log counters already exist in memory;
the collector turns them into samples when `/metrics` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from falaj_platform.services.serving.engine import InferenceEngine
from falaj_platform.services.serving.prediction_log import PredictionLogger


class ServingCollector(Collector):
    def __init__(self, engine: InferenceEngine, logger: PredictionLogger, window_s: float = 60.0):
        self.engine = engine
        self.logger = logger
        self.window_s = window_s

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        requests = GaugeMetricFamily(
            "falaj_serving_route_requests", "Requests per route over the last minute.", labels=["deployment", "model_version", "route"]
        )
        errors = GaugeMetricFamily(
            "falaj_serving_route_errors", "Failed requests per route over the last minute.", labels=["deployment", "model_version", "route"]
        )
        p99 = GaugeMetricFamily(
            "falaj_serving_route_latency_p99_seconds",
            "p99 latency per route over the last minute.",
            labels=["deployment", "model_version", "route"],
        )
        for deployment in list(self.engine.deployments.values()):
            for route in list(deployment.routes.values()):
                stats = route.window.stats(self.window_s)
                labels = [deployment.id, route.model_version, route.role_name]
                requests.add_metric(labels, stats.request_count)
                errors.add_metric(labels, stats.error_count)
                p99.add_metric(labels, stats.latency_p99_s)
        runs = CounterMetricFamily(
            "falaj_serving_onnxruntime_runs", "ONNX Runtime calls per loaded model version.", labels=["model_version"]
        )
        batched = CounterMetricFamily("falaj_serving_batched_requests", "Requests answered by dynamic batches.", labels=["model_version"])
        queued = GaugeMetricFamily(
            "falaj_serving_batch_queue_depth", "Requests waiting in a model's batch queue.", labels=["model_version"]
        )
        for version, model in self.engine.manager.loaded().items():
            runs.add_metric([version], model.runs)
            if model.batcher is not None:
                batched.add_metric([version], model.batcher.requests)
                queued.add_metric([version], model.batcher.queued())
        sent = CounterMetricFamily(
            "falaj_serving_prediction_log_rows_sent", "Prediction log rows delivered to monitoring.", labels=["deployment"]
        )
        dropped = CounterMetricFamily(
            "falaj_serving_prediction_log_rows_dropped",
            "Prediction log rows dropped (queue full or monitoring down).",
            labels=["deployment"],
        )
        for deployment_id in list(self.engine.deployments):
            log_stats = self.logger.stats(deployment_id)
            sent.add_metric([deployment_id], log_stats.rows_sent)
            dropped.add_metric([deployment_id], log_stats.rows_dropped)
        shadow = CounterMetricFamily("falaj_serving_shadow_requests_dropped", "Shadow copies dropped because the shadow queue was full.")
        shadow.add_metric([], self.engine.shadows_dropped)
        yield from (requests, errors, p99, runs, batched, queued, sent, dropped, shadow)
