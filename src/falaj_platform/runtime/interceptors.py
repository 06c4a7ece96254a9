"""The one server interceptor: request ids, logs, metrics, caller checks and error mapping.

It wraps all four handler kinds, so a servicer only raises typed domain errors and
never touches status codes, logging or metrics itself.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from falaj_platform.runtime.errors import FalajError, PermissionDenied, Unauthenticated, Unavailable
from falaj_platform.runtime.identity import CALLER_METADATA_KEY, peer_spiffe_id
from falaj_platform.runtime.metrics import ServerMetrics

REQUEST_ID_KEY = "x-request-id"

# Health and reflection answer any certificate from the platform CA, so the stack and
# operators can probe a service directly; everything else must come through the gateway.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

log = structlog.get_logger()


def current_request_id() -> str:
    """The request id of the call this thread is handling ('' outside a call)."""
    return str(structlog.contextvars.get_contextvars().get("request_id", ""))


def current_caller() -> str:
    """SPIFFE ID of the original caller of the call this thread is handling ('' outside a call).

    Behind the gateway this is the identity the gateway authenticated, not the gateway's.
    """
    return str(structlog.contextvars.get_contextvars().get("peer") or "")


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A final status with its trailing metadata (the rich status plus the request id)."""


def _with_request_id(status: status_pb2.Status) -> grpc.Status:
    base = rpc_status.to_status(status)
    return _Status(base.code, base.details, (*base.trailing_metadata, (REQUEST_ID_KEY, current_request_id())))


