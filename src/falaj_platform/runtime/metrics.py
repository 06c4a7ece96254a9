"""Prometheus metrics every Falaj server exports on its own `/metrics` endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from falaj_platform.runtime.errors import StartupError


class ServerMetrics:
    """Requests, latency and in-flight gauges, labelled by full gRPC method."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "falaj_grpc_requests_total",
            "gRPC requests handled, by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "falaj_grpc_request_duration_seconds",
            "gRPC request latency in seconds.",
            ["service", "method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "falaj_grpc_requests_in_flight",
            "gRPC requests being handled now.",
            ["service"],
            registry=self.registry,
        )
        self.service = service

    def serve_http(self, addr: str) -> int:
        """Expose `/metrics` on addr (host:port, port 0 picks one); returns the port."""
        host, _, port = addr.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise StartupError(f"cannot listen for metrics on {addr}: {exc.strerror}") from None
        return int(server.server_port)
