"""Channels from one platform identity to a Falaj server, calls to other services, and the health probe."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from falaj.sdk.errors import from_rpc_error
from falaj_platform.runtime import tls
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, NotFound, Unavailable
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY, current_request_id
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


RETRIABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class GatewayChannel:
    """One mTLS channel to the gateway with a service's own identity, opened on first use.

    Services call each other only through the gateway, which authorizes them by their
    `service-<name>` role. Thread-safe; `close` may be followed by another `get`.
    """

    def __init__(self, gateway_addr: str, pki: PkiPaths):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def get(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                self._channel = secure_channel(self.gateway_addr, self.pki)
            return self._channel

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def request_id_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata passing the request id of the call being handled on to an upstream call."""
    request_id = current_request_id()
    return ((REQUEST_ID_KEY, request_id),) if request_id else ()


def upstream_error(error: grpc.RpcError, what: str, upstream: str, *, denied_hint: str = "") -> FalajError:
    """The error to answer when a call to another service failed while doing `what`.

    NOT_FOUND and FAILED_PRECONDITION pass on (what the caller named is missing or not
    ready); UNAVAILABLE and DEADLINE_EXCEEDED become UNAVAILABLE (retry later); anything
    else, a refusal of the service's own identity above all, is an operator's problem and
    becomes FAILED_PRECONDITION, with `denied_hint` saying what to fix for PERMISSION_DENIED.
    """
    typed = from_rpc_error(error)
    prefix = upstream.upper()
    if isinstance(typed, NotFound | FailedPrecondition):
        typed.message = f"{what}: {typed.message}"
        return typed
    if typed.code in RETRIABLE:
        return Unavailable(f"{what}: the {upstream} service is unavailable ({typed.message})", reason=f"{prefix}_UNAVAILABLE")
    if typed.code == grpc.StatusCode.PERMISSION_DENIED and denied_hint:
        return FailedPrecondition(
            f"{what}: {upstream} refused this service's identity ({typed.message}); {denied_hint}", reason=f"{prefix}_ACCESS_DENIED"
        )
    return FailedPrecondition(f"{what}: {upstream} answered {typed.code.name}: {typed.message}", reason=f"{prefix}_{typed.code.name}")


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