def status_for(error: FalajError, domain: str) -> grpc.Status:
    """A `google.rpc.Status` carrying one ErrorInfo for a domain error."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return _with_request_id(status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail]))


_INTERNAL_STATUS = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the service log for the request id")


class CallerPolicy:
    """Who may call a server directly: the gateway only (services) or any platform client (gateway)."""

    def __init__(self, allowed_peers: frozenset[str] | None):
        self.allowed_peers = allowed_peers  # None: any authenticated platform identity

    def caller(self, method: str, context: grpc.ServicerContext, metadata: dict[str, str]) -> str:
        peer = peer_spiffe_id(context)
        if peer is None:
            raise Unauthenticated("a client certificate with a Falaj SPIFFE ID is required", reason="NO_PEER_IDENTITY")
        if method.startswith(OPEN_METHOD_PREFIXES) or self.allowed_peers is None:
            return peer
        if peer not in self.allowed_peers:
            raise PermissionDenied(
                f"{peer} may not call this service directly; call it through the gateway",
                reason="DIRECT_CALL_REFUSED",
            )
        # Behind the gateway the real caller travels in metadata set by the gateway.
        return metadata.get(CALLER_METADATA_KEY, peer)


@dataclass
class CallInfo:
    """What the runtime knows about one call; hooks may add the authorization decision."""

    method: str
    caller: str
    request_id: str
    metadata: dict[str, str]
    source_address: str
    decision: str = ""
    reason: str = ""
    domain: str = ""


class CallHooks(Protocol):
    """Per-call extension points (the gateway uses them for authorization and audit)."""

    def authorize(self, call: CallInfo, context: grpc.ServicerContext) -> None:
        """Raise a FalajError (PermissionDenied, Unauthenticated) to refuse the call."""

    def completed(self, call: CallInfo, code: grpc.StatusCode, duration_s: float) -> None:
        """Runs before the final status reaches the client (an audit record commits here)."""


_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RuntimeInterceptor(grpc.ServerInterceptor):
    """Request id, caller identity, structured log line, metrics, hooks and error mapping."""

    def __init__(self, service: str, metrics: ServerMetrics, caller_policy: CallerPolicy, hooks: CallHooks | None = None):
        self.service = service
        self.domain = f"{service}.falaj.local"
        self.metrics = metrics
        self.caller_policy = caller_policy
        self.hooks = hooks
        # Labelled children looked up once: prometheus_client's labels() takes a lock.
        self._in_flight = metrics.in_flight.labels(service)
        self._counts: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._latencies: dict[str, Any] = {}

    def _count(self, method: str, code: grpc.StatusCode) -> Any:
        child = self._counts.get((method, code))
        if child is None:
            child = self._counts[(method, code)] = self.metrics.requests.labels(self.service, method, code.name)
        return child

    def _latency(self, method: str) -> Any:
        child = self._latencies.get(method)
        if child is None:
            child = self._latencies[method] = self.metrics.latency.labels(self.service, method)
        return child

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        wrap = self._wrap_unary if not handler.response_streaming else self._wrap_stream
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer
        )

    # -- per-call bookkeeping -------------------------------------------------------
    def _begin(self, method: str, context: grpc.ServicerContext) -> CallInfo:
        self._in_flight.inc()
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        request_id = metadata.get(REQUEST_ID_KEY, "")
        if not _REQUEST_ID_PATTERN.match(request_id):
            request_id = os.urandom(16).hex()  # absent, or not safe to log and forward
        structlog.contextvars.bind_contextvars(method=method, request_id=request_id, peer=None)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        call = CallInfo(method=method, caller="", request_id=request_id, metadata=metadata, source_address=context.peer())
        call.caller = self.caller_policy.caller(method, context, metadata)
        structlog.contextvars.bind_contextvars(peer=call.caller)
        return call

    def _end(self, method: str, started: float, code: grpc.StatusCode, call: CallInfo | None, context: grpc.ServicerContext) -> None:
        elapsed = time.perf_counter() - started
        failure: grpc.Status | None = None
        if self.hooks is not None:
            if call is None:  # refused before the call was identified
                call = CallInfo(method=method, caller="", request_id=current_request_id(), metadata={}, source_address=context.peer())
            try:
                self.hooks.completed(call, code, elapsed)
            except Exception as error:  # noqa: BLE001 - fail closed, below
                # A call whose completion hook (the audit record) fails is refused.
                typed = error if isinstance(error, FalajError) else Unavailable("the call could not be recorded", reason="HOOK_FAILED")
                log.error("call completion hook failed", error=str(error))
                failure, code = status_for(typed, self.domain), typed.code
        self._in_flight.dec()
        self._count(method, code).inc()
        self._latency(method).observe(elapsed)
        log.info("rpc", code=code.name, duration_ms=round(elapsed * 1000, 3))
        structlog.contextvars.unbind_contextvars("method", "request_id", "peer")
        if failure is not None:
            context.abort_with_status(failure)

    def _fail(self, exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
        """Set the call's status from an exception and raise; returns only for the type checker."""
        if isinstance(exc, FalajError):
            context.abort_with_status(status_for(exc, self.domain))
        aborted = context.code()
        if isinstance(aborted, grpc.StatusCode) and aborted is not grpc.StatusCode.OK:
            raise exc  # the servicer aborted on its own; keep its status
        if isinstance(exc, GeneratorExit) or (isinstance(exc, grpc.RpcError) and not context.is_active()):
            raise exc  # the client went away mid-stream (cancelled, or its deadline passed)
        log.error("unhandled exception", exc_info=exc)
        context.abort_with_status(_with_request_id(_INTERNAL_STATUS))
        raise AssertionError("unreachable")  # abort always raises

    @staticmethod
    def _code_of(exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
        if isinstance(exc, FalajError):
            return exc.code
        aborted = context.code()
        if isinstance(aborted, grpc.StatusCode) and aborted is not grpc.StatusCode.OK:
            return aborted
        gone = isinstance(exc, GeneratorExit) or (isinstance(exc, grpc.RpcError) and not context.is_active())
        return grpc.StatusCode.CANCELLED if gone else grpc.StatusCode.INTERNAL

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            call = None
            try:
                call = self._begin(method, context)
                if self.hooks is not None:
                    self.hooks.authorize(call, context)
                return behavior(request, context)
            except BaseException as exc:  # noqa: BLE001 - mapped to a status right here
                code = self._code_of(exc, context)
                self._fail(exc, context)
            finally:
                self._end(method, started, code, call, context)

        return handle

    def _wrap_stream(self, behavior: Callable[..., Iterator[Any]], method: str) -> Callable[..., Iterator[Any]]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            call = None
            try:
                call = self._begin(method, context)
                if self.hooks is not None:
                    self.hooks.authorize(call, context)
                yield from behavior(request, context)
            except BaseException as exc:  # noqa: BLE001 - mapped to a status right here
                code = self._code_of(exc, context)
                self._fail(exc, context)
            finally:
                self._end(method, started, code, call, context)

        return handle
