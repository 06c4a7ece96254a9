"""Prediction log and label batches: which rows are kept and why the others are not.

A bad row is counted under a machine-readable reason with one example and skipped; it
never fails its batch, its stream or its window.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from falaj_platform.services.monitoring.drift import ColumnKind
from falaj_platform.services.monitoring.profiles import ColumnSpec, category_key, numeric_value

REQUEST_ID = "request_id"
TIMESTAMP = "timestamp"
MODEL_VERSION = "model_version"
LATENCY_MS = "latency_ms"
STATUS_CODE = "status_code"
SUBJECT_ID = "subject_id"
LABEL = "label"
LABEL_TIME = "label_time"
MAX_ID_LENGTH = 256
MAX_EXAMPLE_LENGTH = 200


class Reason:
    MALFORMED_BATCH = "MALFORMED_BATCH"
    ROW_COUNT_MISMATCH = "ROW_COUNT_MISMATCH"
    MISSING_REQUIRED_COLUMN = "MISSING_REQUIRED_COLUMN"
    MISSING_REQUEST_ID = "MISSING_REQUEST_ID"
    MISSING_TIMESTAMP = "MISSING_TIMESTAMP"
    MISSING_MODEL_VERSION = "MISSING_MODEL_VERSION"
    UNKNOWN_MODEL_VERSION = "UNKNOWN_MODEL_VERSION"
    TYPE_MISMATCH = "TYPE_MISMATCH"
    INVALID_LATENCY = "INVALID_LATENCY"
    DUPLICATE_REQUEST_ID = "DUPLICATE_REQUEST_ID"
    MISSING_LABEL = "MISSING_LABEL"
    UNKNOWN_REQUEST_ID = "UNKNOWN_REQUEST_ID"
    LATE_LABEL = "LATE_LABEL"
    OUTSIDE_RETENTION = "OUTSIDE_RETENTION"


@dataclass
class Rejections:
    """Rejected rows per reason, with the first example of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, example: str, rows: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + rows
        self.examples.setdefault(reason, example[:MAX_EXAMPLE_LENGTH])

    def merge(self, other: Rejections) -> None:
        for reason, count in other.counts.items():
            self.add(reason, other.examples.get(reason, ""), count)

    def total(self, *, excluding: Sequence[str] = ()) -> int:
        return sum(count for reason, count in self.counts.items() if reason not in excluding)


@dataclass(frozen=True)
class LogRow:
    """One accepted prediction log row; `values` holds the profile's columns, normalized."""

    request_id: str
    prediction_time: dt.datetime
    model_version: str
    latency_ms: float | None
    status_code: int
    subject_id: str | None
    values: dict[str, float | str | None]


@dataclass
class ParsedLogBatch:
    rows_by_version: dict[str, list[LogRow]] = field(default_factory=dict)
    rejections: Rejections = field(default_factory=Rejections)
    unknown_model_version_rows: int = 0

    @property
    def rejected_rows(self) -> int:
        return self.rejections.total(excluding=(Reason.UNKNOWN_MODEL_VERSION,))


