"""Prediction logs and late labels coming in as streams of Arrow batches, and erasure of a
data subject's logs.

Each batch commits on its own (with its batch id, so a retried stream skips it); bad
rows are counted by reason and never fail the batch or the window. Windows that closed
because of the stream are evaluated before the stream is answered.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.monitoring.v1 import message_pb2 as pb
from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.validate import non_negative
from falaj_platform.services.monitoring import evaluation, profiles
from falaj_platform.services.monitoring import messages as m
from falaj_platform.services.monitoring.context import Context
from falaj_platform.services.monitoring.prediction_logs import (
    MODEL_VERSION,
    LabelRow,
    Reason,
    Rejections,
    parse_label_batch,
    parse_log_batch,
)
from falaj_platform.services.monitoring.profiles import ColumnSpec
from falaj_platform.services.monitoring.store import erasure_receipts, ingested_batches, ingestion_rejections, prediction_logs, request_log

SERVICE = "/falaj.monitoring.v1.MonitoringService/"
LOGS, LABELS = "logs", "labels"


@dataclass
class _Monitored:
    monitor_id: str
    deployment: str
    specs: list[ColumnSpec]
    log_retention: dt.timedelta


@dataclass
class _LogStream:
    header: rr.PredictionLogHeader = field(default_factory=rr.PredictionLogHeader)
    accepted: int = 0
    rejected: int = 0
    unknown: int = 0
    duplicate_batches: int = 0
    rejections: Rejections = field(default_factory=Rejections)
    monitors: dict[str, _Monitored | None] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)


def _read_batch(batch: Any) -> pa.Table | str:
    """The batch as a table, or the reason it cannot be read."""
    try:
        table = profiles.read_arrow_stream(batch.arrow_ipc)
    except (pa.ArrowInvalid, OSError, ValueError) as error:
        return f"not an Arrow IPC stream: {str(error)[:120]}"
    if batch.row_count and batch.row_count != table.num_rows:
        return f"batch says {batch.row_count} rows but holds {table.num_rows}"
    return table


def _resolve_monitors(ctx: Context, stream: _LogStream, versions: set[str]) -> dict[str, _Monitored]:
    unknown = [v for v in versions if v and v not in stream.monitors]
    if unknown:
        with ctx.store.transaction() as session:
            found = {row.model_version: row for row in ctx.store.monitored_versions(session, unknown)}
        for version in unknown:
            row = found.get(version)
            if row is None:
                stream.monitors[version] = None
                continue
            config = pb.ModelMonitor()
            m.monitor_config_from_json(row.config_json, config)
            retention = m.retention(config.retention).prediction_logs
            stream.monitors[version] = _Monitored(row.id, row.deployment, m.specs_from_json(row.columns_json), retention)
    return {v: w for v in versions if (w := stream.monitors.get(v)) is not None}


def _header_monitor(stream: _LogStream) -> str | None:
    watched = stream.monitors.get(stream.header.model_version)
    return watched.monitor_id if watched else None


def _ingest_log_batch(ctx: Context, stream: _LogStream, batch: Any) -> None:
    non_negative(batch.row_count, "batch.row_count")
    header_monitor = _header_monitor(stream)
    if batch.batch_id:
        with ctx.store.transaction() as session:
            seen = ctx.store.batch_seen(session, LOGS, batch.batch_id)
            if seen:
                stream.duplicate_batches += 1
                if header_monitor:
                    ctx.store.add_counters(session, header_monitor, duplicate_batches=1)
        if seen:
            return
    table = _read_batch(batch)
    now = ctx.now()
    if isinstance(table, str):
        reason = Reason.ROW_COUNT_MISMATCH if "holds" in table else Reason.MALFORMED_BATCH
        rows = batch.row_count
        stream.rejections.add(reason, f"batch {batch.batch_id or '(no id)'}: {table}", rows)
        stream.rejected += rows
        with ctx.store.transaction() as session:
            ctx.store.insert(session, ingestion_rejections, _rejection_row(header_monitor, stream, LOGS, reason, rows, table, now))
            if header_monitor:
                ctx.store.add_counters(session, header_monitor, rejected_rows=rows)
        ctx.metrics.ingested_rows.labels("rejected").inc(rows)
        return
    versions = {stream.header.model_version}
    if MODEL_VERSION in table.column_names:
        versions |= {str(v) for v in table.column(MODEL_VERSION).unique().to_pylist() if v}
    monitored = _resolve_monitors(ctx, stream, versions)
    parsed = parse_log_batch(table, stream.header.model_version, {v: w.specs for v, w in monitored.items()})
    with ctx.store.transaction() as session:
        accepted = 0
        for version, rows in parsed.rows_by_version.items():
            watched = monitored[version]
            oldest = now - watched.log_retention
            for row in rows:
                if row.prediction_time < oldest:
                    parsed.rejections.add(
                        Reason.OUTSIDE_RETENTION, f"timestamp={row.prediction_time.isoformat()} is older than the retention period"
                    )
            rows = [r for r in rows if r.prediction_time >= oldest]
            existing = ctx.store.existing_request_ids(session, watched.monitor_id, [r.request_id for r in rows])
            fresh = [r for r in rows if r.request_id not in existing]
            for row in rows:
                if row.request_id in existing:
                    parsed.rejections.add(Reason.DUPLICATE_REQUEST_ID, f"request_id={row.request_id} already logged")
            if not fresh:
                continue
            first = ctx.store.reserve_sequences(session, watched.monitor_id, len(fresh))
            ctx.store.insert_many(
                session,
                prediction_logs,
                [
                    {
                        "monitor": watched.monitor_id,
                        "request_id": row.request_id,
                        "sequence": first + offset,
                        "model_version": version,
                        "deployment": stream.header.deployment or watched.deployment,
                        "prediction_time": row.prediction_time,
                        "received_at": now,
                        "latency_ms": row.latency_ms,
                        "status_code": row.status_code,
                        "subject_id": row.subject_id,
                        "values_json": json.dumps(row.values, allow_nan=False),
                    }
                    for offset, row in enumerate(fresh)
                ],
            )
            ctx.store.add_counters(session, watched.monitor_id, accepted_rows=len(fresh))
            stream.touched.add(watched.monitor_id)
            accepted += len(fresh)
        rejected = parsed.rejections.total(excluding=(Reason.UNKNOWN_MODEL_VERSION,))
        for reason, count in parsed.rejections.counts.items():
            ctx.store.insert(
                session,
                ingestion_rejections,
                _rejection_row(header_monitor, stream, LOGS, reason, count, parsed.rejections.examples.get(reason, ""), now),
            )
        if header_monitor:
            ctx.store.add_counters(
                session, header_monitor, rejected_rows=rejected, unknown_model_version_rows=parsed.unknown_model_version_rows
            )
        if batch.batch_id:
            ctx.store.insert(
                session,
                ingested_batches,
                {"stream_kind": LOGS, "batch_id": batch.batch_id, "row_count": table.num_rows, "received_at": now},
            )
    stream.accepted += accepted
    stream.rejected += rejected
    stream.unknown += parsed.unknown_model_version_rows
    stream.rejections.merge(parsed.rejections)
    ctx.metrics.ingested_rows.labels("accepted").inc(accepted)
    ctx.metrics.ingested_rows.labels("rejected").inc(rejected)
    ctx.metrics.ingested_rows.labels("unknown_model_version").inc(parsed.unknown_model_version_rows)


def _rejection_row(
    monitor: str | None, stream: _LogStream | None, kind: str, reason: str, rows: int, example: str, now: dt.datetime
) -> dict[str, Any]:
    return {
        "monitor": monitor,
        "model_version": stream.header.model_version if stream else "",
        "stream_kind": kind,
        "reason": reason,
        "row_count": rows,
        "example": example[:200],
        "received_at": now,
    }


def _summaries(rejections: Rejections) -> list[rr.RejectionSummary]:
    return [
        rr.RejectionSummary(reason=reason, row_count=count, example=rejections.examples.get(reason, ""))
        for reason, count in sorted(rejections.counts.items())
    ]


def ingest_prediction_logs(ctx: Context, messages: Iterator[rr.IngestPredictionLogsRequest]) -> rr.IngestPredictionLogsResponse:
    stream = _LogStream()
    method = SERVICE + "IngestPredictionLogs"
    replayed: rr.IngestPredictionLogsResponse | None = None
    for index, message in enumerate(messages):
        which = message.WhichOneof("payload")
        if which == "header":
            if index:
                raise InvalidArgument("only the first message of the stream may carry the header", reason="UNEXPECTED_HEADER")
            stream.header.CopyFrom(message.header)
            with ctx.store.transaction() as session:
                replayed = replayed_response(session, request_log, method, stream.header, rr.IngestPredictionLogsResponse)
            _resolve_monitors(ctx, stream, {stream.header.model_version})
        elif which == "batch":
            if replayed is None:
                _ingest_log_batch(ctx, stream, message.batch)
        else:
            raise InvalidArgument(f"message {index} of the stream carries neither header nor batch", reason="EMPTY_MESSAGE")
    if replayed is not None:
        return replayed
    for monitor_id in sorted(stream.touched):
        evaluation.evaluate_due_windows(ctx, monitor_id)
    response = rr.IngestPredictionLogsResponse(
        stats=pb.IngestionStats(
            accepted_rows=stream.accepted,
            rejected_rows=stream.rejected,
            unknown_model_version_rows=stream.unknown,
            duplicate_batches=stream.duplicate_batches,
        ),
        rejections=_summaries(stream.rejections),
    )
    if stream.header.request_id:
        with ctx.store.transaction() as session:
            remember(session, request_log, method, stream.header, response)
    return response


# -- labels -----------------------------------------------------------------------------------


@dataclass
class _LabelStream:
    joined: int = 0
    unmatched: int = 0
    duplicates: int = 0
    rejections: Rejections = field(default_factory=Rejections)
    # monitor -> (sequence, prediction_time) of rows that got a label
    labelled: dict[str, list[tuple[int, dt.datetime]]] = field(default_factory=dict)
    label_waits: dict[str, dt.timedelta | None] = field(default_factory=dict)


def _label_wait(ctx: Context, stream: _LabelStream, session: Any, monitor_id: str) -> dt.timedelta | None:
    if monitor_id not in stream.label_waits:
        view = evaluation.load_view(ctx, session, monitor_id)
        stream.label_waits[monitor_id] = view.quality_settings.label_wait if view else None
    return stream.label_waits[monitor_id]


def _join_labels(ctx: Context, stream: _LabelStream, labels: list[LabelRow], batch_id: str, rows: int) -> None:
    now = ctx.now()
    with ctx.store.transaction() as session:
        logged: dict[str, list[Any]] = {}
        for row in ctx.store.logs_by_request_ids(session, [label.request_id for label in labels]):
            logged.setdefault(row.request_id, []).append(row)
        for label in labels:
            matches = logged.get(label.request_id)
            if not matches:
                stream.unmatched += 1
                continue
            for row in matches:
                wait = _label_wait(ctx, stream, session, row.monitor)
                arrived = label.label_time or now
                if wait is not None and arrived - m.utc(row.prediction_time) > wait:
                    stream.rejections.add(Reason.LATE_LABEL, f"request_id={label.request_id}: label came after {wait}")
                    continue
                if row.label_json is not None or not ctx.store.set_label(session, row.id, json.dumps(label.label), label.label_time, now):
                    stream.duplicates += 1
                    continue
                stream.joined += 1
                ctx.store.add_counters(session, row.monitor, joined_labels=1)
                stream.labelled.setdefault(row.monitor, []).append((row.sequence, m.utc(row.prediction_time)))
        if batch_id:
            ctx.store.insert(
                session, ingested_batches, {"stream_kind": LABELS, "batch_id": batch_id, "row_count": rows, "received_at": now}
            )


def ingest_labels(ctx: Context, messages: Iterator[rr.IngestLabelsRequest]) -> rr.IngestLabelsResponse:
    stream = _LabelStream()
    header = rr.LabelHeader()
    method = SERVICE + "IngestLabels"
    replayed: rr.IngestLabelsResponse | None = None
    for index, message in enumerate(messages):
        which = message.WhichOneof("payload")
        if which == "header":
            if index:
                raise InvalidArgument("only the first message of the stream may carry the header", reason="UNEXPECTED_HEADER")
            header.CopyFrom(message.header)
            with ctx.store.transaction() as session:
                replayed = replayed_response(session, request_log, method, header, rr.IngestLabelsResponse)
            continue
        if which != "batch":
            raise InvalidArgument(f"message {index} of the stream carries neither header nor batch", reason="EMPTY_MESSAGE")
        if replayed is not None:
            continue
        batch = message.batch
        non_negative(batch.row_count, "batch.row_count")
        if batch.batch_id:
            with ctx.store.transaction() as session:
                if ctx.store.batch_seen(session, LABELS, batch.batch_id):
                    continue
        table = _read_batch(batch)
        if isinstance(table, str):
            stream.rejections.add(Reason.MALFORMED_BATCH, f"batch {batch.batch_id or '(no id)'}: {table}", batch.row_count)
            continue
        labels, rejections = parse_label_batch(table)
        stream.rejections.merge(rejections)
        _join_labels(ctx, stream, labels, batch.batch_id, table.num_rows)
    if replayed is not None:
        return replayed
    if stream.rejections.counts:
        with ctx.store.transaction() as session:
            now = ctx.now()
            for reason, count in stream.rejections.counts.items():
                ctx.store.insert(
                    session,
                    ingestion_rejections,
                    _rejection_row(None, None, LABELS, reason, count, stream.rejections.examples[reason], now),
                )
    for monitor_id, rows in sorted(stream.labelled.items()):
        evaluation.refresh_quality(ctx, monitor_id, rows)
    response = rr.IngestLabelsResponse(
        joined_count=stream.joined,
        unmatched_count=stream.unmatched,
        duplicate_count=stream.duplicates,
        rejections=_summaries(stream.rejections),
    )
    if header.request_id:
        with ctx.store.transaction() as session:
            remember(session, request_log, method, header, response)
    return response


# -- erasure ----------------------------------------------------------------------------------


def erase_subject_data(ctx: Context, request: rr.EraseSubjectDataRequest) -> rr.EraseSubjectDataResponse:
    """Delete the subjects' prediction logs (and the labels joined to them).

    The erasure is recorded in the gateway's audit log first: when that log cannot be
    reached nothing is deleted and the caller retries (applying a receipt is idempotent).
    """
    if not request.erasure_receipt:
        raise InvalidArgument("erasure_receipt is required", reason="MISSING_RECEIPT")
    subjects = sorted({s for s in request.subject_ids if s})
    if not subjects:
        raise InvalidArgument("subject_ids must name at least one data subject", reason="MISSING_SUBJECTS")
    method = SERVICE + "EraseSubjectData"
    with ctx.store.transaction() as session:
        replayed = replayed_response(session, request_log, method, request, rr.EraseSubjectDataResponse)
        if replayed is not None:
            return replayed
        applied = ctx.store.get(session, erasure_receipts, request.erasure_receipt)
    if applied is not None:
        return _erasure_response(applied)
    ctx.audit.report(
        gateway_messages.SECURITY_EVENT_TYPE_DATA_ERASED,
        resource=f"erasureReceipts/{request.erasure_receipt}",
        action="erase prediction logs and labels",
        detail=f"monitoring erases the prediction logs of {len(subjects)} data subject(s)",
        attributes={"service": "monitoring", "subject_count": str(len(subjects))},
        report_id=f"monitoring-erasure-{request.erasure_receipt}",
    )
    with ctx.store.transaction() as session:
        applied = ctx.store.get(session, erasure_receipts, request.erasure_receipt, for_update=True)
        if applied is None:
            logs, labels = ctx.store.erase_subjects(session, subjects)
            row = {
                "receipt": request.erasure_receipt,
                "subject_count": len(subjects),
                "prediction_log_rows_erased": logs,
                "label_rows_erased": labels,
                "erased_by": current_caller(),
                "erased_at": ctx.now(),
            }
            ctx.store.insert(session, erasure_receipts, row)
            applied = ctx.store.get(session, erasure_receipts, request.erasure_receipt)
        response = _erasure_response(applied)
        remember(session, request_log, method, request, response)
        return response


def _erasure_response(row: Any) -> rr.EraseSubjectDataResponse:
    return rr.EraseSubjectDataResponse(
        erasure_receipt=row.receipt,
        prediction_log_rows_erased=row.prediction_log_rows_erased,
        label_rows_erased=row.label_rows_erased,
        erase_time=m.timestamp(row.erased_at),
    )
