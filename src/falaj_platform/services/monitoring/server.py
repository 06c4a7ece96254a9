"""Wiring of the monitoring service: store, context, servicer and worker on the shared runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from falaj.monitoring.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.audit import AuditReporter
from falaj_platform.runtime.service import ServiceRuntime, ServiceSpec
from falaj_platform.services.monitoring.api import MonitoringApi
from falaj_platform.services.monitoring.config import MonitoringConfig
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.metrics import MonitoringMetrics
from falaj_platform.services.monitoring.store import MonitoringStore
from falaj_platform.services.monitoring.upstream import GatewayClients
from falaj_platform.services.monitoring.worker import Worker


def build_spec(
    *,
    configure: Callable[[MonitoringConfig], MonitoringConfig] = lambda config: config,
    on_context: Callable[[Context], None] = lambda ctx: None,
) -> ServiceSpec:
    """The service spec; tests tune the worker's pace and look at the context through the hooks."""

    def setup(server: grpc.Server, runtime: ServiceRuntime) -> Iterable[str]:
        config = configure(MonitoringConfig.from_settings(runtime.settings))
        ctx = Context(
            store=MonitoringStore(runtime.database),
            config=config,
            clients=GatewayClients(config.gateway_addr, config.pki, timeout=config.upstream_timeout_seconds),
            # Drift and quality gauges go to the registry the runtime serves on /metrics.
            metrics=MonitoringMetrics(runtime.metrics.registry),
            audit=AuditReporter(runtime.settings),
        )
        on_context(ctx)
        service_pb2_grpc.add_MonitoringServiceServicer_to_server(MonitoringApi(ctx), server)
        worker = Worker(ctx)
        worker.start()
        runtime.on_stop(worker.stop)
        return [service_pb2.DESCRIPTOR.services_by_name["MonitoringService"].full_name]

    return ServiceSpec("monitoring", Path(__file__).parent / "migrations", setup=setup)


SPEC = build_spec()