def _as_utc(value: object) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    if isinstance(value, str):
        return _as_utc(dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    raise ValueError(f"{type(value).__name__} is not a timestamp")


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip()
    return text or None


def _columns(table: pa.Table, names: Sequence[str]) -> dict[str, list[object]]:
    return {name: table.column(name).to_pylist() for name in names if name in table.column_names}


def parse_log_batch(table: pa.Table, default_model_version: str, monitored: Mapping[str, Sequence[ColumnSpec]]) -> ParsedLogBatch:
    """Split a batch into accepted rows per monitored model version and counted rejections.

    `monitored` maps each watched model version to its profile's column specs.
    """
    parsed = ParsedLogBatch()
    rows = table.num_rows
    missing = [name for name in (REQUEST_ID, TIMESTAMP) if name not in table.column_names]
    if missing:
        parsed.rejections.add(Reason.MISSING_REQUIRED_COLUMN, f"batch has no column {missing[0]!r}", rows)
        return parsed
    spec_names = sorted({spec.name for specs in monitored.values() for spec in specs})
    columns = _columns(table, [REQUEST_ID, TIMESTAMP, MODEL_VERSION, LATENCY_MS, STATUS_CODE, SUBJECT_ID, *spec_names])
    seen: set[str] = set()
    for index in range(rows):
        request_id = _text(columns[REQUEST_ID][index])
        if request_id is None:
            parsed.rejections.add(Reason.MISSING_REQUEST_ID, f"row {index}: request_id is empty")
            continue
        if len(request_id) > MAX_ID_LENGTH:
            parsed.rejections.add(Reason.TYPE_MISMATCH, f"request_id longer than {MAX_ID_LENGTH} characters")
            continue
        raw_time = columns[TIMESTAMP][index]
        if raw_time is None:
            parsed.rejections.add(Reason.MISSING_TIMESTAMP, f"request_id={request_id}: timestamp is empty")
            continue
        try:
            prediction_time = _as_utc(raw_time)
        except ValueError:
            parsed.rejections.add(Reason.TYPE_MISMATCH, f"timestamp={raw_time!r}")
            continue
        model_version = _text(columns.get(MODEL_VERSION, [None] * rows)[index]) or default_model_version
        if not model_version:
            parsed.rejections.add(Reason.MISSING_MODEL_VERSION, f"request_id={request_id}: no model_version in row or header")
            continue
        specs = monitored.get(model_version)
        if specs is None:
            parsed.unknown_model_version_rows += 1
            parsed.rejections.add(Reason.UNKNOWN_MODEL_VERSION, f"model_version={model_version}")
            continue
        latency_raw = columns.get(LATENCY_MS, [None] * rows)[index]
        try:
            latency = numeric_value(latency_raw)
        except ValueError:
            latency = -1.0
        if latency is not None and (latency < 0 or math.isinf(latency)):
            parsed.rejections.add(Reason.INVALID_LATENCY, f"latency_ms={latency_raw!r}")
            continue
        status_raw = columns.get(STATUS_CODE, [None] * rows)[index]
        if status_raw is not None and (isinstance(status_raw, bool) or not isinstance(status_raw, int)):
            parsed.rejections.add(Reason.TYPE_MISMATCH, f"status_code={status_raw!r}")
            continue
        values: dict[str, float | str | None] = {}
        bad_value = ""
        for spec in specs:
            raw = columns.get(spec.name, [None] * rows)[index]
            if spec.kind is ColumnKind.NUMERICAL:
                try:
                    number = numeric_value(raw)
                except ValueError:
                    bad_value = f"{spec.name}={raw!r}"
                    break
                # Infinities are missing values to the drift tests (as NaN is).
                values[spec.name] = number if number is None or math.isfinite(number) else None
            else:
                values[spec.name] = category_key(raw)
        if bad_value:
            parsed.rejections.add(Reason.TYPE_MISMATCH, bad_value)
            continue
        key = f"{model_version}\x00{request_id}"
        if key in seen:
            parsed.rejections.add(Reason.DUPLICATE_REQUEST_ID, f"request_id={request_id}")
            continue
        seen.add(key)
        subject = _text(columns.get(SUBJECT_ID, [None] * rows)[index])
        parsed.rows_by_version.setdefault(model_version, []).append(
            LogRow(
                request_id=request_id,
                prediction_time=prediction_time,
                model_version=model_version,
                latency_ms=latency,
                status_code=int(status_raw or 0),
                subject_id=subject[:MAX_ID_LENGTH] if subject else None,
                values=values,
            )
        )
    return parsed


@dataclass(frozen=True)
class LabelRow:
    request_id: str
    label: float | str | None
    label_time: dt.datetime | None


def parse_label_batch(table: pa.Table) -> tuple[list[LabelRow], Rejections]:
    """Labels with a request id and a value; the value is kept raw (JSON-able) for the join."""
    rejections = Rejections()
    missing = [name for name in (REQUEST_ID, LABEL) if name not in table.column_names]
    if missing:
        rejections.add(Reason.MISSING_REQUIRED_COLUMN, f"batch has no column {missing[0]!r}", table.num_rows)
        return [], rejections
    columns = _columns(table, [REQUEST_ID, LABEL, LABEL_TIME])
    labels: list[LabelRow] = []
    seen: set[str] = set()
    for index in range(table.num_rows):
        request_id = _text(columns[REQUEST_ID][index])
        if request_id is None:
            rejections.add(Reason.MISSING_REQUEST_ID, f"row {index}: request_id is empty")
            continue
        raw = columns[LABEL][index]
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            rejections.add(Reason.MISSING_LABEL, f"request_id={request_id}: label is empty")
            continue
        label: float | str | None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            label = category_key(raw)
        else:
            label = float(raw)
        label_time = None
        raw_time = columns.get(LABEL_TIME, [None] * table.num_rows)[index]
        if raw_time is not None:
            try:
                label_time = _as_utc(raw_time)
            except ValueError:
                rejections.add(Reason.TYPE_MISMATCH, f"label_time={raw_time!r}")
                continue
        if request_id in seen:
            rejections.add(Reason.DUPLICATE_REQUEST_ID, f"request_id={request_id} twice in one batch")
            continue
        seen.add(request_id)
        labels.append(LabelRow(request_id, label, label_time))
    return labels, rejections
