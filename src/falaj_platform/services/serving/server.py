"""Wiring of the serving service: store + management and inference servicers on the shared runtime."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc

from falaj.inference import open_inference_grpc_pb2, open_inference_grpc_pb2_grpc
from falaj.serving.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.serving.api import ServingApi
from falaj_platform.services.serving.inference_api import InferenceApi
from falaj_platform.services.serving.store import ServingStore


def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
    store = ServingStore(database)
    # RPCs the servicers do not define yet answer UNIMPLEMENTED (the generated bases do that).
    management_api = ServingApi(store, settings)  # type: ignore[abstract]
    inference_api = InferenceApi(store, settings)  # type: ignore[abstract]
    service_pb2_grpc.add_ServingServiceServicer_to_server(management_api, server)
    open_inference_grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference_api, server)
    return [
        service_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name,
        open_inference_grpc_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    ]


SPEC = ServiceSpec("serving", Path(__file__).parent / "migrations", register)
