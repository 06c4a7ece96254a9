"""Thin gRPC servicers: `falaj.features.v1.FeaturesService` and Feast's own
`feast.serving.ServingService`, both proto -> domain -> proto.

Domain errors are typed; the runtime's interceptor turns them into statuses for both.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import feast
import grpc
from feast.protos.feast.serving import ServingService_pb2 as feast_serving
from feast.protos.feast.serving import ServingService_pb2_grpc as feast_serving_grpc

from falaj.features.v1 import request_response_pb2 as requests
from falaj.features.v1 import service_pb2_grpc
from falaj_platform.services.features import names
from falaj_platform.services.features.catalog import ENTITY, FEATURE_SERVICE, FEATURE_VIEW, ON_DEMAND_FEATURE_VIEW, Catalog
from falaj_platform.services.features.erasure import Eraser
from falaj_platform.services.features.materialization import Materializer, OfflineData, freshness_of
from falaj_platform.services.features.retrieval import Reader
from falaj_platform.services.features.statistics import view_statistics
from falaj_platform.services.features.store import FeaturesStore


class FeaturesApi(service_pb2_grpc.FeaturesServiceServicer):
    def __init__(
        self, store: FeaturesStore, catalog: Catalog, materializer: Materializer, reader: Reader, offline: OfflineData, eraser: Eraser
    ):
        self.store = store
        self.catalog = catalog
        self.materializer = materializer
        self.reader = reader
        self.offline = offline
        self.eraser = eraser

    def _with_freshness(self, view: Any) -> Any:
        with self.store.transaction() as session:
            state = self.store.get_view_state(session, names.parse(view.name, names.FEATURE_VIEWS))
        if state.materialized_until is not None:
            view.freshness.CopyFrom(freshness_of(view.name, state, dt.datetime.now(dt.UTC)))
        return view

    # -- entities -------------------------------------------------------------------------
    def CreateEntity(self, request: requests.CreateEntityRequest, context: grpc.ServicerContext) -> requests.CreateEntityResponse:
        return self.catalog.create(ENTITY, request)

    def GetEntity(self, request: requests.GetEntityRequest, context: grpc.ServicerContext) -> requests.GetEntityResponse:
        return requests.GetEntityResponse(entity=self.catalog.get(ENTITY, request.name))

    def ListEntities(self, request: requests.ListEntitiesRequest, context: grpc.ServicerContext) -> requests.ListEntitiesResponse:
        found, token = self.catalog.list_definitions(ENTITY, request)
        return requests.ListEntitiesResponse(entities=found, next_page_token=token)

    def UpdateEntity(self, request: requests.UpdateEntityRequest, context: grpc.ServicerContext) -> requests.UpdateEntityResponse:
        return self.catalog.update(ENTITY, request)

    def DeleteEntity(self, request: requests.DeleteEntityRequest, context: grpc.ServicerContext) -> requests.DeleteEntityResponse:
        return self.catalog.delete(ENTITY, request)

    # -- feature views --------------------------------------------------------------------
    def CreateFeatureView(
        self, request: requests.CreateFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.CreateFeatureViewResponse:
        return self.catalog.create(FEATURE_VIEW, request)

    def GetFeatureView(self, request: requests.GetFeatureViewRequest, context: grpc.ServicerContext) -> requests.GetFeatureViewResponse:
        return requests.GetFeatureViewResponse(feature_view=self._with_freshness(self.catalog.get(FEATURE_VIEW, request.name)))

    def ListFeatureViews(
        self, request: requests.ListFeatureViewsRequest, context: grpc.ServicerContext
    ) -> requests.ListFeatureViewsResponse:
        def keep(view: Any) -> bool:
            return (
                (not request.entity or request.entity in view.entities)
                and (not request.dataset or view.source.dataset == request.dataset)
                and (not request.residency_region or view.residency.region == request.residency_region)
            )

        found, token = self.catalog.list_definitions(FEATURE_VIEW, request, keep)
        return requests.ListFeatureViewsResponse(feature_views=[self._with_freshness(v) for v in found], next_page_token=token)

    def UpdateFeatureView(
        self, request: requests.UpdateFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.UpdateFeatureViewResponse:
        return self.catalog.update(FEATURE_VIEW, request)

    def DeleteFeatureView(
        self, request: requests.DeleteFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.DeleteFeatureViewResponse:
        return self.catalog.delete(FEATURE_VIEW, request)

    # -- on-demand feature views ----------------------------------------------------------
    def CreateOnDemandFeatureView(
        self, request: requests.CreateOnDemandFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.CreateOnDemandFeatureViewResponse:
        return self.catalog.create(ON_DEMAND_FEATURE_VIEW, request)

    def GetOnDemandFeatureView(
        self, request: requests.GetOnDemandFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.GetOnDemandFeatureViewResponse:
        return requests.GetOnDemandFeatureViewResponse(on_demand_feature_view=self.catalog.get(ON_DEMAND_FEATURE_VIEW, request.name))

    def ListOnDemandFeatureViews(
        self, request: requests.ListOnDemandFeatureViewsRequest, context: grpc.ServicerContext
    ) -> requests.ListOnDemandFeatureViewsResponse:
        found, token = self.catalog.list_definitions(ON_DEMAND_FEATURE_VIEW, request)
        return requests.ListOnDemandFeatureViewsResponse(on_demand_feature_views=found, next_page_token=token)

    def UpdateOnDemandFeatureView(
        self, request: requests.UpdateOnDemandFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.UpdateOnDemandFeatureViewResponse:
        return self.catalog.update(ON_DEMAND_FEATURE_VIEW, request)

    def DeleteOnDemandFeatureView(
        self, request: requests.DeleteOnDemandFeatureViewRequest, context: grpc.ServicerContext
    ) -> requests.DeleteOnDemandFeatureViewResponse:
        return self.catalog.delete(ON_DEMAND_FEATURE_VIEW, request)

    # -- feature services -----------------------------------------------------------------
    def CreateFeatureService(
        self, request: requests.CreateFeatureServiceRequest, context: grpc.ServicerContext
    ) -> requests.CreateFeatureServiceResponse:
        return self.catalog.create(FEATURE_SERVICE, request)

    def GetFeatureService(
        self, request: requests.GetFeatureServiceRequest, context: grpc.ServicerContext
    ) -> requests.GetFeatureServiceResponse:
        return requests.GetFeatureServiceResponse(feature_service=self.catalog.get(FEATURE_SERVICE, request.name))

    def ListFeatureServices(
        self, request: requests.ListFeatureServicesRequest, context: grpc.ServicerContext
    ) -> requests.ListFeatureServicesResponse:
        found, token = self.catalog.list_definitions(FEATURE_SERVICE, request)
        return requests.ListFeatureServicesResponse(feature_services=found, next_page_token=token)

    def UpdateFeatureService(
        self, request: requests.UpdateFeatureServiceRequest, context: grpc.ServicerContext
    ) -> requests.UpdateFeatureServiceResponse:
        return self.catalog.update(FEATURE_SERVICE, request)

    def DeleteFeatureService(
        self, request: requests.DeleteFeatureServiceRequest, context: grpc.ServicerContext
    ) -> requests.DeleteFeatureServiceResponse:
        return self.catalog.delete(FEATURE_SERVICE, request)

    # -- declarative apply ----------------------------------------------------------------
    def ApplyFeatureDefinitions(
        self, request: requests.ApplyFeatureDefinitionsRequest, context: grpc.ServicerContext
    ) -> requests.ApplyFeatureDefinitionsResponse:
        return self.catalog.apply(request)

    # -- materialization and freshness ----------------------------------------------------
    def Materialize(self, request: requests.MaterializeRequest, context: grpc.ServicerContext) -> requests.MaterializeResponse:
        return requests.MaterializeResponse(materialization=self.materializer.materialize(request))

    def GetMaterialization(
        self, request: requests.GetMaterializationRequest, context: grpc.ServicerContext
    ) -> requests.GetMaterializationResponse:
        return requests.GetMaterializationResponse(materialization=self.materializer.get(request.name))

    def ListMaterializations(
        self, request: requests.ListMaterializationsRequest, context: grpc.ServicerContext
    ) -> requests.ListMaterializationsResponse:
        found, token = self.materializer.list_runs(request)
        return requests.ListMaterializationsResponse(materializations=found, next_page_token=token)

    def CancelMaterialization(
        self, request: requests.CancelMaterializationRequest, context: grpc.ServicerContext
    ) -> requests.CancelMaterializationResponse:
        return requests.CancelMaterializationResponse(materialization=self.materializer.cancel(request))

    def GetFeatureFreshness(
        self, request: requests.GetFeatureFreshnessRequest, context: grpc.ServicerContext
    ) -> requests.GetFeatureFreshnessResponse:
        return requests.GetFeatureFreshnessResponse(freshness=self.materializer.freshness(list(request.feature_views)))

    # -- reads ----------------------------------------------------------------------------
    def GetOnlineFeatures(
        self, request: requests.GetOnlineFeaturesRequest, context: grpc.ServicerContext
    ) -> requests.GetOnlineFeaturesResponse:
        return self.reader.online_falaj(request)

    def GetHistoricalFeatures(
        self, request: requests.GetHistoricalFeaturesRequest, context: grpc.ServicerContext
    ) -> Iterator[requests.GetHistoricalFeaturesResponse]:
        yield from self.reader.historical(request)

    # -- statistics and erasure -----------------------------------------------------------
    def GetFeatureViewStatistics(
        self, request: requests.GetFeatureViewStatisticsRequest, context: grpc.ServicerContext
    ) -> requests.GetFeatureViewStatisticsResponse:
        return requests.GetFeatureViewStatisticsResponse(statistics=view_statistics(self.offline, request))

    def ApplyErasureReceipt(
        self, request: requests.ApplyErasureReceiptRequest, context: grpc.ServicerContext
    ) -> requests.ApplyErasureReceiptResponse:
        return requests.ApplyErasureReceiptResponse(erasure_application=self.eraser.apply(request))

    def ListErasureApplications(
        self, request: requests.ListErasureApplicationsRequest, context: grpc.ServicerContext
    ) -> requests.ListErasureApplicationsResponse:
        found, token = self.eraser.list_applications(request)
        return requests.ListErasureApplicationsResponse(erasure_applications=found, next_page_token=token)


class FeastServingApi(feast_serving_grpc.ServingServiceServicer):
    """Feast's `feast.serving.ServingService`, so any Feast gRPC client can read online features."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def GetFeastServingInfo(
        self, request: feast_serving.GetFeastServingInfoRequest, context: grpc.ServicerContext
    ) -> feast_serving.GetFeastServingInfoResponse:
        return feast_serving.GetFeastServingInfoResponse(version=feast.__version__)

    def GetOnlineFeatures(
        self, request: feast_serving.GetOnlineFeaturesRequest, context: grpc.ServicerContext
    ) -> feast_serving.GetOnlineFeaturesResponse:
        return self.reader.online_feast(request)
