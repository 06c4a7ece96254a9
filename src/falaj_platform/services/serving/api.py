"""Thin gRPC servicer of `falaj.serving.v1.ServingService`: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from falaj.serving.v1 import request_response_pb2 as rr
from falaj.serving.v1 import service_pb2_grpc
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.services.serving.batch_jobs import BatchJobService
from falaj_platform.services.serving.deployments import DeploymentService
from falaj_platform.services.serving.streaming import StreamPredictor


class ServingApi(service_pb2_grpc.ServingServiceServicer):
    def __init__(self, deployments: DeploymentService, streaming: StreamPredictor, batch_jobs: BatchJobService):
        self.deployments = deployments
        self.streaming = streaming
        self.batch_jobs = batch_jobs

    # -- deployments -------------------------------------------------------------------------
    def CreateDeployment(self, request: rr.CreateDeploymentRequest, context: grpc.ServicerContext) -> rr.CreateDeploymentResponse:
        return self.deployments.create_deployment(request)

    def GetDeployment(self, request: rr.GetDeploymentRequest, context: grpc.ServicerContext) -> rr.GetDeploymentResponse:
        return rr.GetDeploymentResponse(deployment=self.deployments.get_deployment(request.name))

    def ListDeployments(self, request: rr.ListDeploymentsRequest, context: grpc.ServicerContext) -> rr.ListDeploymentsResponse:
        return self.deployments.list_deployments(request)

    def UpdateDeployment(self, request: rr.UpdateDeploymentRequest, context: grpc.ServicerContext) -> rr.UpdateDeploymentResponse:
        return self.deployments.update_deployment(request)

    def DeleteDeployment(self, request: rr.DeleteDeploymentRequest, context: grpc.ServicerContext) -> rr.DeleteDeploymentResponse:
        return self.deployments.delete_deployment(request)

    def PromoteDeployment(self, request: rr.PromoteDeploymentRequest, context: grpc.ServicerContext) -> rr.PromoteDeploymentResponse:
        return self.deployments.promote_deployment(request)

    def RollbackDeployment(self, request: rr.RollbackDeploymentRequest, context: grpc.ServicerContext) -> rr.RollbackDeploymentResponse:
        return self.deployments.rollback_deployment(request)

    def GetRollout(self, request: rr.GetRolloutRequest, context: grpc.ServicerContext) -> rr.GetRolloutResponse:
        return rr.GetRolloutResponse(rollout=self.deployments.get_rollout(request.name))

    def ListRollouts(self, request: rr.ListRolloutsRequest, context: grpc.ServicerContext) -> rr.ListRolloutsResponse:
        return self.deployments.list_rollouts(request)

    # -- served models -----------------------------------------------------------------------
    def LoadModel(self, request: rr.LoadModelRequest, context: grpc.ServicerContext) -> rr.LoadModelResponse:
        return self.deployments.load_model(request)

    def UnloadModel(self, request: rr.UnloadModelRequest, context: grpc.ServicerContext) -> rr.UnloadModelResponse:
        return self.deployments.unload_model(request)

    def GetServedModel(self, request: rr.GetServedModelRequest, context: grpc.ServicerContext) -> rr.GetServedModelResponse:
        if not request.name.startswith("servedModels/"):
            raise InvalidArgument("name must be servedModels/{served_model_id}", reason="INVALID_NAME")
        return rr.GetServedModelResponse(served_model=self.deployments.served_model_proto(request.name.removeprefix("servedModels/")))

    def ListServedModels(self, request: rr.ListServedModelsRequest, context: grpc.ServicerContext) -> rr.ListServedModelsResponse:
        return self.deployments.list_served_models(request)

    # -- batch prediction --------------------------------------------------------------------
    def StreamPredict(
        self, request_iterator: Iterator[rr.StreamPredictRequest], context: grpc.ServicerContext
    ) -> Iterator[rr.StreamPredictResponse]:
        return self.streaming.predict(request_iterator)

    def CreateBatchPredictionJob(
        self, request: rr.CreateBatchPredictionJobRequest, context: grpc.ServicerContext
    ) -> rr.CreateBatchPredictionJobResponse:
        return self.batch_jobs.create_job(request)

    def GetBatchPredictionJob(
        self, request: rr.GetBatchPredictionJobRequest, context: grpc.ServicerContext
    ) -> rr.GetBatchPredictionJobResponse:
        return rr.GetBatchPredictionJobResponse(job=self.batch_jobs.get_job(request.name))

    def ListBatchPredictionJobs(
        self, request: rr.ListBatchPredictionJobsRequest, context: grpc.ServicerContext
    ) -> rr.ListBatchPredictionJobsResponse:
        return self.batch_jobs.list_jobs(request)

    def CancelBatchPredictionJob(
        self, request: rr.CancelBatchPredictionJobRequest, context: grpc.ServicerContext
    ) -> rr.CancelBatchPredictionJobResponse:
        return self.batch_jobs.cancel_job(request)
