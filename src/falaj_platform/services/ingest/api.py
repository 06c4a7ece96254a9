"""Thin gRPC servicer of `falaj.ingest.v1.IngestService`: proto -> domain -> proto.

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the ingest issue fills them in on top of `IngestStore`.
"""

from __future__ import annotations

from falaj.ingest.v1 import service_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.ingest.store import IngestStore


class IngestApi(service_pb2_grpc.IngestServiceServicer):
    def __init__(self, store: IngestStore, settings: Settings):
        self.store = store
        self.settings = settings
