"""Prediction logs to the monitoring service: bounded queues, batches, one sender thread.

Answering a request only appends a small record to its deployment's queue (no
conversion, no I/O). A background thread turns queued records into Arrow batches and
streams them to monitoring's IngestPredictionLogs through the gateway: when a queue
holds `max_batch_rows` rows or its oldest row waited `flush_interval`. A full queue
drops the new rows and counts them; so does a batch monitoring did not take after the
configured attempts. Answers never wait for monitoring.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
import pyarrow as pa

from falaj.common.v1 import common_pb2
from falaj.monitoring.v1 import request_response_pb2 as mon_rr
from falaj.monitoring.v1 import service_pb2_grpc as mon_service
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.settings import PkiPaths

log = get_logger()


@dataclass(frozen=True)
class LogPolicy:
    """One deployment's prediction log settings, defaults resolved."""

    enabled: bool = False
    sample_rate: float = 1.0
    log_inputs: bool = False
    log_features: bool = False
    log_outputs: bool = True
    queue_capacity: int = 10_000
    max_batch_rows: int = 500
    flush_interval_s: float = 1.0
    subject_id_parameter: str = ""


@dataclass
class PredictionRecord:
    """One answered (or mirrored) request, as it was; converted to rows off the answer path."""

    deployment: str
    request_id: str
    time: dt.datetime
    model_version: str
    route: str
    latency_ms: float
    status_code: int
    rows: int
    subject_id: str | None = None
    inputs: Mapping[str, np.ndarray] | None = None
    features: Mapping[str, np.ndarray] | None = None
    outputs: Mapping[str, np.ndarray] | None = None
    input_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # feature names of packed inputs


class PredictionLogSink(Protocol):
    """Delivers one batch of rows for a deployment; raises when it could not."""

    def send(self, deployment: str, table: pa.Table, batch_id: str) -> None: ...


