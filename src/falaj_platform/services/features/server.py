"""Wiring of the features service: store + servicer on the shared runtime."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc

from falaj.features.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.features.api import FeaturesApi
from falaj_platform.services.features.store import FeaturesStore


def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
    # RPCs the servicer does not define yet answer UNIMPLEMENTED (the generated base does that).
    api = FeaturesApi(FeaturesStore(database), settings)  # type: ignore[abstract]
    service_pb2_grpc.add_FeaturesServiceServicer_to_server(api, server)
    return [service_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name]


SPEC = ServiceSpec("features", Path(__file__).parent / "migrations", register)
