"""Column profiles of a dataset version: the reference distributions monitoring compares against.

Exact statistics up to `EXACT_LIMIT` values; beyond that distinct counts come from a
HyperLogLog sketch and quantiles from an evenly spaced sample, so profiling a large
commit stays a small fraction of writing it. Columns are profiled in parallel threads
(numpy and Arrow kernels release the GIL).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.services.ingest.schema import NUMERIC_TYPES, TEXT_TYPES
from falaj_platform.services.ingest.validation import column_hash

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 20
TOP_CATEGORIES = 50
EXACT_LIMIT = 100_000
_HLL_PRECISION = 14


def approximate_distinct(hashes: np.ndarray) -> int:
    """HyperLogLog estimate of the number of distinct values behind uint64 `hashes`."""
    if len(hashes) == 0:
        return 0
    registers_count = 1 << _HLL_PRECISION
    index = (hashes >> np.uint64(64 - _HLL_PRECISION)).astype(np.intp)
    rest = (hashes << np.uint64(_HLL_PRECISION)) | np.uint64(1 << (_HLL_PRECISION - 1))
    # Bit length without float rounding: the top 53 bits are exact in a float64.
    bit_length = np.floor(np.log2((rest >> np.uint64(11)).astype(np.float64))).astype(np.int64) + 12
    rank = (65 - bit_length).astype(np.uint8)
    registers = np.zeros(registers_count, dtype=np.uint8)
    np.maximum.at(registers, index, rank)
    alpha = 0.7213 / (1 + 1.079 / registers_count)
    estimate = alpha * registers_count**2 / float(np.sum(np.exp2(-registers.astype(np.float64))))
    zeros = int(np.count_nonzero(registers == 0))
    if estimate <= 2.5 * registers_count and zeros:
        estimate = registers_count * np.log(registers_count / zeros)
    return int(round(estimate))


def _distinct(values: pa.ChunkedArray) -> int:
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    present = values.drop_null() if values.null_count else values
    if len(present) <= EXACT_LIMIT:
        return int(pc.count_distinct(present).as_py())
    return approximate_distinct(column_hash(present))


def _sample(array: np.ndarray) -> np.ndarray:
    if len(array) <= EXACT_LIMIT:
        return array
    return array[np.linspace(0, len(array) - 1, EXACT_LIMIT).astype(np.int64)]


def _numeric(values: pa.ChunkedArray) -> m.NumericStats:
    present = values.drop_null() if values.null_count else values
    floats = present.cast(pa.float64()) if present.type != pa.float64() else present
    array = floats.to_numpy()
    array = array[~np.isnan(array)] if np.isnan(array).any() else array
    stats = m.NumericStats()
    if len(array) == 0:
        return stats
    low, high = float(array.min()), float(array.max())
    stats.min, stats.max = low, high
    stats.mean = float(array.mean())
    stats.std = float(array.std())
    for q, value in zip(QUANTILES, np.quantile(_sample(array), QUANTILES), strict=True):
        stats.quantiles.add(quantile=q, value=float(value))
    width = (high - low) / HISTOGRAM_BINS
    if width > 0 and np.isfinite(width):
        bins = np.clip(((array - low) / width).astype(np.int64), 0, HISTOGRAM_BINS - 1)
        counts = np.bincount(bins, minlength=HISTOGRAM_BINS)
        for i, count in enumerate(counts.tolist()):
            stats.histogram.add(lower=low + i * width, upper=low + (i + 1) * width, count=count)
    else:
        stats.histogram.add(lower=low, upper=high, count=len(array))
    return stats


def _mask_value(value: str) -> str:
    """A stable pseudonym for a personal-data value: comparable across versions, not readable."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def _categorical(values: pa.ChunkedArray, personal: bool) -> m.CategoricalStats:
    text = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    present = text.drop_null() if text.null_count else text
    stats = m.CategoricalStats()
    if len(present) == 0:
        return stats
    counted = pc.value_counts(present)
    counts = counted.field("counts").to_numpy()
    order = np.argsort(-counts, kind="stable")[:TOP_CATEGORIES]
    found = counted.field("values").take(pa.array(order)).to_pylist()
    top_total = 0
    for value, count in zip(found, counts[order].tolist(), strict=True):
        stats.top_categories.add(value=_mask_value(value) if personal else value, count=count)
        top_total += count
    stats.other_count = len(present) - top_total
    stats.mean_length = float(pc.mean(pc.utf8_length(present)).as_py() or 0.0)
    return stats


def profile_column(values: pa.ChunkedArray, column: m.Column) -> m.ColumnProfile:
    profile = m.ColumnProfile(column=column.name, type=column.type, count=len(values) - values.null_count, null_count=values.null_count)
    profile.distinct_count = _distinct(values)
    if column.type in NUMERIC_TYPES:
        profile.numeric.CopyFrom(_numeric(values))
    elif column.type in TEXT_TYPES:
        profile.categorical.CopyFrom(_categorical(values, bool(column.pii_categories)))
    elif column.type == m.COLUMN_TYPE_TIMESTAMP:
        stats = m.TimestampStats()
        if profile.count:
            bounds = pc.min_max(values)
            stats.min.FromDatetime(bounds["min"].as_py())
            stats.max.FromDatetime(bounds["max"].as_py())
        profile.timestamp.CopyFrom(stats)
    elif column.type == m.COLUMN_TYPE_BOOL:
        trues = int(pc.sum(pc.cast(values, pa.int64())).as_py() or 0)
        profile.boolean.CopyFrom(m.BoolStats(true_count=trues, false_count=profile.count - trues))
    return profile


def profile_table(table: pa.Table, schema: m.Schema, threads: int = 4) -> m.DatasetProfile:
    """Profiles of every declared column of `table`, in schema order."""
    columns = [c for c in schema.columns if c.name in table.column_names]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        profiles = list(pool.map(lambda c: profile_column(table.column(c.name), c), columns))
    return m.DatasetProfile(row_count=table.num_rows, columns=profiles)
