"""Thin gRPC servicer of `falaj.training.v1.TrainingService`: proto -> domain -> proto.

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the training issue fills them in on top of `TrainingStore`.
"""

from __future__ import annotations

from falaj.training.v1 import service_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.training.store import TrainingStore


class TrainingApi(service_pb2_grpc.TrainingServiceServicer):
    def __init__(self, store: TrainingStore, settings: Settings):
        self.store = store
        self.settings = settings
