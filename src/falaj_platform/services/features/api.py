"""Thin gRPC servicer of `falaj.features.v1.FeaturesService`: proto -> domain -> proto.

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the features issue fills them in on top of `FeaturesStore`.
"""

from __future__ import annotations

from falaj.features.v1 import service_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.features.store import FeaturesStore


class FeaturesApi(service_pb2_grpc.FeaturesServiceServicer):
    def __init__(self, store: FeaturesStore, settings: Settings):
        self.store = store
        self.settings = settings
