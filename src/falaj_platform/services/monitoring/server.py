"""Wiring of the monitoring service: store + servicer on the shared runtime."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc

from falaj.monitoring.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.monitoring.api import MonitoringApi
from falaj_platform.services.monitoring.store import MonitoringStore


def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
    # RPCs the servicer does not define yet answer UNIMPLEMENTED (the generated base does that).
    api = MonitoringApi(MonitoringStore(database), settings)  # type: ignore[abstract]
    service_pb2_grpc.add_MonitoringServiceServicer_to_server(api, server)
    return [service_pb2.DESCRIPTOR.services_by_name["MonitoringService"].full_name]


SPEC = ServiceSpec("monitoring", Path(__file__).parent / "migrations", register)
