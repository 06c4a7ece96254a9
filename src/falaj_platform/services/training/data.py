"""Where training sets come from: the `TrainingDataSource` interface and a file source.

In production the training set of every job comes from the features service's
point-in-time historical retrieval (`features_source.FeaturesServiceDataSource`, through
the gateway). `ArrowFileDataSource` reads the same shape of table from Parquet or Arrow
IPC files named after dataset versions; it serves development set-ups and tests that
have no features service, and is never chosen by the production wiring.

A source returns the rows with one column per feature named by its reference
(`{feature_view}:{feature}`), the label column and, when present, the as-of timestamp
column, plus what lineage needs: retrieval id, feature views, dataset versions and a
content hash of the rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq

from falaj_platform.services.training.plan import JobFailed
from falaj_platform.services.training.spec import DataSelection

DEFAULT_TIMESTAMP_COLUMN = "event_timestamp"


@dataclass(frozen=True)
class TrainingSet:
    """The rows a job trains on, and where they came from."""

    table: pa.Table
    feature_references: tuple[str, ...]
    label_column: str
    timestamp_column: str
    retrieval_id: str
    feature_service: str
    feature_views: tuple[str, ...]
    dataset_versions: tuple[str, ...]
    content_hash: str
    rows_excluded_without_consent: int = 0


class TrainingDataSource(Protocol):
    """Fetches the training set a job's spec names."""

    def fetch(self, selection: DataSelection, *, job_id: str, cancelled: Callable[[], bool]) -> TrainingSet:
        """The training set; raises JobFailed (UNKNOWN_FEATURE, MISSING_LABEL, INSUFFICIENT_DATA ...)."""
        ...


def ipc_stream_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def check_training_table(table: pa.Table, references: tuple[str, ...], label_column: str) -> None:
    """The checks every source's result must pass before a worker sees it."""
    if label_column not in table.column_names:
        raise JobFailed(
            "MISSING_LABEL",
            f"label column {label_column!r} is not in the entity dataset (columns: {', '.join(table.column_names)})",
            phase="TRAINING_PHASE_PREPARING_DATA",
        )
    missing = [ref for ref in references if ref not in table.column_names]
    if missing:
        raise JobFailed("UNKNOWN_FEATURE", f"unknown feature {missing[0]}", phase="TRAINING_PHASE_PREPARING_DATA")
    if table.num_rows == 0:
        raise JobFailed(
            "INSUFFICIENT_DATA", "the training set is empty: no entity rows in the time frame", phase="TRAINING_PHASE_PREPARING_DATA"
        )


def pick_timestamp_column(table: pa.Table, wanted: str, taken: set[str]) -> str:
    if wanted and wanted in table.column_names:
        return wanted
    if DEFAULT_TIMESTAMP_COLUMN in table.column_names:
        return DEFAULT_TIMESTAMP_COLUMN
    for field in table.schema:
        if pa.types.is_timestamp(field.type) and field.name not in taken:
            return str(field.name)
    return ""


def _in_frame(stamps: pa.ChunkedArray, start: float | None, end: float | None) -> pa.ChunkedArray:
    """Rows at or after `start` and before `end` (Unix seconds)."""
    utc = pa.timestamp("us", tz="UTC")
    values = pc.cast(stamps, utc)
    keep = pc.is_valid(values)
    if start is not None:
        keep = pc.and_(keep, pc.greater_equal(values, pa.scalar(dt.datetime.fromtimestamp(start, dt.UTC), utc)))
    if end is not None:
        keep = pc.and_(keep, pc.less(values, pa.scalar(dt.datetime.fromtimestamp(end, dt.UTC), utc)))
    return keep


class ArrowFileDataSource:
    """Training sets from files: `<root>/<dataset>/<version>.parquet` (or `.arrow`, Arrow IPC).

    A feature `{view}:{feature}` is the column `{view}__{feature}` (the features service's
    full feature names) or `{view}:{feature}`; a feature service is a JSON list of
    references in `<root>/feature_services/<name>.json`.
    """

    def __init__(self, root: Path):
        self.root = root

    def _read(self, dataset_version: str) -> pa.Table:
        _, dataset, _, version = dataset_version.split("/")
        for suffix in (".parquet", ".arrow"):
            path = self.root / dataset / f"{version}{suffix}"
            if path.exists():
                if suffix == ".parquet":
                    return pq.read_table(path)
                with pa.memory_map(str(path)) as source:
                    return pyarrow.ipc.open_file(source).read_all()
        raise JobFailed("INSUFFICIENT_DATA", f"dataset version {dataset_version} does not exist", phase="TRAINING_PHASE_PREPARING_DATA")

    def _references(self, selection: DataSelection) -> tuple[str, ...]:
        if not selection.feature_service:
            return selection.feature_references
        path = self.root / "feature_services" / f"{selection.feature_service.split('/', 1)[1]}.json"
        if not path.exists():
            raise JobFailed(
                "UNKNOWN_FEATURE", f"unknown feature service {selection.feature_service}", phase="TRAINING_PHASE_PREPARING_DATA"
            )
        return tuple(json.loads(path.read_text()))

    def fetch(self, selection: DataSelection, *, job_id: str, cancelled: Callable[[], bool]) -> TrainingSet:
        table = self._read(selection.dataset_version)
        references = self._references(selection)
        timestamp = pick_timestamp_column(table, selection.event_timestamp_column, {selection.label_column})
        if timestamp and (selection.start_time_unix is not None or selection.end_time_unix is not None):
            table = table.filter(_in_frame(table.column(timestamp), selection.start_time_unix, selection.end_time_unix))
        columns: dict[str, pa.ChunkedArray] = {}
        for reference in references:
            view, feature = reference.split(":", 1)
            for candidate in (f"{view}__{feature}", reference):
                if candidate in table.column_names:
                    columns[reference] = table.column(candidate)
                    break
            else:
                raise JobFailed(
                    "UNKNOWN_FEATURE",
                    f"unknown feature {reference}: view {view!r} has no feature {feature!r}",
                    phase="TRAINING_PHASE_PREPARING_DATA",
                )
        if selection.label_column not in table.column_names:
            check_training_table(table, (), selection.label_column)
        out = {**columns, selection.label_column: table.column(selection.label_column)}
        if timestamp:
            out[timestamp] = table.column(timestamp)
        result = pa.table(out)
        check_training_table(result, references, selection.label_column)
        digest = hashlib.sha256(ipc_stream_bytes(result)).hexdigest()
        return TrainingSet(
            table=result,
            feature_references=references,
            label_column=selection.label_column,
            timestamp_column=timestamp,
            retrieval_id=f"file-{digest[:16]}",
            feature_service=selection.feature_service,
            feature_views=tuple(sorted({reference.split(":", 1)[0] for reference in references})),
            dataset_versions=(selection.dataset_version,),
            content_hash=digest,
        )
