"""Reference profiles: column roles and types, value normalization and column summaries.

A reference is a sample of rows (the model's training data, normally) kept as an Arrow
IPC file; its columns are summarised once, and drift tests read the sample itself.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from falaj_platform.services.monitoring.drift import Array, ColumnKind, Histogram

QUANTILE_PROBABILITIES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
MAX_PROFILE_CATEGORIES = 100
OTHER_CATEGORY = "__other__"
# Numbers with at most this many distinct reference values are inferred as categorical.
CATEGORICAL_UP_TO_DISTINCT = 5
SAMPLE_SEED = 20240917


class ColumnRole(enum.Enum):
    FEATURE = "FEATURE"
    PREDICTION = "PREDICTION"
    PREDICTION_SCORE = "PREDICTION_SCORE"
    LABEL = "LABEL"


@dataclass(frozen=True)
class ColumnSpec:
    """A column of reference and logged data: its name, type (None: infer) and role."""

    name: str
    kind: ColumnKind | None
    role: ColumnRole


@dataclass(frozen=True)
class ColumnSummary:
    """Summary of one reference column."""

    name: str
    kind: ColumnKind
    count: int
    missing_count: int
    distinct_count: int
    mean: float = 0.0
    std_dev: float = 0.0
    minimum: float = 0.0
    maximum: float = 0.0
    quantiles: tuple[tuple[float, float], ...] = ()
    histogram: Histogram | None = None
    categories: tuple[tuple[str, int], ...] = field(default_factory=tuple)


class ReferenceDataError(ValueError):
    """Reference rows that cannot make a profile (missing columns, no rows ...)."""


def category_key(value: object) -> str | None:
    """The one string form of a categorical value, so that 1, 1.0 and '1' compare equal."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return None
        return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def numeric_value(value: object) -> float | None:
    """A float for a numerical column's value; None when missing; ValueError when not a number."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return 1.0 if value else 0.0
    if isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
        return None if math.isnan(number) else number
    if isinstance(value, str):
        return float(value.strip())  # raises ValueError for text that is not a number
    raise ValueError(f"{type(value).__name__} is not a number")


def is_numeric_arrow_type(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_decimal(data_type))


def infer_kind(data_type: pa.DataType, column: pa.ChunkedArray) -> ColumnKind:
    """Numbers with many distinct values are numerical; everything else categorical."""
    if not is_numeric_arrow_type(data_type):
        return ColumnKind.CATEGORICAL
    distinct = pc.count_distinct(column, mode="only_valid").as_py()
    return ColumnKind.NUMERICAL if distinct > CATEGORICAL_UP_TO_DISTINCT else ColumnKind.CATEGORICAL


def resolve_specs(specs: Sequence[ColumnSpec], table: pa.Table) -> list[ColumnSpec]:
    """Specs with every type decided; with no specs, every column becomes a feature."""
    names = set(table.column_names)
    if not specs:
        specs = [ColumnSpec(name, None, ColumnRole.FEATURE) for name in table.column_names]
    missing = [spec.name for spec in specs if spec.name not in names and spec.role is not ColumnRole.LABEL]
    if missing:
        raise ReferenceDataError(f"reference rows lack column(s) {', '.join(sorted(missing))}")
    resolved = []
    for spec in specs:
        if spec.kind is None and spec.name in names:
            kind = infer_kind(table.schema.field(spec.name).type, table.column(spec.name))
        else:
            kind = spec.kind or ColumnKind.CATEGORICAL
        resolved.append(ColumnSpec(spec.name, kind, spec.role))
    return resolved


def column_values(column: pa.ChunkedArray, kind: ColumnKind) -> Array:
    """A column as drift tests read it: floats with NaN, or category keys with None."""
    if kind is ColumnKind.NUMERICAL:
        if is_numeric_arrow_type(column.type):
            return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        return values_from_python(column.to_pylist(), kind)
    return values_from_python(column.to_pylist(), kind)


def values_from_python(values: Iterable[object], kind: ColumnKind) -> Array:
    """Drift-test arrays from plain Python values (as stored with prediction logs)."""
    if kind is ColumnKind.NUMERICAL:
        numbers = []
        for value in values:
            try:
                number = numeric_value(value)
            except ValueError:
                number = None
            numbers.append(math.nan if number is None else number)
        return np.asarray(numbers, dtype=np.float64)
    return np.asarray([category_key(value) for value in values], dtype=object)


def summarize_column(name: str, kind: ColumnKind, values: Array) -> ColumnSummary:
    """Count, missing, distinct and either moments, quantiles and histogram or category counts."""
    if kind is ColumnKind.NUMERICAL:
        numbers = np.asarray(values, dtype=np.float64)
        present = numbers[np.isfinite(numbers)]
        missing = len(numbers) - len(present)
        if len(present) == 0:
            return ColumnSummary(name, kind, 0, missing, 0)
        edges = np.histogram_bin_edges(present, bins="sturges")
        return ColumnSummary(
            name=name,
            kind=kind,
            count=len(present),
            missing_count=missing,
            distinct_count=int(len(pd.unique(present))),
            mean=float(np.mean(present)),
            std_dev=float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
            minimum=float(np.min(present)),
            maximum=float(np.max(present)),
            quantiles=tuple(
                (p, float(q)) for p, q in zip(QUANTILE_PROBABILITIES, np.quantile(present, QUANTILE_PROBABILITIES), strict=True)
            ),
            histogram=Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in np.histogram(present, edges)[0])),
        )
    keys = pd.Series(np.asarray(values, dtype=object), dtype=object)
    present_keys = keys[keys.notna()]
    counts = present_keys.value_counts()
    top = [(str(k), int(v)) for k, v in counts.iloc[:MAX_PROFILE_CATEGORIES].items()]
    rest = int(counts.iloc[MAX_PROFILE_CATEGORIES:].sum())
    if rest:
        top.append((OTHER_CATEGORY, rest))
    return ColumnSummary(
        name=name,
        kind=kind,
        count=len(present_keys),
        missing_count=len(keys) - len(present_keys),
        distinct_count=len(counts),
        categories=tuple(top),
    )


def sample_rows(table: pa.Table, max_rows: int) -> pa.Table:
    """At most `max_rows` rows drawn uniformly with a fixed seed (0 keeps every row)."""
    if max_rows <= 0 or table.num_rows <= max_rows:
        return table
    chosen = np.sort(np.random.default_rng(SAMPLE_SEED).choice(table.num_rows, size=max_rows, replace=False))
    return table.take(pa.array(chosen))


def read_arrow_stream(payload: bytes) -> pa.Table:
    """A table from Arrow IPC stream bytes; raises pa.ArrowInvalid when malformed."""
    with ipc.open_stream(pa.BufferReader(payload)) as reader:
        return reader.read_all()


def write_sample(path: Path, table: pa.Table) -> None:
    """Write the reference sample atomically (a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with pa.OSFile(str(partial), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    partial.replace(path)


def read_sample(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).read_all()


def concat_batches(tables: Sequence[pa.Table]) -> pa.Table:
    """One table from uploaded batches whose schemas agree (numbers are unified to float64)."""
    if not tables:
        raise ReferenceDataError("no reference rows were sent")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ReferenceDataError(f"reference batches do not share one schema: {error}") from None
