"""Thin gRPC servicer of the Open Inference Protocol (`inference.GRPCInferenceService`).

Liveness, readiness and server metadata answer now; the model methods (ModelReady,
ModelMetadata, ModelInfer) answer UNIMPLEMENTED (the generated base class does that)
until the serving issue routes them through deployments to ONNX Runtime.
"""

from __future__ import annotations

import grpc

from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.inference import open_inference_grpc_pb2_grpc
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.serving.store import ServingStore

SERVER_NAME = "falaj-serving"
SERVER_VERSION = "0.1.0"


class InferenceApi(open_inference_grpc_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, store: ServingStore, settings: Settings):
        self.store = store
        self.settings = settings

    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])
