"""Wiring of the serving service: store, model source, engine, batch jobs, management and
inference servicers.

`build_spec(...)` lets tests inject the model source, the features, experiments,
monitoring and ingest clients and the auditor; production gets the gateway-backed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from falaj.inference import open_inference_grpc_pb2, open_inference_grpc_pb2_grpc
from falaj.serving.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.metrics import ServerMetrics
from falaj_platform.runtime.service import ServiceRuntime, ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.serving.api import ServingApi
from falaj_platform.services.serving.assignment import (
    ExperimentsAssigner,
    ExperimentsExposureSink,
    ExposureRecorder,
    ExposureSink,
    VariantAssigner,
)
from falaj_platform.services.serving.batch_jobs import BatchJobService
from falaj_platform.services.serving.config import ServingConfig
from falaj_platform.services.serving.deployments import DeploymentService
from falaj_platform.services.serving.engine import InferenceEngine
from falaj_platform.services.serving.enrichment import Enricher, FeaturesClient, GatewayFeaturesClient
from falaj_platform.services.serving.inference_api import InferenceApi
from falaj_platform.services.serving.ingest_client import GatewayIngestDatasets, IngestDatasets
from falaj_platform.services.serving.metrics import ServingCollector
from falaj_platform.services.serving.models import ModelManager
from falaj_platform.services.serving.prediction_log import MonitoringSink, PredictionLogger, PredictionLogSink
from falaj_platform.services.serving.security import GatewayAuditor, ServingAuditor
from falaj_platform.services.serving.sources import ModelSource, RegistryModelSource
from falaj_platform.services.serving.store import ServingStore
from falaj_platform.services.serving.streaming import StreamPredictor


@dataclass
class Collaborators:
    """What serving talks to; None means the production client through the gateway."""

    source: ModelSource | None = None
    features: FeaturesClient | None = None
    assigner: VariantAssigner | None = None
    exposures: ExposureSink | None = None
    prediction_logs: PredictionLogSink | None = None
    auditor: ServingAuditor | None = None
    ingest: IngestDatasets | None = None


@dataclass
class ServingContext:
    """Everything a running serving replica is made of (tests look inside through on_context)."""

    config: ServingConfig
    store: ServingStore
    manager: ModelManager
    engine: InferenceEngine
    deployments: DeploymentService
    logger: PredictionLogger
    exposures: ExposureRecorder
    batch_jobs: BatchJobService
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        while self.stop_callbacks:
            self.stop_callbacks.pop()()


def build_context(runtime: ServiceRuntime, config: ServingConfig, parts: Collaborators) -> ServingContext:
    settings = runtime.settings
    auditor: ServingAuditor = parts.auditor or GatewayAuditor(settings)
    source = parts.source or RegistryModelSource(config.gateway_addr, config.pki, timeout=max(config.upstream_timeout_s, 60.0))
    manager = ModelManager(config, source, auditor)
    logger = PredictionLogger(
        parts.prediction_logs or MonitoringSink(config.gateway_addr, config.pki), send_attempts=config.prediction_log_send_attempts
    )
    assigner = parts.assigner or ExperimentsAssigner(config.gateway_addr, config.pki, refresh_s=config.assignment_config_refresh_s)
    exposures = ExposureRecorder(
        parts.exposures or ExperimentsExposureSink(config.gateway_addr, config.pki), flush_interval_s=config.exposure_flush_interval_s
    )
    enricher = Enricher(parts.features or GatewayFeaturesClient(config.gateway_addr, config.pki), config.upstream_timeout_s)
    engine = InferenceEngine(
        manager, logger, assigner=assigner, exposures=exposures, enricher=enricher, shadow_queue_size=config.shadow_queue_size
    )
    store = ServingStore(runtime.database)
    variant_versions = getattr(assigner, "variant_versions", None)
    deployments = DeploymentService(store, config, manager, engine, logger, auditor, variant_versions)
    engine.on_route_failure = deployments.nudge_judge
    runtime.metrics.registry.register(ServingCollector(engine, logger))
    ingest = parts.ingest or GatewayIngestDatasets(
        config.gateway_addr, config.pki, timeout=config.upstream_timeout_s, stream_timeout=config.batch_job_stream_timeout_s
    )
    batch_jobs = BatchJobService(store, config, engine, ingest, auditor)
    context = ServingContext(config, store, manager, engine, deployments, logger, exposures, batch_jobs)
    # Stopped in reverse: loops and jobs first, then queues are flushed, then sessions dropped.
    context.stop_callbacks += [manager.close, engine.close, logger.stop, exposures.stop, deployments.stop, batch_jobs.stop]
    if isinstance(ingest, GatewayIngestDatasets):
        context.stop_callbacks.insert(0, ingest.close)
    return context


def build_spec(
    *,
    configure: Callable[[ServingConfig], ServingConfig] = lambda config: config,
    collaborators: Callable[[ServingConfig], Collaborators] = lambda config: Collaborators(),
    on_context: Callable[[ServingContext], None] = lambda context: None,
) -> ServiceSpec:
    """The service spec; tests inject collaborators and look at the context through the hooks."""

    def setup(server: grpc.Server, runtime: ServiceRuntime) -> Iterable[str]:
        config = configure(ServingConfig.from_settings(runtime.settings))
        context = build_context(runtime, config, collaborators(config))
        on_context(context)
        service_pb2_grpc.add_ServingServiceServicer_to_server(
            ServingApi(context.deployments, StreamPredictor(context.engine), context.batch_jobs), server
        )
        open_inference_grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceApi(context.engine), server)
        context.deployments.start()
        context.batch_jobs.start()
        runtime.on_stop(context.stop)
        return [
            service_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name,
            open_inference_grpc_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ]

    def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
        # The plain form (no stop callbacks to run): for tools that only need the wiring.
        return setup(server, ServiceRuntime(database, settings, ServerMetrics(settings.component)))

    return ServiceSpec("serving", Path(__file__).parent / "migrations", register=register, setup=setup)


SPEC = build_spec()
