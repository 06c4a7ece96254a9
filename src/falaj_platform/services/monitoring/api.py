"""Thin gRPC servicer of `falaj.monitoring.v1.MonitoringService`: proto -> domain -> proto.

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the monitoring issue fills them in on top of `MonitoringStore`.
"""

from __future__ import annotations

from falaj.monitoring.v1 import service_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.monitoring.store import MonitoringStore


class MonitoringApi(service_pb2_grpc.MonitoringServiceServicer):
    def __init__(self, store: MonitoringStore, settings: Settings):
        self.store = store
        self.settings = settings
