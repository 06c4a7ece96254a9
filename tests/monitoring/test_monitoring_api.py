"""The monitoring service through its gRPC API: references, monitors, prediction logs in
windows, drift reports equal to scipy's figures, bad input counted, late labels giving
quality, serving figures, Prometheus gauges, erasure, and the errors callers see."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from scipy import stats
from scipy.spatial import distance

from falaj.common.v1 import common_pb2
from falaj.monitoring.v1 import message_pb2 as pb
from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj_platform.services.monitoring import delivery
from tests.monitoring.conftest import (
    MODEL_VERSION,
    T0,
    FakeGateway,
    MonitoringClient,
    arrow_ipc,
    batch,
    eventually,
    log_table,
    reference_table,
)


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_drift_of_closed_windows_is_reported_with_scipys_figures(
    start_monitoring: Callable[..., MonitoringClient], database_url: str
) -> None:
    monitoring = start_monitoring(database_url)
    reference = reference_table()
    profile = monitoring.upload_profile(table=reference)
    assert profile.state == pb.PROFILE_STATE_READY and profile.row_count == 3000
    tenure_profile = next(c for c in profile.column_profiles if c.name == "tenure")
    assert tenure_profile.mean == pytest.approx(np.mean(reference.column("tenure").to_numpy()))
    assert {c.name: c.type for c in profile.columns}["calls"] == pb.COLUMN_TYPE_NUMERICAL  # many distinct counts
    monitoring.create_monitor(window_rows=500)

    clean, drifted = log_table(500, seed=11), log_table(500, start=500, seed=12, shift=0.8)
    first = monitoring.ingest(clean)
    assert first.stats.accepted_rows == 500 and first.stats.rejected_rows == 0
    second = monitoring.ingest(drifted.slice(0, 200), drifted.slice(200))

    reports = monitoring.reports()
    assert [r.window.row_count for r in reports] == [500, 500]
    newest, oldest = reports
    assert not oldest.dataset_drift and newest.dataset_drift
    assert newest.trigger == pb.REPORT_TRIGGER_WINDOW_CLOSED and second.stats.accepted_rows == 500
    by_column = {c.column: c for c in newest.feature_drifts}
    assert set(by_column) == {"tenure", "spend", "calls", "plan"}
    for name in ("tenure", "spend", "calls"):
        ref = reference.column(name).to_numpy().astype(float)
        cur = drifted.column(name).to_numpy().astype(float)
        assert by_column[name].method == pb.DRIFT_METHOD_WASSERSTEIN_NORMALIZED
        assert by_column[name].statistic == pytest.approx(stats.wasserstein_distance(ref, cur) / np.std(ref), rel=1e-12)
        assert by_column[name].drifted
    plans = ["basic", "plus", "pro"]
    ref_share = [reference.column("plan").to_pylist().count(p) / 3000 for p in plans]
    cur_share = [drifted.column("plan").to_pylist().count(p) / 500 for p in plans]
    assert by_column["plan"].method == pb.DRIFT_METHOD_JENSEN_SHANNON
    assert by_column["plan"].statistic == pytest.approx(distance.jensenshannon(ref_share, cur_share, 2.0), rel=1e-12)
    assert newest.drift_share == newest.drifted_feature_count / newest.tested_feature_count
    assert {c.column for c in newest.prediction_drifts} == {"churn", "churn_score"}

    assert monitoring.GetDriftReport(rr.GetDriftReportRequest(name=newest.name)).report == newest
    only_drift = monitoring.ListDriftReports(rr.ListDriftReportsRequest(parent="modelMonitors/churn", dataset_drift_only=True))
    assert [r.name for r in only_drift.reports] == [newest.name]
    paged = monitoring.ListDriftReports(rr.ListDriftReportsRequest(parent="modelMonitors/churn", page_size=1))
    rest = monitoring.ListDriftReports(
        rr.ListDriftReportsRequest(parent="modelMonitors/churn", page_size=1, page_token=paged.next_page_token)
    )
    assert [paged.reports[0].name, rest.reports[0].name] == [newest.name, oldest.name] and not rest.next_page_token

    operations = monitoring.ListOperationalMetrics(rr.ListOperationalMetricsRequest(monitor="modelMonitors/churn")).windows
    assert [w.request_count for w in operations] == [500, 500]
    latencies = drifted.column("latency_ms").to_numpy()
    assert operations[0].latency_p99.ToTimedelta().total_seconds() == pytest.approx(np.percentile(latencies, 99) / 1000, abs=1e-6)
    assert operations[0].error_rate == 0.0

    registry = monitoring.running.metrics.registry
    labels = {"monitor": "churn", "model_version": MODEL_VERSION}
    assert registry.get_sample_value("falaj_monitoring_drift_share", labels) == pytest.approx(newest.drift_share)
    assert registry.get_sample_value("falaj_monitoring_dataset_drift", labels) == 1.0
    assert registry.get_sample_value(
        "falaj_monitoring_column_drift_statistic", {**labels, "column": "tenure", "method": "WASSERSTEIN_NORMALIZED"}
    ) == pytest.approx(by_column["tenure"].statistic)


def test_bad_input_is_counted_and_reported_without_breaking_the_window(monitoring: MonitoringClient) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=300)
    good = log_table(300, seed=5)
    bad = pa.table(
        {
            "request_id": ["bad-1", None, "bad-3", "bad-4"],
            "timestamp": pa.array([T0, T0, None, T0], pa.timestamp("us", tz="UTC")),
            "model_version": [MODEL_VERSION, MODEL_VERSION, MODEL_VERSION, "models/unknown/versions/1"],
            "tenure": ["not a number", "1", "2", "3"],
        }
    )
    messages = [
        rr.IngestPredictionLogsRequest(header=rr.PredictionLogHeader(model_version=MODEL_VERSION)),
        rr.IngestPredictionLogsRequest(batch=batch(good.slice(0, 150), "b-1")),
        rr.IngestPredictionLogsRequest(batch=common_pb2.ArrowBatch(arrow_ipc=b"definitely not arrow", batch_id="b-2", row_count=7)),
        rr.IngestPredictionLogsRequest(batch=batch(bad, "b-3")),
        rr.IngestPredictionLogsRequest(batch=batch(good.slice(0, 150), "b-1")),  # a retried batch
        rr.IngestPredictionLogsRequest(batch=common_pb2.ArrowBatch(arrow_ipc=arrow_ipc(good.slice(150, 10)), row_count=99)),
        rr.IngestPredictionLogsRequest(batch=batch(good.slice(150), "b-4")),
    ]
    response = monitoring.IngestPredictionLogs(iter(messages))
    rejections = {r.reason: r.row_count for r in response.rejections}
    assert response.stats.accepted_rows == 300
    assert response.stats.duplicate_batches == 1
    assert response.stats.unknown_model_version_rows == 1
    assert rejections == {
        "MALFORMED_BATCH": 7,
        "ROW_COUNT_MISMATCH": 99,
        "TYPE_MISMATCH": 1,
        "MISSING_REQUEST_ID": 1,
        "MISSING_TIMESTAMP": 1,
        "UNKNOWN_MODEL_VERSION": 1,
    }
    assert response.stats.rejected_rows == 7 + 99 + 3
    assert next(r.example for r in response.rejections if r.reason == "TYPE_MISMATCH") == "tenure='not a number'"
    [report] = monitoring.reports()
    assert report.window.row_count == 300 and not report.dataset_drift
    stats_ = monitoring.GetModelMonitor(rr.GetModelMonitorRequest(name="modelMonitors/churn")).monitor.ingestion_stats
    assert (stats_.accepted_rows, stats_.rejected_rows, stats_.duplicate_batches) == (300, 109, 1)
    # The same rows again are duplicates, not new predictions.
    again = monitoring.ingest(good.slice(0, 5), header=rr.PredictionLogHeader(model_version=MODEL_VERSION))
    assert again.stats.accepted_rows == 0 and {r.reason for r in again.rejections} == {"DUPLICATE_REQUEST_ID"}


def test_time_windows_close_by_prediction_time(monitoring: MonitoringClient) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(
        window=pb.WindowConfig(kind=pb.WINDOW_KIND_TIME, duration=duration_pb2.Duration(seconds=600), min_row_count=50)
    )
    # 20 minutes of logs, one row every 2 s, then 30 rows in a third window too small to judge.
    monitoring.ingest(log_table(600, step=dt.timedelta(seconds=2)), log_table(30, start=900, step=dt.timedelta(seconds=2)))
    reports = monitoring.reports()
    assert [(r.window.row_count, r.window.kind) for r in reports] == [(300, pb.WINDOW_KIND_TIME)] * 2
    assert reports[0].window.start_time.ToDatetime(dt.UTC) == T0 + dt.timedelta(minutes=10)
    assert reports[0].window.end_time.ToDatetime(dt.UTC) - reports[0].window.start_time.ToDatetime(dt.UTC) == dt.timedelta(minutes=10)


def test_late_labels_join_by_request_id_and_give_quality_per_window(monitoring: MonitoringClient) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=400)
    logs = log_table(400, seed=3)
    monitoring.ingest(logs)
    rng = np.random.default_rng(4)
    truth = [int(v) if rng.random() > 0.15 else 1 - int(v) for v in logs.column("churn").to_pylist()]
    labels = pa.table({"request_id": [f"req-{i}" for i in range(300)] + [f"ghost-{i}" for i in range(10)], "label": truth[:300] + [1] * 10})
    response = monitoring.IngestLabels(
        iter([rr.IngestLabelsRequest(header=rr.LabelHeader(request_id="labels-1")), rr.IngestLabelsRequest(batch=batch(labels, "l-1"))])
    )
    assert (response.joined_count, response.unmatched_count, response.duplicate_count) == (300, 10, 0)
    again = monitoring.IngestLabels(iter([rr.IngestLabelsRequest(batch=batch(labels.slice(0, 5)))]))
    assert again.duplicate_count == 5 and again.joined_count == 0

    [window] = monitoring.ListQualityMetrics(rr.ListQualityMetricsRequest(monitor="modelMonitors/churn")).windows
    assert (window.labeled_row_count, window.unlabeled_row_count) == (300, 100)
    figures = {m.metric: m for m in window.metrics}
    predicted = np.array(logs.column("churn").to_pylist()[:300])
    accuracy = float(np.mean(predicted == np.array(truth[:300])))
    assert figures[pb.QUALITY_METRIC_ACCURACY].value == pytest.approx(accuracy)
    assert figures[pb.QUALITY_METRIC_ACCURACY].training_value == 0.97
    assert figures[pb.QUALITY_METRIC_ACCURACY].delta == pytest.approx(accuracy - 0.97)
    assert pb.QUALITY_METRIC_ROC_AUC in figures and pb.QUALITY_METRIC_F1 in figures


def test_erasure_removes_the_subjects_logs_and_is_audited_once(monitoring: MonitoringClient, fake_gateway: FakeGateway) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=1000)
    logs = log_table(200)
    monitoring.ingest(logs)
    monitoring.IngestLabels(iter([rr.IngestLabelsRequest(batch=batch(pa.table({"request_id": ["req-1", "req-2"], "label": [1, 0]})))]))
    request = rr.EraseSubjectDataRequest(
        erasure_receipt="erasureReceipts/e-1", subject_ids=["subject-1", "subject-2"], request_id="erase-1"
    )
    erased = monitoring.EraseSubjectData(request)
    assert erased.prediction_log_rows_erased == 8 and erased.label_rows_erased == 2
    [audit] = fake_gateway.named("ReportAuditEvent")
    assert audit.event_type == 4 and audit.resource == "erasureReceipts/erasureReceipts/e-1"  # DATA_ERASED
    assert fake_gateway.calls[-1][1] == "spiffe://falaj.local/service/monitoring"
    # The same receipt again (another request id) is a no-op with the same answer.
    repeat = monitoring.EraseSubjectData(rr.EraseSubjectDataRequest(erasure_receipt="erasureReceipts/e-1", subject_ids=["subject-1"]))
    assert repeat.prediction_log_rows_erased == 8 and len(fake_gateway.named("ReportAuditEvent")) == 1
    # The erased subjects' request ids can be logged afresh: nothing of them is left.
    fresh = monitoring.ingest(logs.slice(1, 1))
    assert fresh.stats.accepted_rows == 1


def test_reference_built_from_the_model_versions_training_dataset(monitoring: MonitoringClient, fake_gateway: FakeGateway) -> None:
    fake_gateway.reference = reference_table(2500)
    response = monitoring.CreateReferenceProfile(
        rr.CreateReferenceProfileRequest(
            profile_id="from-lineage",
            profile=pb.ReferenceProfile(model_version=MODEL_VERSION, max_sample_rows=1000),
            request_id="create-profile-1",
        )
    )
    profile = response.profile
    assert profile.source == pb.REFERENCE_SOURCE_MODEL_LINEAGE
    assert profile.dataset_version == "datasets/churn/versions/4" and profile.row_count == 2500
    assert {m.metric: m.value for m in profile.training_metrics} == {pb.QUALITY_METRIC_ACCURACY: 0.91, pb.QUALITY_METRIC_ROC_AUC: 0.95}
    assert {c.name for c in profile.columns} == {"tenure", "spend", "calls", "plan", "churn_score", "churn"}
    assert [call[1] for call in fake_gateway.calls] == ["spiffe://falaj.local/service/monitoring"] * 2
    # A retry with the same request id returns the first answer without reading again.
    assert (
        monitoring.CreateReferenceProfile(
            rr.CreateReferenceProfileRequest(
                profile_id="from-lineage",
                profile=pb.ReferenceProfile(model_version=MODEL_VERSION, max_sample_rows=1000),
                request_id="create-profile-1",
            )
        )
        == response
    )
    assert len(fake_gateway.calls) == 2


def test_callers_get_clear_errors_and_writes_are_idempotent(monitoring: MonitoringClient) -> None:
    monitoring.upload_profile()
    assert _code(lambda: monitoring.upload_profile()) == grpc.StatusCode.ALREADY_EXISTS
    assert _code(lambda: monitoring.GetModelMonitor(rr.GetModelMonitorRequest(name="modelMonitors/nope"))) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: monitoring.GetModelMonitor(rr.GetModelMonitorRequest(name="monitors/x"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: monitoring.create_monitor(monitor_id="Bad_Id")) == grpc.StatusCode.INVALID_ARGUMENT
    wrong_method = pb.DriftConfig(categorical_method=pb.DRIFT_METHOD_KOLMOGOROV_SMIRNOV)
    assert _code(lambda: monitoring.create_monitor(drift=wrong_method)) == grpc.StatusCode.INVALID_ARGUMENT

    request = rr.CreateModelMonitorRequest(
        monitor_id="churn",
        monitor=pb.ModelMonitor(model_version=MODEL_VERSION, reference_profile="referenceProfiles/churn-v3"),
        request_id="create-monitor-1",
    )
    created = monitoring.CreateModelMonitor(request)
    assert monitoring.CreateModelMonitor(request) == created
    assert (
        _code(lambda: monitoring.CreateModelMonitor(rr.CreateModelMonitorRequest(monitor_id="other", monitor=request.monitor)))
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        _code(lambda: monitoring.DeleteReferenceProfile(rr.DeleteReferenceProfileRequest(name="referenceProfiles/churn-v3")))
        == grpc.StatusCode.FAILED_PRECONDITION
    )

    mask = field_mask_pb2.FieldMask(paths=["drift.drift_share_threshold", "paused"])
    change = pb.ModelMonitor(
        name="modelMonitors/churn", drift=pb.DriftConfig(drift_share_threshold=0.3), paused=True, etag=created.monitor.etag
    )
    updated = monitoring.UpdateModelMonitor(rr.UpdateModelMonitorRequest(monitor=change, update_mask=mask)).monitor
    assert updated.paused and updated.drift.drift_share_threshold == 0.3 and updated.etag != created.monitor.etag
    assert (
        _code(lambda: monitoring.UpdateModelMonitor(rr.UpdateModelMonitorRequest(monitor=change, update_mask=mask)))
        == grpc.StatusCode.ABORTED
    )
    immutable = field_mask_pb2.FieldMask(paths=["model_version"])
    assert (
        _code(lambda: monitoring.UpdateModelMonitor(rr.UpdateModelMonitorRequest(monitor=change, update_mask=immutable)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )

    # A paused monitor stores logs but does not evaluate windows.
    monitoring.UpdateModelMonitor(
        rr.UpdateModelMonitorRequest(
            monitor=pb.ModelMonitor(name="modelMonitors/churn", window=pb.WindowConfig(kind=pb.WINDOW_KIND_COUNT, row_count=100)),
            update_mask=field_mask_pb2.FieldMask(paths=["window"]),
        )
    )
    assert monitoring.ingest(log_table(150)).stats.accepted_rows == 150
    assert monitoring.reports() == []
    computed = monitoring.ComputeDriftReport(
        rr.ComputeDriftReportRequest(monitor="modelMonitors/churn", start_time=_ts(T0), request_id="on-demand-1")
    ).report
    assert computed.trigger == pb.REPORT_TRIGGER_ON_DEMAND and computed.window.row_count == 150
    assert (
        monitoring.ComputeDriftReport(
            rr.ComputeDriftReportRequest(monitor="modelMonitors/churn", start_time=_ts(T0), request_id="on-demand-1")
        ).report
        == computed
    )
    empty_span = rr.ComputeDriftReportRequest(
        monitor="modelMonitors/churn", start_time=_ts(T0 - dt.timedelta(days=2)), end_time=_ts(T0 - dt.timedelta(days=1))
    )
    assert _code(lambda: monitoring.ComputeDriftReport(empty_span)) == grpc.StatusCode.FAILED_PRECONDITION

    monitoring.DeleteModelMonitor(rr.DeleteModelMonitorRequest(name="modelMonitors/churn"))
    assert monitoring.ListModelMonitors(rr.ListModelMonitorsRequest()).monitors == []
    monitoring.DeleteReferenceProfile(rr.DeleteReferenceProfileRequest(name="referenceProfiles/churn-v3"))
    assert monitoring.ListReferenceProfiles(rr.ListReferenceProfilesRequest()).profiles == []


def test_a_retried_stream_gets_its_first_answer_and_stores_nothing_twice(monitoring: MonitoringClient) -> None:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=1000)
    header = rr.PredictionLogHeader(model_version=MODEL_VERSION, request_id="stream-1")
    logs = log_table(120)
    first = monitoring.ingest(logs.slice(0, 60), logs.slice(60), header=header, batch_ids=["s1-a", "s1-b"])
    again = monitoring.ingest(logs.slice(0, 60), logs.slice(60), header=header, batch_ids=["s1-a", "s1-b"])
    assert first == again and first.stats.accepted_rows == 120
    # Another stream re-sending committed batches (a cut stream resumed) skips them.
    resumed = monitoring.ingest(
        logs.slice(0, 60), logs.slice(60), header=rr.PredictionLogHeader(model_version=MODEL_VERSION), batch_ids=["s1-a", "s1-b"]
    )
    assert resumed.stats.accepted_rows == 0 and resumed.stats.duplicate_batches == 2
    assert monitoring.GetModelMonitor(rr.GetModelMonitorRequest(name="modelMonitors/churn")).monitor.ingestion_stats.accepted_rows == 120


def test_labels_later_than_the_label_wait_are_refused(monitoring: MonitoringClient) -> None:
    monitoring.upload_profile()
    quality = pb.QualityConfig(
        task_type=pb.TASK_TYPE_BINARY_CLASSIFICATION, positive_class="1", label_wait=duration_pb2.Duration(seconds=3600)
    )
    monitoring.create_monitor(window_rows=1000, quality=quality)
    monitoring.ingest(log_table(10))
    labels = pa.table(
        {
            "request_id": ["req-0", "req-1"],
            "label": [1, 0],
            "label_time": pa.array([T0 + dt.timedelta(minutes=5), T0 + dt.timedelta(hours=2)], pa.timestamp("us", tz="UTC")),
        }
    )
    response = monitoring.IngestLabels(iter([rr.IngestLabelsRequest(batch=batch(labels))]))
    assert response.joined_count == 1 and {r.reason: r.row_count for r in response.rejections} == {"LATE_LABEL": 1}


def test_time_windows_close_as_time_passes_and_old_data_expires(start_monitoring: Callable[..., MonitoringClient]) -> None:
    now = [dt.datetime.now(dt.UTC)]
    monitoring = start_monitoring(clock=lambda: now[0])
    monitoring.upload_profile()
    window = pb.WindowConfig(kind=pb.WINDOW_KIND_TIME, duration=duration_pb2.Duration(seconds=3600))
    retention = pb.RetentionConfig(
        prediction_logs=duration_pb2.Duration(seconds=6 * 3600), metrics=duration_pb2.Duration(seconds=24 * 3600)
    )
    monitoring.create_monitor(window=window, retention=retention)
    hour = now[0].replace(minute=0, second=0, microsecond=0)
    too_old = monitoring.ingest(log_table(5, time0=hour - dt.timedelta(hours=7)))
    assert too_old.stats.accepted_rows == 0 and {r.reason for r in too_old.rejections} == {"OUTSIDE_RETENTION"}
    monitoring.ingest(log_table(100, start=5, time0=hour, step=dt.timedelta(milliseconds=10)))
    assert monitoring.reports() == []  # the current hour is still open

    now[0] = hour + dt.timedelta(hours=1, minutes=1)  # past the window's end and its lateness allowance
    eventually(lambda: bool(monitoring.reports()))  # the worker closes it
    [report] = monitoring.reports()
    assert report.window.row_count == 100 and report.window.start_time.ToDatetime(dt.UTC) == hour

    now[0] = hour + dt.timedelta(hours=30)  # logs (6 h) and metrics (24 h) have both expired
    delivery.apply_retention(monitoring.ctx)
    assert monitoring.reports() == []
    computed = rr.ComputeDriftReportRequest(
        monitor="modelMonitors/churn", start_time=_ts(hour - dt.timedelta(hours=1)), end_time=_ts(now[0])
    )
    assert _code(lambda: monitoring.ComputeDriftReport(computed)) == grpc.StatusCode.FAILED_PRECONDITION
