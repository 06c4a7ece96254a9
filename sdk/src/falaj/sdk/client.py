"""`connect(...)`: one mTLS channel to the gateway and a typed client per service.

Each per-service client exposes the RPCs of its generated stub under the same names;
a failed call raises the typed error of `falaj.sdk.errors` instead of `grpc.RpcError`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc

from falaj.sdk.errors import from_rpc_error

if TYPE_CHECKING:  # the stubs' .pyi give every RPC its request and response types
    from falaj.experiments.v1.service_pb2_grpc import ExperimentsServiceStub
    from falaj.features.v1.service_pb2_grpc import FeaturesServiceStub
    from falaj.gateway.v1.service_pb2_grpc import GatewayAdminServiceStub
    from falaj.inference.open_inference_grpc_pb2_grpc import GRPCInferenceServiceStub
    from falaj.ingest.v1.service_pb2_grpc import IngestServiceStub
    from falaj.monitoring.v1.service_pb2_grpc import MonitoringServiceStub
    from falaj.serving.v1.service_pb2_grpc import ServingServiceStub
    from falaj.training.v1.service_pb2_grpc import TrainingServiceStub

# service attribute -> (stub module, stub class)
_SERVICES = {
    "ingest": ("falaj.ingest.v1.service_pb2_grpc", "IngestServiceStub"),
    "features": ("falaj.features.v1.service_pb2_grpc", "FeaturesServiceStub"),
    "training": ("falaj.training.v1.service_pb2_grpc", "TrainingServiceStub"),
    "serving": ("falaj.serving.v1.service_pb2_grpc", "ServingServiceStub"),
    "experiments": ("falaj.experiments.v1.service_pb2_grpc", "ExperimentsServiceStub"),
    "monitoring": ("falaj.monitoring.v1.service_pb2_grpc", "MonitoringServiceStub"),
    "gateway": ("falaj.gateway.v1.service_pb2_grpc", "GatewayAdminServiceStub"),
    # Imported on first use only: tritonclient registers the same `inference.*`
    # protobuf names, and one process cannot hold both copies.
    "inference": ("falaj.inference.open_inference_grpc_pb2_grpc", "GRPCInferenceServiceStub"),
}


def _typed_iterator(responses: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from responses
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


class ServiceClient:
    """Wraps one generated stub; calls raise typed errors."""

    def __init__(self, stub: Any):
        self._stub = stub

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            try:
                result = method(request, **kwargs)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
            if isinstance(result, grpc.Call) and hasattr(result, "__next__"):
                return _typed_iterator(result)
            return result

        call.__name__ = name
        return call


class Falaj:
    """A connection to the platform through its gateway, with one typed client per service.

    Each client is typed as its generated stub, so editors and mypy know every RPC's
    request and response; at run time failed calls raise `falaj.sdk.errors` classes.
    """

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self._clients: dict[str, ServiceClient] = {}

    def client(self, service: str) -> ServiceClient:
        """The client of `service` (one of ingest, features, training, serving, experiments, monitoring, gateway, inference)."""
        if service not in _SERVICES:
            raise ValueError(f"unknown service {service!r}; expected one of {', '.join(_SERVICES)}")
        if service not in self._clients:
            module_name, stub_name = _SERVICES[service]
            stub_class = getattr(importlib.import_module(module_name), stub_name)
            self._clients[service] = ServiceClient(stub_class(self.channel))
        return self._clients[service]

    @property
    def ingest(self) -> IngestServiceStub:
        return cast("IngestServiceStub", self.client("ingest"))

    @property
    def features(self) -> FeaturesServiceStub:
        return cast("FeaturesServiceStub", self.client("features"))

    @property
    def training(self) -> TrainingServiceStub:
        return cast("TrainingServiceStub", self.client("training"))

    @property
    def serving(self) -> ServingServiceStub:
        return cast("ServingServiceStub", self.client("serving"))

    @property
    def experiments(self) -> ExperimentsServiceStub:
        return cast("ExperimentsServiceStub", self.client("experiments"))

    @property
    def monitoring(self) -> MonitoringServiceStub:
        return cast("MonitoringServiceStub", self.client("monitoring"))

    @property
    def gateway(self) -> GatewayAdminServiceStub:
        return cast("GatewayAdminServiceStub", self.client("gateway"))

    @property
    def inference(self) -> GRPCInferenceServiceStub:
        return cast("GRPCInferenceServiceStub", self.client("inference"))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Falaj:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _read(path: str | os.PathLike[str]) -> bytes:
    return Path(path).read_bytes()


def connect(
    gateway: str,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    *,
    server_name: str = "localhost",
    max_message_bytes: int = 64 * 1024 * 1024,
) -> Falaj:
    """Open an mTLS channel to the gateway at `gateway` (host:port) with this client identity."""
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert))
    options = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    return Falaj(grpc.secure_channel(gateway, credentials, options=options))
