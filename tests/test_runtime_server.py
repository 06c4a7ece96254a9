"""The shared runtime's server: mTLS, identity, typed errors, request ids, limits, metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from falaj.sdk import errors as sdk_errors
from falaj_platform.pki import PKI
from falaj_platform.runtime import tls
from falaj_platform.runtime.errors import InvalidArgument, NotFound
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.server import RunningServer, create_server
from tests.conftest import identity

PROBE = "/falaj.test.v1.ProbeService/"


def _not_found(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise NotFound("dataset 'sales' not found", reason="DATASET_NOT_FOUND", metadata={"dataset": "sales"})


def _crash(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise ValueError("secret-internal-detail")


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    caller = dict(context.invocation_metadata()).get("x-falaj-caller", "")
    return request + b"|" + caller.encode()


def _stream_then_fail(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"one"
    yield b"two"
    raise InvalidArgument("row 3 is malformed")


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(0.5)
    return b"done"


def _sum_lengths(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


class ProbeHandler(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        table: dict[str, Callable[..., Any]] = {
            "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
            "Crash": grpc.unary_unary_rpc_method_handler(_crash),
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream_then_fail),
            "Sum": grpc.stream_unary_rpc_method_handler(_sum_lengths),
            "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        }
        method = details.method
        return table.get(method.removeprefix(PROBE)) if method.startswith(PROBE) else None


@pytest.fixture
def start_probe(settings_for: Callable[..., Any]) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(allowed_peers: frozenset[str] | None = None, **env: str) -> RunningServer:
        settings = settings_for("ingest", **env)
        running = create_server(
            settings, lambda server: [], listen_addr="127.0.0.1:0", allowed_peers=allowed_peers, handlers=[ProbeHandler()]
        )
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0)


def _channel(port: int, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


def _as(pki: PKI, kind: str, name: str, port: int) -> grpc.Channel:
    return _channel(port, tls.channel_credentials(identity(pki, kind, name)))


def test_typed_domain_error_becomes_status_with_error_info(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe()
    with _as(pki, "client", "admin", server.port) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE + "NotFound")(b"", timeout=5)
    typed = sdk_errors.from_rpc_error(raised.value)
    assert isinstance(typed, sdk_errors.NotFound)
    assert typed.reason == "DATASET_NOT_FOUND" and typed.metadata == {"dataset": "sales"}
    assert typed.message == "dataset 'sales' not found"
    assert typed.request_id


def test_unknown_exception_is_internal_without_details(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe()
    with _as(pki, "client", "admin", server.port) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE + "Crash")(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in raised.value.details()
    assert "Traceback" not in raised.value.details()


def test_stream_error_after_messages_keeps_the_messages(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe()
    received = []
    with _as(pki, "client", "admin", server.port) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            for message in channel.unary_stream(PROBE + "Stream")(b"", timeout=5):
                received.append(message)
    assert received == [b"one", b"two"]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_is_adopted_and_returned(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe()
    with _as(pki, "client", "admin", server.port) as channel:
        _, call = channel.unary_unary(PROBE + "Echo").with_call(b"x", metadata=[("x-request-id", "req-42")], timeout=5)
    assert ("x-request-id", "req-42") in call.trailing_metadata()


def test_client_without_certificate_is_refused(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe()
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert_path.read_bytes())
    with _channel(server.port, no_cert) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE + "Echo")(b"x", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_from_another_ca_is_refused(start_probe: Callable[..., RunningServer], pki: PKI, tmp_path: Any) -> None:
    server = start_probe()
    foreign = PKI(tmp_path / "foreign")
    foreign.init()
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert_path.read_bytes(),
        private_key=(foreign.client_dir("admin") / "key.pem").read_bytes(),
        certificate_chain=(foreign.client_dir("admin") / "cert.pem").read_bytes(),
    )
    with _channel(server.port, creds) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE + "Echo")(b"x", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_service_accepts_only_the_gateway_but_health_from_any_identity(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe(allowed_peers=frozenset({GATEWAY_SPIFFE_ID}))
    with _as(pki, "client", "admin", server.port) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE + "Echo")(b"x", timeout=5)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "through the gateway" in raised.value.details()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with _as(pki, "service", "gateway", server.port) as channel:
        spoofed = [("x-falaj-caller", "spiffe://falaj.local/client/alice")]
        assert channel.unary_unary(PROBE + "Echo")(b"x", metadata=spoofed, timeout=5) == b"x|spiffe://falaj.local/client/alice"


def test_oversize_message_is_refused(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe(FALAJ_MAX_MESSAGE_BYTES="1024")
    with _as(pki, "client", "admin", server.port) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(PROBE + "Echo")(b"x" * 4096, timeout=5)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_streaming_and_metrics_count_requests(start_probe: Callable[..., RunningServer], pki: PKI) -> None:
    server = start_probe()
    with _as(pki, "client", "admin", server.port) as channel:
        assert channel.stream_unary(PROBE + "Sum")(iter([b"ab", b"cde"]), timeout=5) == b"5"
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(PROBE + "NotFound")(b"", timeout=5)
    sample = server.metrics.registry.get_sample_value
    assert sample("falaj_grpc_requests_total", {"service": "ingest", "method": PROBE + "Sum", "code": "OK"}) == 1.0
    assert sample("falaj_grpc_requests_total", {"service": "ingest", "method": PROBE + "NotFound", "code": "NOT_FOUND"}) == 1.0
    assert sample("falaj_grpc_requests_in_flight", {"service": "ingest"}) == 0.0


def test_concurrency_limit_answers_resource_exhausted(settings_for: Callable[..., Any], pki: PKI) -> None:
    settings = settings_for("ingest", FALAJ_MAX_CONCURRENT_RPCS="1")
    server = create_server(settings, lambda s: [], listen_addr="127.0.0.1:0", handlers=[ProbeHandler()])
    try:
        with _as(pki, "client", "admin", server.port) as channel:
            first = threading.Thread(target=lambda: channel.unary_unary(PROBE + "Slow")(b"", timeout=5))
            first.start()
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(PROBE + "Slow")(b"", timeout=5)
            first.join()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(0)


def test_graceful_stop_reports_not_serving_and_finishes_in_flight_calls(settings_for: Callable[..., Any], pki: PKI) -> None:
    results: list[bytes] = []

    server = create_server(settings_for("ingest"), lambda s: [], listen_addr="127.0.0.1:0", handlers=[ProbeHandler()])
    with _as(pki, "client", "admin", server.port) as channel:
        call = threading.Thread(target=lambda: results.append(channel.unary_unary(PROBE + "Slow")(b"", timeout=5)))
        call.start()
        time.sleep(0.2)
        server.stop(grace=5)
        call.join()
    assert results == [b"done"]
