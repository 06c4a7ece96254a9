"""Forward calls to the owning service without decoding their payloads.

Messages pass through as raw bytes: the gateway never parses or re-serializes a
payload. It does read the platform's service descriptors (from the SDK) to know each
method's kind, so that unary calls are forwarded as unary calls; grpc-python spends a
thread and about a millisecond per call on a streaming call it does not need. Methods
it has no descriptor for (a service newer than this gateway, Feast's contract) are
forwarded as bidirectional streams, which carry any call kind on the wire.
Deadlines, cancellation, metadata, status, details and trailing metadata pass
through unchanged.
"""

from __future__ import annotations

import importlib
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from falaj_platform.gateway.routing import owner_of
from falaj_platform.runtime.clients import RECONNECT_OPTIONS
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.identity import CALLER_METADATA_KEY, peer_spiffe_id
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY, current_request_id
from falaj_platform.runtime.settings import SERVICES

# Metadata the gateway owns or that is hop-by-hop; never copied from the caller.
_DROPPED_METADATA = frozenset({CALLER_METADATA_KEY, REQUEST_ID_KEY, "user-agent", ":authority", "grpc-accept-encoding", "grpc-encoding"})

# grpc reports "no deadline" as a deadline centuries away; passed on as a timeout it
# overflows and the upstream call fails at once, so it becomes "no timeout" again.
_NO_DEADLINE_AFTER_S = 365 * 24 * 3600.0

_CONTRACT_MODULES = [f"falaj.{name}.v1.service_pb2" for name in SERVICES] + ["falaj.inference.open_inference_grpc_pb2"]
# Feast's serving contract ships inside the feast package, whose import costs seconds; its
# two methods are unary (feast/protos/feast/serving/ServingService.proto).
_FEAST_SERVING_KINDS = {
    "/feast.serving.ServingService/GetFeastServingInfo": (False, False),
    "/feast.serving.ServingService/GetOnlineFeatures": (False, False),
}


def method_kinds() -> dict[str, tuple[bool, bool]]:
    """(client_streaming, server_streaming) of every method of the platform's contracts."""
    kinds = dict(_FEAST_SERVING_KINDS)
    for module in (importlib.import_module(name) for name in _CONTRACT_MODULES):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                kinds[f"/{service.full_name}/{method.name}"] = (method.client_streaming, method.server_streaming)
    return kinds


def _upstream_timeout(context: grpc.ServicerContext) -> float | None:
    remaining = float(context.time_remaining())
    return None if remaining > _NO_DEADLINE_AFTER_S else remaining


def upstream_target(addrs: tuple[str, ...]) -> str:
    """A grpc target for a service's addresses, balanced round-robin by grpc itself.

    IP literals become one `ipv4:`/`ipv6:` target listing them all; one host name becomes a
    `dns:///` target (a Kubernetes headless Service resolves to every pod). Several
    host names cannot share one target: that is refused here rather than half-served.
    """
    hosts = [addr.rsplit(":", 1)[0].strip("[]") for addr in addrs]
    if all(_is_ip(host, 4) for host in hosts):
        return "ipv4:" + ",".join(addrs)
    if all(_is_ip(host, 6) for host in hosts):
        return "ipv6:" + ",".join(addrs)
    if len(addrs) == 1:
        return f"dns:///{addrs[0]}"
    raise StartupError(f"upstream addresses {', '.join(addrs)}: give IP addresses, or one DNS name that resolves to every replica")


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


class UpstreamChannels:
    """One mTLS channel per service, round-robin across that service's addresses."""

    def __init__(self, upstreams: Mapping[str, tuple[str, ...]], credentials: grpc.ChannelCredentials, max_message_bytes: int):
        options = [
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
            *RECONNECT_OPTIONS,
        ]
        self._channels = {
            name: grpc.secure_channel(upstream_target(addrs), credentials, options=options) for name, addrs in upstreams.items() if addrs
        }

    def get(self, service: str) -> grpc.Channel | None:
        return self._channels.get(service)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


