"""The gateway forwards every call kind to the owning service, unchanged, with the caller's identity."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from falaj.sdk import errors as sdk_errors
from falaj_platform.gateway.routing import owner_of
from falaj_platform.gateway.server import Gateway, start_gateway
from falaj_platform.pki import PKI
from falaj_platform.runtime import tls
from falaj_platform.runtime.errors import NotFound
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.server import RunningServer, create_server
from tests.conftest import identity

PROBE = "/falaj.ingest.v1.ProbeService/"


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    metadata = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-upstream", "ingest"),))
    return f"{metadata.get('x-falaj-caller')}|{metadata.get('x-custom')}|{metadata.get('x-request-id')}".encode()


def _missing(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise NotFound("no such dataset", reason="DATASET_NOT_FOUND", metadata={"dataset": request.decode()})


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def _join(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b",".join(requests)


def _upper(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield request.upper()


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    remaining = context.time_remaining()
    time.sleep(1.0)
    return str(remaining).encode()


class Probe(grpc.GenericRpcHandler):
    table = {
        "WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Join": grpc.stream_unary_rpc_method_handler(_join),
        "Upper": grpc.stream_stream_rpc_method_handler(_upper),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    }

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.table.get(details.method.removeprefix(PROBE)) if details.method.startswith(PROBE) else None


@pytest.fixture
def routed(settings_for: Callable[..., Any], pki: PKI) -> Iterator[grpc.Channel]:
    """An ingest-side probe server behind a real gateway; yields an admin channel to the gateway."""
    upstream: RunningServer = create_server(
        settings_for("ingest"), lambda s: [], listen_addr="127.0.0.1:0", allowed_peers=frozenset({GATEWAY_SPIFFE_ID}), handlers=[Probe()]
    )
    gateway: Gateway = start_gateway(settings_for("gateway", FALAJ_INGEST_ADDR=f"127.0.0.1:{upstream.port}"), listen_addr="127.0.0.1:0")
    creds = tls.channel_credentials(identity(pki, "client", "admin"))
    channel = grpc.secure_channel(f"127.0.0.1:{gateway.running.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
    yield channel
    channel.close()
    gateway.stop(0)
    upstream.stop(0)


def test_unary_carries_caller_identity_metadata_and_trailers(routed: grpc.Channel) -> None:
    spoof = [("x-falaj-caller", "spiffe://falaj.local/client/root"), ("x-custom", "kept"), ("x-request-id", "rid-1")]
    reply, call = routed.unary_unary(PROBE + "WhoAmI").with_call(b"", metadata=spoof, timeout=5)
    assert reply == b"spiffe://falaj.local/client/admin|kept|rid-1"
    trailers = dict(call.trailing_metadata())
    assert trailers["x-upstream"] == "ingest" and trailers["x-request-id"] == "rid-1"


def test_error_status_and_details_pass_through(routed: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        routed.unary_unary(PROBE + "Missing")(b"sales", timeout=5)
    typed = sdk_errors.from_rpc_error(raised.value)
    assert isinstance(typed, sdk_errors.NotFound)
    assert (typed.message, typed.reason, typed.metadata) == ("no such dataset", "DATASET_NOT_FOUND", {"dataset": "sales"})


def test_server_client_and_bidi_streams_pass_through(routed: grpc.Channel) -> None:
    assert list(routed.unary_stream(PROBE + "Count")(b"4", timeout=5)) == [b"0", b"1", b"2", b"3"]
    assert routed.stream_unary(PROBE + "Join")(iter([b"a", b"b", b"c"]), timeout=5) == b"a,b,c"
    assert list(routed.stream_stream(PROBE + "Upper")(iter([b"x", b"y"]), timeout=5)) == [b"X", b"Y"]


def test_call_without_deadline_is_forwarded_without_one(routed: grpc.Channel) -> None:
    assert routed.unary_unary(PROBE + "WhoAmI")(b"").startswith(b"spiffe://falaj.local/client/admin")


def test_deadline_reaches_the_service_and_expires(routed: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        routed.unary_unary(PROBE + "Slow")(b"", timeout=0.3)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unknown_or_crafted_methods_are_not_forwarded(routed: grpc.Channel) -> None:
    for method in ["/falaj.nope.v1.X/Y", "/unknown.Service/Call"]:
        with pytest.raises(grpc.RpcError) as raised:
            routed.unary_unary(method)(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert owner_of("/falaj.ingest.v1.IngestService/GetDataset") == "ingest"
    assert owner_of("/inference.GRPCInferenceService/ModelInfer") == "serving"
    assert owner_of("/feast.serving.ServingService/GetOnlineFeatures") == "features"
    assert owner_of("/falaj.ingest.v1.IngestService/../x") is None
    assert owner_of("/falaj.ingest.v1.IngestService/Get/Extra") is None
    assert owner_of("/falaj.gateway.v1.GatewayAdminService/ListPolicies") is None


def test_upstream_targets_balance_ip_replicas_and_resolve_service_names() -> None:
    from falaj_platform.gateway.proxy import upstream_target
    from falaj_platform.runtime.errors import StartupError

    assert upstream_target(("127.0.0.1:50061", "127.0.0.2:50061")) == "ipv4:127.0.0.1:50061,127.0.0.2:50061"
    assert upstream_target(("[::1]:50061",)) == "ipv6:[::1]:50061"
    assert upstream_target(("ingest:50061",)) == "dns:///ingest:50061"
    with pytest.raises(StartupError):
        upstream_target(("ingest-a:50061", "ingest-b:50061"))
