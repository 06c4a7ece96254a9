"""Forward calls to the owning service without decoding their payloads.

Every method is handled as a bidirectional stream of raw bytes: on the wire unary,
client-, server- and bidi-streaming calls are all streams, so one handler kind carries
them all and the gateway never re-serializes a message. Deadlines, cancellation,
metadata, status, details and trailing metadata pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grpc

from falaj_platform.gateway.routing import owner_of
from falaj_platform.runtime.identity import CALLER_METADATA_KEY, peer_spiffe_id
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY, current_request_id

# Metadata the gateway owns or that is hop-by-hop; never copied from the caller.
_DROPPED_METADATA = frozenset({CALLER_METADATA_KEY, REQUEST_ID_KEY, "user-agent", ":authority", "grpc-accept-encoding", "grpc-encoding"})


# grpc reports "no deadline" as a deadline centuries away; passed on as a timeout it
# overflows and the upstream call fails at once, so it becomes "no timeout" again.
_NO_DEADLINE_AFTER_S = 365 * 24 * 3600.0


def _upstream_timeout(context: grpc.ServicerContext) -> float | None:
    remaining = float(context.time_remaining())
    return None if remaining > _NO_DEADLINE_AFTER_S else remaining


class UpstreamChannels:
    """One mTLS channel per service, round-robin across that service's addresses."""

    def __init__(self, upstreams: Mapping[str, tuple[str, ...]], credentials: grpc.ChannelCredentials, max_message_bytes: int):
        options = [
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
        ]
        self._channels = {
            name: grpc.secure_channel("ipv4:" + ",".join(addrs), credentials, options=options) for name, addrs in upstreams.items() if addrs
        }

    def get(self, service: str) -> grpc.Channel | None:
        return self._channels.get(service)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


class ProxyHandler(grpc.GenericRpcHandler):
    """Generic handler that forwards every routable method to its owner."""

    def __init__(self, channels: UpstreamChannels):
        self.channels = channels

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        owner = owner_of(method)
        channel = self.channels.get(owner) if owner else None
        if channel is None:
            return None  # grpc answers UNIMPLEMENTED
        upstream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)

        def forward(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            metadata = [(k, v) for k, v in context.invocation_metadata() if k not in _DROPPED_METADATA]
            caller = peer_spiffe_id(context)
            if caller:
                metadata.append((CALLER_METADATA_KEY, caller))
            request_id = current_request_id()
            if request_id:
                metadata.append((REQUEST_ID_KEY, request_id))
            call = upstream(requests, timeout=_upstream_timeout(context), metadata=metadata)
            context.add_callback(call.cancel)
            try:
                context.send_initial_metadata(call.initial_metadata() or ())
                yield from call
            except grpc.RpcError:
                pass  # the status is read from the call below
            code = call.code()
            trailing = [(k, v) for k, v in (call.trailing_metadata() or ()) if k != REQUEST_ID_KEY]
            context.set_trailing_metadata((*trailing, (REQUEST_ID_KEY, request_id)))
            if code is grpc.StatusCode.UNAVAILABLE:
                context.abort(code, f"service {owner} is unavailable: {call.details() or 'no details'}")
            if code is not grpc.StatusCode.OK:
                context.abort(code, call.details() or "")

        return grpc.stream_stream_rpc_method_handler(forward)
