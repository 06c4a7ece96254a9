"""Wiring of the ingest service: store + servicer on the shared runtime."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

from falaj.ingest.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.audit import AuditReporter
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceRuntime, ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.ingest import access
from falaj_platform.services.ingest.api import IngestApi
from falaj_platform.services.ingest.config import IngestConfig, load_ingest_config
from falaj_platform.services.ingest.residency import AuditSink
from falaj_platform.services.ingest.store import IngestStore


def build(database: Database, settings: Settings, *, audit: AuditSink | None = None, config: IngestConfig | None = None) -> IngestApi:
    """The servicer, recovered from any unclean stop and with its background sources started."""
    config = config or load_ingest_config()
    # Imports never read the platform's own databases (ingest's own included) ...
    databases = {**config.platform_databases, settings.component: settings.database_url}
    sqlite_files = [f + suffix for url in databases.values() for f in access.sqlite_files_of(url) for suffix in ("", "-wal", "-journal")]
    # ... nor FALAJ_HOME (every store, keys), the PKI folder or a SQLite store kept elsewhere.
    roots = (*config.protected_roots, settings.home, settings.pki_dir, *sqlite_files)
    protected = tuple(dict.fromkeys(os.path.realpath(str(p)) for p in roots))
    config = dataclasses.replace(config, protected_roots=protected, platform_databases=databases)
    api = IngestApi(IngestStore(database), settings, audit=audit or AuditReporter(settings), config=config)
    api.start()
    return api


def serve(server: grpc.Server, api: IngestApi) -> list[str]:
    service_pb2_grpc.add_IngestServiceServicer_to_server(api, server)
    return [service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]


def setup(server: grpc.Server, runtime: ServiceRuntime) -> Iterable[str]:
    api = build(runtime.database, runtime.settings)
    # Sources and queued imports stop after the server stops serving, before the store closes.
    runtime.on_stop(api.close)
    return serve(server, api)


SPEC = ServiceSpec("ingest", Path(__file__).parent / "migrations", setup=setup)