class MonitoringSink:
    """IngestPredictionLogs through the gateway, one stream per batch."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, timeout: float = 10.0):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    def send(self, deployment: str, table: pa.Table, batch_id: str) -> None:
        if self._channel is None:
            self._channel = secure_channel(self.gateway_addr, self.pki)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        messages = [
            mon_rr.IngestPredictionLogsRequest(
                header=mon_rr.PredictionLogHeader(deployment=f"deployments/{deployment}", request_id=batch_id)
            ),
            mon_rr.IngestPredictionLogsRequest(
                batch=common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes(), batch_id=batch_id, row_count=table.num_rows)
            ),
        ]
        mon_service.MonitoringServiceStub(self._channel).IngestPredictionLogs(iter(messages), timeout=self.timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _cell(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tensor_columns(columns: dict[str, list[object]], name: str, array: np.ndarray, rows: int, names: tuple[str, ...], offset: int) -> None:
    flat = array.reshape(rows, -1) if rows else array.reshape(0, -1)
    width = flat.shape[1] if flat.ndim == 2 else 1
    labels = names if len(names) == width else ((name,) if width == 1 else tuple(f"{name}_{j}" for j in range(width)))
    for j, label in enumerate(labels):
        column = columns.setdefault(label, [None] * offset)
        column.extend(_cell(v) for v in flat[:, j].tolist())


def records_to_table(records: list[PredictionRecord]) -> pa.Table:
    """Rows for monitoring: one per request row; tensors become one column per element."""
    columns: dict[str, list[object]] = {}
    fixed = ("request_id", "timestamp", "model_version", "latency_ms", "status_code", "subject_id", "route")
    for name in fixed:
        columns[name] = []
    total = 0
    for record in records:
        rows = max(record.rows, 1)
        for index in range(rows):
            columns["request_id"].append(record.request_id if rows == 1 else f"{record.request_id}:{index}")
        columns["timestamp"].extend([record.time] * rows)
        columns["model_version"].extend([record.model_version] * rows)
        columns["latency_ms"].extend([record.latency_ms] * rows)
        columns["status_code"].extend([record.status_code] * rows)
        columns["subject_id"].extend([record.subject_id] * rows)
        columns["route"].extend([record.route] * rows)
        for group in (record.inputs, record.features, record.outputs):
            for name, array in (group or {}).items():
                if record.rows and array.shape[:1] == (record.rows,):
                    _tensor_columns(columns, name, array, record.rows, record.input_names.get(name, ()), total)
        total += rows
        for column in columns.values():
            if len(column) < total:
                column.extend([None] * (total - len(column)))
    arrays = {
        "request_id": pa.array(columns.pop("request_id"), pa.string()),
        "timestamp": pa.array(columns.pop("timestamp"), pa.timestamp("us", tz="UTC")),
        "model_version": pa.array(columns.pop("model_version"), pa.string()),
        "latency_ms": pa.array(columns.pop("latency_ms"), pa.float64()),
        "status_code": pa.array(columns.pop("status_code"), pa.int32()),
        "subject_id": pa.array(columns.pop("subject_id"), pa.string()),
        "route": pa.array(columns.pop("route"), pa.string()),
    }
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(arrays)


@dataclass
class _Queue:
    policy: LogPolicy
    records: deque[tuple[float, PredictionRecord]] = field(default_factory=deque)
    rows: int = 0
    rows_sent: int = 0
    rows_dropped: int = 0
    last_delivery: dt.datetime | None = None


@dataclass(frozen=True)
class LogStats:
    rows_sent: int
    rows_dropped: int
    rows_queued: int
    last_delivery_time: dt.datetime | None


class PredictionLogger:
    """Queues per deployment and the thread that ships them."""

    def __init__(self, sink: PredictionLogSink, *, send_attempts: int = 2, tick_s: float = 0.05):
        self.sink = sink
        self.send_attempts = send_attempts
        self.tick_s = tick_s
        self.batches_sent = 0
        self._queues: dict[str, _Queue] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="prediction-logs", daemon=True)
        self._thread.start()

    def configure(self, deployment: str, policy: LogPolicy) -> None:
        with self._lock:
            queue = self._queues.get(deployment)
            if queue is None:
                self._queues[deployment] = _Queue(policy)
            else:
                queue.policy = policy

    def forget(self, deployment: str) -> None:
        with self._lock:
            self._queues.pop(deployment, None)

    def enqueue(self, record: PredictionRecord) -> None:
        """Never blocks: a full queue drops the record and counts its rows."""
        rows = max(record.rows, 1)
        with self._lock:
            queue = self._queues.get(record.deployment)
            if queue is None:
                return
            if queue.rows + rows > queue.policy.queue_capacity:
                queue.rows_dropped += rows
                return
            queue.records.append((time.monotonic(), record))
            queue.rows += rows
            if queue.rows >= queue.policy.max_batch_rows:
                self._wake.notify()

    def stats(self, deployment: str) -> LogStats:
        with self._lock:
            queue = self._queues.get(deployment)
            if queue is None:
                return LogStats(0, 0, 0, None)
            return LogStats(queue.rows_sent, queue.rows_dropped, queue.rows, queue.last_delivery)

    def _due(self, now: float, force: bool) -> list[tuple[str, _Queue, list[PredictionRecord]]]:
        due = []
        for deployment, queue in self._queues.items():
            if not queue.records:
                continue
            oldest = queue.records[0][0]
            if not force and queue.rows < queue.policy.max_batch_rows and now - oldest < queue.policy.flush_interval_s:
                continue
            taken: list[PredictionRecord] = []
            rows = 0
            while queue.records and (rows < queue.policy.max_batch_rows or not taken):
                record = queue.records[0][1]
                if taken and rows + max(record.rows, 1) > queue.policy.max_batch_rows:
                    break
                queue.records.popleft()
                taken.append(record)
                rows += max(record.rows, 1)
            queue.rows -= rows
            due.append((deployment, queue, taken))
        return due

    def _ship(self, deployment: str, queue: _Queue, records: list[PredictionRecord]) -> None:
        rows = sum(max(r.rows, 1) for r in records)
        batch_id = uuid.uuid4().hex
        try:
            table = records_to_table(records)
        except Exception as error:  # noqa: BLE001 - a record that cannot be tabled is dropped, counted
            log.error("prediction log rows could not be built", deployment=deployment, error=str(error)[:200])
            with self._lock:
                queue.rows_dropped += rows
            return
        delay = 0.1
        for attempt in range(1, self.send_attempts + 1):
            try:
                self.sink.send(deployment, table, batch_id)
            except Exception as error:  # noqa: BLE001 - monitoring down: retried, then counted as dropped
                if attempt == self.send_attempts:
                    log.warning(
                        "prediction logs dropped; monitoring did not take them", deployment=deployment, rows=rows, error=str(error)[:200]
                    )
                    with self._lock:
                        queue.rows_dropped += rows
                    return
                time.sleep(delay)
                delay *= 2
                continue
            with self._lock:
                queue.rows_sent += rows
                queue.last_delivery = dt.datetime.now(dt.UTC)
                self.batches_sent += 1
            return

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._stop:
                    self._wake.wait(self.tick_s)
                stopping = self._stop
                due = self._due(time.monotonic(), force=stopping)
            for deployment, queue, records in due:
                self._ship(deployment, queue, records)
            if stopping:
                with self._lock:
                    if not any(q.records for q in self._queues.values()):
                        return

    def flush(self, timeout: float = 10.0) -> None:
        """Send everything queued now (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                due = self._due(time.monotonic(), force=True)
            if not due:
                return
            for deployment, queue, records in due:
                self._ship(deployment, queue, records)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=15)
