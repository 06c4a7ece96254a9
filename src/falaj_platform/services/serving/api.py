"""Thin gRPC servicer of `falaj.serving.v1.ServingService`: proto -> domain -> proto.

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the serving issue fills them in on top of `ServingStore`.
"""

from __future__ import annotations

from falaj.serving.v1 import service_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.serving.store import ServingStore


class ServingApi(service_pb2_grpc.ServingServiceServicer):
    def __init__(self, store: ServingStore, settings: Settings):
        self.store = store
        self.settings = settings
