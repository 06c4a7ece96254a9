"""Thin gRPC servicer of the Open Inference Protocol (`inference.GRPCInferenceService`).

The model name is a deployment id; the deployment's traffic split picks the version
unless the request pins `model_version`. Errors follow the protocol: a non-OK gRPC
status with a message naming what was wrong (unknown model or version: NOT_FOUND;
wrong shape, datatype or size: INVALID_ARGUMENT naming the input; overload:
RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.inference import open_inference_grpc_pb2_grpc
from falaj_platform.services.serving.engine import InferenceEngine

SERVER_NAME = "falaj-serving"
SERVER_VERSION = "0.1.0"


class InferenceApi(open_inference_grpc_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.ServicerContext) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version))

    def ModelMetadata(self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext) -> oip.ModelMetadataResponse:
        return self.engine.model_metadata(request.name, request.version)

    def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.ServicerContext) -> oip.ModelInferResponse:
        def metadata() -> Sequence[tuple[str, object]]:
            return context.invocation_metadata() or ()

        return self.engine.infer(request, metadata)
