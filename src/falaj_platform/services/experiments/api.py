"""Thin gRPC servicer of `falaj.experiments.v1.ExperimentsService`: proto -> domain -> proto.

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the experiments issue fills them in on top of `ExperimentsStore`.
"""

from __future__ import annotations

from falaj.experiments.v1 import service_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.experiments.store import ExperimentsStore


class ExperimentsApi(service_pb2_grpc.ExperimentsServiceServicer):
    def __init__(self, store: ExperimentsStore, settings: Settings):
        self.store = store
        self.settings = settings