class _Forwarding:
    """Metadata in, status out: what every call kind does the same way."""

    def __init__(self, owner: str, context: grpc.ServicerContext):
        self.owner = owner
        self.context = context
        metadata = [(k, v) for k, v in context.invocation_metadata() if k not in _DROPPED_METADATA]
        caller = peer_spiffe_id(context)
        if caller:
            metadata.append((CALLER_METADATA_KEY, caller))
        self.request_id = current_request_id()
        if self.request_id:
            metadata.append((REQUEST_ID_KEY, self.request_id))
        self.metadata = metadata
        self.timeout = _upstream_timeout(context)

    def finish(self, call: grpc.Call) -> None:
        """Copy the upstream's trailing metadata and status onto the caller's call."""
        code = call.code()
        trailing = [(k, v) for k, v in (call.trailing_metadata() or ()) if k != REQUEST_ID_KEY]
        self.context.set_trailing_metadata((*trailing, (REQUEST_ID_KEY, self.request_id)))
        if code is grpc.StatusCode.UNAVAILABLE:
            self.context.abort(code, f"service {self.owner} is unavailable: {call.details() or 'no details'}")
        if code is not grpc.StatusCode.OK:
            self.context.abort(code, call.details() or "")

    def initial(self, call: grpc.Call) -> None:
        self.context.send_initial_metadata(call.initial_metadata() or ())


class ProxyHandler(grpc.GenericRpcHandler):
    """Generic handler that forwards every routable method to its owner."""

    def __init__(self, channels: UpstreamChannels):
        self.channels = channels
        self.kinds = method_kinds()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        owner = owner_of(method)
        channel = self.channels.get(owner) if owner else None
        if channel is None or owner is None:
            return None  # grpc answers UNIMPLEMENTED
        client_streaming, server_streaming = self.kinds.get(method, (True, True))
        if not client_streaming and not server_streaming:
            return grpc.unary_unary_rpc_method_handler(self._unary_unary(channel.unary_unary(method), owner))
        if not client_streaming:
            return grpc.unary_stream_rpc_method_handler(self._server_stream(channel.unary_stream(method), owner))
        if not server_streaming:
            return grpc.stream_unary_rpc_method_handler(self._client_stream(channel.stream_unary(method), owner))
        return grpc.stream_stream_rpc_method_handler(self._server_stream(channel.stream_stream(method), owner))

    @staticmethod
    def _unary_unary(upstream: grpc.UnaryUnaryMultiCallable, owner: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            hop = _Forwarding(owner, context)
            try:
                response, call = upstream.with_call(request, timeout=hop.timeout, metadata=hop.metadata)
            except grpc.RpcError as error:
                hop.finish(error)  # a failed call is also a grpc.Call
                raise AssertionError("unreachable") from error  # finish aborts
            hop.initial(call)
            hop.finish(call)
            return response

        return forward

    @staticmethod
    def _client_stream(upstream: grpc.StreamUnaryMultiCallable, owner: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
        def forward(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            hop = _Forwarding(owner, context)
            future = upstream.future(requests, timeout=hop.timeout, metadata=hop.metadata)
            context.add_callback(future.cancel)
            try:
                response = future.result()
            except grpc.RpcError:
                hop.finish(future)
                raise AssertionError("unreachable") from None
            hop.initial(future)
            hop.finish(future)
            return response

        return forward

    @staticmethod
    def _server_stream(upstream: Any, owner: str) -> Callable[[Any, grpc.ServicerContext], Iterator[bytes]]:
        def forward(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            hop = _Forwarding(owner, context)
            call = upstream(request, timeout=hop.timeout, metadata=hop.metadata)
            context.add_callback(call.cancel)
            try:
                hop.initial(call)
                yield from call
            except grpc.RpcError:
                pass  # the status is read from the call below
            hop.finish(call)

        return forward
