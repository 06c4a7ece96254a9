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

from falaj_platform.runtime.errors import Aborted, FalajError, InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from falaj_platform.runtime.identity import CALLER_METADATA_KEY, peer_spiffe_id
from falaj_platform.runtime.metrics import ServerMetrics

REQUEST_ID_KEY = "x-request-id"
MAX_CACHED_METHODS = 4096
# What a handler sees when its client went away: a failed call of its own upstream (the
# gateway's hop), or the future of that hop cancelled by the client's cancellation.
_CALL_GONE = (grpc.RpcError, grpc.FutureCancelledError)

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


class _Unparseable:
    """What the runtime's deserializer hands grpc for bytes that are not the request message.

    grpc-python would end such a call INTERNAL ("Exception deserializing request!") and,
    in a client stream, end the request iterator as if the client had closed it, so that
    a handler would commit the part before; the handler wrappers refuse it instead.
    """

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns an `_Unparseable` for bytes it cannot parse instead of raising."""
    if deserializer is None:  # raw bytes (the gateway's proxy): nothing to parse
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    expected = f"a {message_type.full_name} message" if message_type is not None else f"the request message of {method}"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, recursion limit, ...: the client sent bad bytes
            return _Unparseable(InvalidArgument(f"the request is not {expected}", reason="UNPARSEABLE_REQUEST"))

    return deserialize


def _parsed(request: Any) -> Any:
    if isinstance(request, _Unparseable):
        raise request.error
    return request


class _CheckedRequests:
    """A client stream's request iterator that raises instead of ending quietly on a cut stream.

    A message that does not parse raises InvalidArgument; an end of stream on a call that
    is no longer active (cancelled, or failed by grpc) raises Aborted, so that no handler
    takes the first part of a stream for all of it and commits it.
    """

    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext):
        self._requests = requests
        self._context = context
        self.failure: FalajError | None = None

    def __iter__(self) -> _CheckedRequests:
        return self

    def __next__(self) -> Any:
        if self.failure is not None:
            raise self.failure
        try:
            request = next(self._requests)
        except StopIteration:
            if not self._context.is_active():
                self.failure = Aborted("the stream was cut before the client closed it; nothing was committed", reason="STREAM_CUT")
                raise self.failure from None
            raise
        if isinstance(request, _Unparseable):
            self.failure = request.error
            raise self.failure
        return request


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
        self._handlers: dict[str, Any] = {}

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
        # grpc asks for every call; a method's wrapped handler is built once (servicers
        # are registered before the server starts and never change afterwards).
        wrapped = self._handlers.get(details.method)
        if wrapped is None:
            wrapped = self._wrap(continuation(details), details.method)
            if wrapped is not None and len(self._handlers) < MAX_CACHED_METHODS:  # any name may reach a proxy
                self._handlers[details.method] = wrapped
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        if handler is None:
            return None
        wrap = self._wrap_unary if not handler.response_streaming else self._wrap_stream
        streaming = handler.request_streaming
        deserializer = _tolerant(handler.request_deserializer, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary, method, streaming), deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, method, streaming), deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap(handler.stream_unary, method, streaming), deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream, method, streaming), deserializer, handler.response_serializer
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
        if isinstance(exc, GeneratorExit) or (isinstance(exc, _CALL_GONE) and not context.is_active()):
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
        gone = isinstance(exc, GeneratorExit) or (isinstance(exc, _CALL_GONE) and not context.is_active())
        return grpc.StatusCode.CANCELLED if gone else grpc.StatusCode.INTERNAL

    def _wrap_unary(self, behavior: Callable[..., Any], method: str, request_streaming: bool) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            call = None
            try:
                call = self._begin(method, context)
                if self.hooks is not None:
                    self.hooks.authorize(call, context)
                if not request_streaming:
                    return behavior(_parsed(request), context)
                requests = _CheckedRequests(request, context)
                response = behavior(requests, context)
                if requests.failure is not None:  # the handler caught it: its response must not reach the client
                    raise requests.failure
                return response
            except BaseException as exc:  # noqa: BLE001 - mapped to a status right here
                code = self._code_of(exc, context)
                self._fail(exc, context)
            finally:
                self._end(method, started, code, call, context)

        return handle

    def _wrap_stream(self, behavior: Callable[..., Iterator[Any]], method: str, request_streaming: bool) -> Callable[..., Iterator[Any]]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            call = None
            try:
                call = self._begin(method, context)
                if self.hooks is not None:
                    self.hooks.authorize(call, context)
                if not request_streaming:
                    yield from behavior(_parsed(request), context)
                else:
                    requests = _CheckedRequests(request, context)
                    yield from behavior(requests, context)
                    if requests.failure is not None:
                        raise requests.failure
            except BaseException as exc:  # noqa: BLE001 - mapped to a status right here
                code = self._code_of(exc, context)
                self._fail(exc, context)
            finally:
                self._end(method, started, code, call, context)

        return handle
