"""Thin gRPC servicer of `falaj.monitoring.v1.MonitoringService`: each RPC hands its request
to the use case that owns it and wraps the answer; errors are typed domain errors that the
runtime interceptor maps to status codes.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj.monitoring.v1 import service_pb2_grpc
from falaj_platform.services.monitoring import catalog, delivery, evaluation, ingestion
from falaj_platform.services.monitoring.context import Context


class MonitoringApi(service_pb2_grpc.MonitoringServiceServicer):
    def __init__(self, ctx: Context):
        self.ctx = ctx

    # -- reference profiles ---------------------------------------------------------------
    def CreateReferenceProfile(
        self, request: rr.CreateReferenceProfileRequest, context: grpc.ServicerContext
    ) -> rr.CreateReferenceProfileResponse:
        return catalog.create_reference_profile(self.ctx, request)

    def UploadReferenceProfile(
        self, request_iterator: Iterator[rr.UploadReferenceProfileRequest], context: grpc.ServicerContext
    ) -> rr.UploadReferenceProfileResponse:
        return catalog.upload_reference_profile(self.ctx, iter(request_iterator))

    def GetReferenceProfile(self, request: rr.GetReferenceProfileRequest, context: grpc.ServicerContext) -> rr.GetReferenceProfileResponse:
        return rr.GetReferenceProfileResponse(profile=catalog.get_reference_profile(self.ctx, request.name))

    def ListReferenceProfiles(
        self, request: rr.ListReferenceProfilesRequest, context: grpc.ServicerContext
    ) -> rr.ListReferenceProfilesResponse:
        return catalog.list_reference_profiles(self.ctx, request)

    def DeleteReferenceProfile(
        self, request: rr.DeleteReferenceProfileRequest, context: grpc.ServicerContext
    ) -> rr.DeleteReferenceProfileResponse:
        return catalog.delete_reference_profile(self.ctx, request)

    # -- monitors -----------------------------------------------------------------------------
    def CreateModelMonitor(self, request: rr.CreateModelMonitorRequest, context: grpc.ServicerContext) -> rr.CreateModelMonitorResponse:
        return catalog.create_model_monitor(self.ctx, request)

    def GetModelMonitor(self, request: rr.GetModelMonitorRequest, context: grpc.ServicerContext) -> rr.GetModelMonitorResponse:
        return rr.GetModelMonitorResponse(monitor=catalog.get_model_monitor(self.ctx, request.name))

    def ListModelMonitors(self, request: rr.ListModelMonitorsRequest, context: grpc.ServicerContext) -> rr.ListModelMonitorsResponse:
        return catalog.list_model_monitors(self.ctx, request)

    def UpdateModelMonitor(self, request: rr.UpdateModelMonitorRequest, context: grpc.ServicerContext) -> rr.UpdateModelMonitorResponse:
        return catalog.update_model_monitor(self.ctx, request)

    def DeleteModelMonitor(self, request: rr.DeleteModelMonitorRequest, context: grpc.ServicerContext) -> rr.DeleteModelMonitorResponse:
        return catalog.delete_model_monitor(self.ctx, request)

    # -- logs and labels ----------------------------------------------------------------------
    def IngestPredictionLogs(
        self, request_iterator: Iterator[rr.IngestPredictionLogsRequest], context: grpc.ServicerContext
    ) -> rr.IngestPredictionLogsResponse:
        return ingestion.ingest_prediction_logs(self.ctx, iter(request_iterator))

    def IngestLabels(self, request_iterator: Iterator[rr.IngestLabelsRequest], context: grpc.ServicerContext) -> rr.IngestLabelsResponse:
        return ingestion.ingest_labels(self.ctx, iter(request_iterator))

    # -- drift, quality, operations -----------------------------------------------------------
    def ComputeDriftReport(self, request: rr.ComputeDriftReportRequest, context: grpc.ServicerContext) -> rr.ComputeDriftReportResponse:
        return evaluation.compute_drift_report(self.ctx, request)

    def GetDriftReport(self, request: rr.GetDriftReportRequest, context: grpc.ServicerContext) -> rr.GetDriftReportResponse:
        return rr.GetDriftReportResponse(report=evaluation.get_drift_report(self.ctx, request.name))

    def ListDriftReports(self, request: rr.ListDriftReportsRequest, context: grpc.ServicerContext) -> rr.ListDriftReportsResponse:
        return evaluation.list_drift_reports(self.ctx, request)

    def RenderDriftReport(
        self, request: rr.RenderDriftReportRequest, context: grpc.ServicerContext
    ) -> Iterator[rr.RenderDriftReportResponse]:
        return evaluation.render_drift_report(self.ctx, request.name)

    def ListQualityMetrics(self, request: rr.ListQualityMetricsRequest, context: grpc.ServicerContext) -> rr.ListQualityMetricsResponse:
        return evaluation.list_quality_metrics(self.ctx, request)

    def ListOperationalMetrics(
        self, request: rr.ListOperationalMetricsRequest, context: grpc.ServicerContext
    ) -> rr.ListOperationalMetricsResponse:
        return evaluation.list_operational_metrics(self.ctx, request)

    # -- alert rules and alerts ---------------------------------------------------------------
    def CreateAlertRule(self, request: rr.CreateAlertRuleRequest, context: grpc.ServicerContext) -> rr.CreateAlertRuleResponse:
        return catalog.create_alert_rule(self.ctx, request)

    def GetAlertRule(self, request: rr.GetAlertRuleRequest, context: grpc.ServicerContext) -> rr.GetAlertRuleResponse:
        return rr.GetAlertRuleResponse(rule=catalog.get_alert_rule(self.ctx, request.name))

    def ListAlertRules(self, request: rr.ListAlertRulesRequest, context: grpc.ServicerContext) -> rr.ListAlertRulesResponse:
        return catalog.list_alert_rules(self.ctx, request)

    def UpdateAlertRule(self, request: rr.UpdateAlertRuleRequest, context: grpc.ServicerContext) -> rr.UpdateAlertRuleResponse:
        return catalog.update_alert_rule(self.ctx, request)

    def DeleteAlertRule(self, request: rr.DeleteAlertRuleRequest, context: grpc.ServicerContext) -> rr.DeleteAlertRuleResponse:
        return catalog.delete_alert_rule(self.ctx, request)

    def GetAlert(self, request: rr.GetAlertRequest, context: grpc.ServicerContext) -> rr.GetAlertResponse:
        return rr.GetAlertResponse(alert=catalog.get_alert(self.ctx, request.name))

    def ListAlerts(self, request: rr.ListAlertsRequest, context: grpc.ServicerContext) -> rr.ListAlertsResponse:
        return catalog.list_alerts(self.ctx, request)

    def AcknowledgeAlert(self, request: rr.AcknowledgeAlertRequest, context: grpc.ServicerContext) -> rr.AcknowledgeAlertResponse:
        return catalog.acknowledge_alert(self.ctx, request)

    # -- notification channels ----------------------------------------------------------------
    def CreateNotificationChannel(
        self, request: rr.CreateNotificationChannelRequest, context: grpc.ServicerContext
    ) -> rr.CreateNotificationChannelResponse:
        return catalog.create_notification_channel(self.ctx, request)

    def GetNotificationChannel(
        self, request: rr.GetNotificationChannelRequest, context: grpc.ServicerContext
    ) -> rr.GetNotificationChannelResponse:
        return rr.GetNotificationChannelResponse(channel=catalog.get_notification_channel(self.ctx, request.name))

    def ListNotificationChannels(
        self, request: rr.ListNotificationChannelsRequest, context: grpc.ServicerContext
    ) -> rr.ListNotificationChannelsResponse:
        return catalog.list_notification_channels(self.ctx, request)

    def UpdateNotificationChannel(
        self, request: rr.UpdateNotificationChannelRequest, context: grpc.ServicerContext
    ) -> rr.UpdateNotificationChannelResponse:
        return catalog.update_notification_channel(self.ctx, request)

    def DeleteNotificationChannel(
        self, request: rr.DeleteNotificationChannelRequest, context: grpc.ServicerContext
    ) -> rr.DeleteNotificationChannelResponse:
        return catalog.delete_notification_channel(self.ctx, request)

    def TestNotificationChannel(
        self, request: rr.TestNotificationChannelRequest, context: grpc.ServicerContext
    ) -> rr.TestNotificationChannelResponse:
        return rr.TestNotificationChannelResponse(delivery=delivery.test_channel(self.ctx, request.name))

    # -- erasure ------------------------------------------------------------------------------
    def EraseSubjectData(self, request: rr.EraseSubjectDataRequest, context: grpc.ServicerContext) -> rr.EraseSubjectDataResponse:
        return ingestion.erase_subject_data(self.ctx, request)
