"""Wiring of the experiments service: store + servicer on the shared runtime."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc

from falaj.experiments.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.experiments.api import ExperimentsApi
from falaj_platform.services.experiments.store import ExperimentsStore


def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
    # RPCs the servicer does not define yet answer UNIMPLEMENTED (the generated base does that).
    api = ExperimentsApi(ExperimentsStore(database), settings)  # type: ignore[abstract]
    service_pb2_grpc.add_ExperimentsServiceServicer_to_server(api, server)
    return [service_pb2.DESCRIPTOR.services_by_name["ExperimentsService"].full_name]


SPEC = ServiceSpec("experiments", Path(__file__).parent / "migrations", register)
