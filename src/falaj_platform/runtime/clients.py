"""Channels from one platform identity to a Falaj server, and the health probe."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from falaj_platform.runtime import tls
from falaj_platform.runtime.settings import PkiPaths

# grpc's default reconnect backoff grows to 120 s: after a service restarts, its callers
# (the gateway above all) would answer UNAVAILABLE for tens of seconds. Services on the
# platform's network come back in seconds, so retry connecting at most every 2 s.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def secure_channel(addr: str, pki: PkiPaths) -> grpc.Channel:
    """An mTLS channel to `addr` presenting the identity in `pki`; servers are verified as localhost."""
    options = [("grpc.ssl_target_name_override", "localhost"), *RECONNECT_OPTIONS]
    return grpc.secure_channel(addr, tls.channel_credentials(pki), options=options)


def health_status(addr: str, pki: PkiPaths, timeout: float = 2.0, service: str = "") -> str:
    """'SERVING', 'NOT_SERVING', ... or 'UNREACHABLE' for the server at addr."""
    with secure_channel(addr, pki) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            return (
                "UNREACHABLE"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else f"ERROR:{code.name if code else '?'}"
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
