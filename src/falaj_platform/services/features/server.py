"""Wiring of the features service: Feast store, catalog, servicers and scheduler on the shared runtime.

The same server answers `falaj.features.v1.FeaturesService` and Feast's own
`feast.serving.ServingService` (the stubs ship in the feast package).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from feast.protos.feast.serving import ServingService_pb2_grpc as feast_serving_grpc

from falaj.features.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.audit import AuditReporter
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceRuntime, ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.features.api import FeastServingApi, FeaturesApi
from falaj_platform.services.features.catalog import Auditor, Catalog
from falaj_platform.services.features.config import FeaturesConfig, load_features_config
from falaj_platform.services.features.erasure import Eraser
from falaj_platform.services.features.feast_repo import FeastRepo
from falaj_platform.services.features.ingest_client import IngestDatasetSource
from falaj_platform.services.features.materialization import Materializer, OfflineData, Scheduler
from falaj_platform.services.features.retrieval import Reader
from falaj_platform.services.features.sources import DatasetSource
from falaj_platform.services.features.store import FeaturesStore

FEAST_SERVING_SERVICE = "feast.serving.ServingService"


@dataclass
class FeaturesService:
    """Everything one running features service is made of (tests reach into it)."""

    config: FeaturesConfig
    store: FeaturesStore
    repo: FeastRepo
    source: DatasetSource
    catalog: Catalog
    offline: OfflineData
    materializer: Materializer
    reader: Reader
    eraser: Eraser
    scheduler: Scheduler


def build_service(
    database: Database,
    config: FeaturesConfig,
    *,
    source: DatasetSource | None = None,
    audit: Auditor,
    schedule_poll_seconds: float = 5.0,
    version_poll_seconds: float = 60.0,
) -> FeaturesService:
    store = FeaturesStore(database)
    repo = FeastRepo(config)
    source = source or IngestDatasetSource(config.gateway_addr, config.pki, timeout=config.ingest_timeout_seconds)
    reader_holder: list[Reader] = []

    def changed() -> None:
        for reader in reader_holder:
            reader.invalidate()

    catalog = Catalog(store, repo, source, audit, config, on_change=changed)
    offline = OfflineData(store, repo, source, catalog)
    materializer = Materializer(store, repo, source, offline, config, on_change=changed)
    reader = Reader(store, repo, source, offline, config)
    reader_holder.append(reader)
    eraser = Eraser(store, repo, source, audit)
    scheduler = Scheduler(store, source, materializer, poll_seconds=schedule_poll_seconds, version_poll_seconds=version_poll_seconds)
    catalog.reconcile()
    materializer.recover()
    return FeaturesService(config, store, repo, source, catalog, offline, materializer, reader, eraser, scheduler)


def build_spec(
    *,
    source: Callable[[FeaturesConfig], DatasetSource] | None = None,
    audit: Callable[[Settings], Auditor] = AuditReporter,
    configure: Callable[[FeaturesConfig], FeaturesConfig] = lambda config: config,
    schedule_poll_seconds: float = 5.0,
    version_poll_seconds: float = 60.0,
    on_service: Callable[[FeaturesService], None] = lambda service: None,
) -> ServiceSpec:
    """The service spec; tests inject a dataset source, an audit reporter and config overrides."""

    def setup(server: grpc.Server, runtime: ServiceRuntime) -> Iterable[str]:
        settings = runtime.settings
        config = configure(load_features_config(settings))
        service = build_service(
            runtime.database,
            config,
            source=source(config) if source is not None else None,
            audit=audit(settings),
            schedule_poll_seconds=schedule_poll_seconds,
            version_poll_seconds=version_poll_seconds,
        )
        service_pb2_grpc.add_FeaturesServiceServicer_to_server(
            FeaturesApi(service.store, service.catalog, service.materializer, service.reader, service.offline, service.eraser), server
        )
        feast_serving_grpc.add_ServingServiceServicer_to_server(FeastServingApi(service.reader), server)
        # The scheduler (and the background runs with it) stops after the server stops serving.
        service.scheduler.start()
        runtime.on_stop(service.scheduler.stop)
        on_service(service)
        return [service_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name, FEAST_SERVING_SERVICE]

    return ServiceSpec("features", Path(__file__).parent / "migrations", setup=setup)


SPEC = build_spec()
