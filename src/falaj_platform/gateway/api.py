"""Thin servicer of `falaj.gateway.v1.GatewayAdminService` (policies, roles, revocations, audit).

Methods not yet implemented answer UNIMPLEMENTED (the generated base class does that);
the gateway issue fills them in on top of `GatewayStore`.
"""

from __future__ import annotations

from falaj.gateway.v1 import service_pb2_grpc
from falaj_platform.gateway.store import GatewayStore
from falaj_platform.runtime.settings import Settings


class GatewayAdminApi(service_pb2_grpc.GatewayAdminServiceServicer):
    def __init__(self, store: GatewayStore, settings: Settings):
        self.store = store
        self.settings = settings
