"""Validation and cleansing of incoming rows, vectorised with pyarrow.compute.

`validate(...)` takes a table as received (Arrow batches, a Parquet or CSV file, SQL
rows, broker messages) and returns the cleansed rows in the declared schema, the rows
that go to quarantine with every rule they failed, and the ingest report. Every check
is a column-wide compute kernel producing a mask; Python only touches the rows that
fail (to phrase their reasons) and never loops over rows on the happy path.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.services.ingest.schema import NUMERIC_TYPES, TEXT_TYPES, arrow_schema, arrow_type, regex_pattern, type_name

_OFFSET_SUFFIX = r"(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
_NULL_HASH = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0x100000001B3)
_FALLBACK_PIECE = 4096


# -- results ------------------------------------------------------------------------------


@dataclass
class QuarantineEntry:
    """One input row that failed, with every check it failed."""

    row: int  # position in the input table
    violations: list[m.RowViolation]


@dataclass
class ValidationOutcome:
    """What validation made of one input table."""

    accepted: pa.Table  # cleansed rows in the declared schema
    quarantined: list[QuarantineEntry]
    report: m.IngestReport
    raw: pa.Table  # the input as received, for the quarantined rows' values


@dataclass(frozen=True)
class KeyIndex:
    """Unique keys already stored in the previous version, to refuse repeats across commits."""

    hashes: np.ndarray  # uint64, one per stored row
    keys: pa.Table  # the key columns of the stored rows, same order as hashes
    version: str  # name of the version they come from

    @classmethod
    def of(cls, keys: pa.Table, version: str) -> KeyIndex:
        return cls(row_hashes(keys, keys.column_names), keys, version)


@dataclass
class _Failures:
    """Per-check masks and how to phrase a failing row's reason."""

    n: int
    # (rule, column, failing rows, reason with a "{value}" placeholder, the values to show)
    checks: list[tuple[int, str, np.ndarray, str, pa.ChunkedArray | None]] = field(default_factory=list)

    def add(self, rule: int, column: str, mask: np.ndarray | None, reason: str, values: pa.ChunkedArray | None) -> None:
        if mask is not None and mask.any():
            self.checks.append((rule, column, mask, reason, values))

    def any_mask(self) -> np.ndarray | None:
        if not self.checks:
            return None
        combined = np.zeros(self.n, dtype=bool)
        for _, _, mask, _, _ in self.checks:
            combined |= mask
        return combined

    def entries(self) -> dict[int, list[m.RowViolation]]:
        """Violations of each failing row, by input row."""
        found: dict[int, list[m.RowViolation]] = {}
        for rule, column, mask, reason, values in self.checks:
            failing = np.nonzero(mask)[0]
            shown = values.take(pa.array(failing)).to_pylist() if values is not None else [None] * len(failing)
            for position, value in zip(failing.tolist(), shown, strict=True):
                text = reason.replace("{value}", _show(value)) if values is not None else reason
                found.setdefault(position, []).append(m.RowViolation(rule=rule, column=column, reason=text))  # type: ignore[arg-type]
        return found


# -- helpers ------------------------------------------------------------------------------


def _mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow array (nulls as False) as a numpy mask."""
    filled = pc.fill_null(values, False)
    if isinstance(filled, pa.ChunkedArray):
        if filled.num_chunks == 0:
            return np.zeros(0, dtype=bool)
        return np.concatenate([chunk.to_numpy(zero_copy_only=False) for chunk in filled.chunks]).astype(bool, copy=False)
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=bool)


def _any(values: pa.ChunkedArray | pa.Array) -> bool:
    return bool(pc.any(values).as_py())


def _chunked(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def _is_text(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type))


def _show(value: Any) -> str:
    text = value.isoformat() if isinstance(value, dt.datetime) else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _with_nulls(values: pa.ChunkedArray, null_mask: np.ndarray) -> pa.ChunkedArray:
    """`values` with the masked positions set to null."""
    return _chunked(pc.if_else(pa.array(null_mask), pa.scalar(None, values.type), values))


def cast_with_failures(values: pa.ChunkedArray, target: pa.DataType, *, safe: bool = True) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Cast; values that do not cast become null and are flagged in the returned mask.

    One kernel call on the happy path; only a failing call falls back to pieces, and
    only a failing piece to single values, so bad data costs in proportion to itself.
    """
    try:
        return _chunked(pc.cast(values, target, safe=safe)), None
    except pa.ArrowInvalid:
        pass
    pieces: list[pa.Array] = []
    failed: list[np.ndarray] = []
    for chunk in values.chunks:
        for start in range(0, len(chunk), _FALLBACK_PIECE):
            piece = chunk.slice(start, _FALLBACK_PIECE)
            try:
                pieces.append(pc.cast(piece, target, safe=safe))
                failed.append(np.zeros(len(piece), dtype=bool))
                continue
            except pa.ArrowInvalid:
                pass
            bad = np.zeros(len(piece), dtype=bool)
            for i in range(len(piece)):
                try:
                    pc.cast(piece.slice(i, 1), target, safe=safe)
                except pa.ArrowInvalid:
                    bad[i] = True
            pieces.append(pc.cast(pc.if_else(pa.array(~bad), piece, pa.scalar(None, piece.type)), target, safe=safe))
            failed.append(bad)
    mask = np.concatenate(failed) if failed else np.zeros(0, dtype=bool)
    return pa.chunked_array(pieces, type=target), mask


def _localize(values: pa.ChunkedArray, timezone: str) -> pa.ChunkedArray:
    """Naive timestamps read as wall-clock time in `timezone`, as UTC instants."""
    if timezone in ("", "UTC"):
        return _chunked(pc.cast(values, pa.timestamp("us", tz="UTC")))
    local = pc.assume_timezone(values, timezone, ambiguous="earliest", nonexistent="earliest")
    return _chunked(pc.cast(local, pa.timestamp("us", tz="UTC")))


def coerce_text(
    values: pa.ChunkedArray, column_type: int, timezone: str, timestamp_format: str
) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Parse text values (already trimmed, nulls resolved) as `column_type`."""
    target = arrow_type(column_type)
    if column_type in TEXT_TYPES:
        return _chunked(pc.cast(values, pa.string())), None
    if column_type != m.COLUMN_TYPE_TIMESTAMP:
        return cast_with_failures(values, target)
    if timestamp_format:
        parsed = _chunked(pc.strptime(values, format=timestamp_format, unit="us", error_is_null=True))
        failed = _mask(pc.and_(pc.is_null(parsed), pc.is_valid(values)))
        if parsed.type.tz is None:
            parsed = _localize(parsed, timezone)
        else:
            parsed = _chunked(pc.cast(parsed, target))
        return parsed, failed if failed.any() else None
    has_offset = pc.fill_null(pc.match_substring_regex(values, _OFFSET_SUFFIX), False)
    if not _any(has_offset):
        local, failed_local = cast_with_failures(values, pa.timestamp("us"))
        return _localize(local, timezone), failed_local
    null_text = pa.scalar(None, pa.string())
    with_offset, failed_offset = cast_with_failures(_chunked(pc.if_else(has_offset, values, null_text)), target)
    local, failed_local = cast_with_failures(_chunked(pc.if_else(has_offset, null_text, values)), pa.timestamp("us"))
    combined = _chunked(pc.if_else(has_offset, with_offset, _localize(local, timezone)))
    failures = [f for f in (failed_offset, failed_local) if f is not None]
    return combined, (np.logical_or.reduce(failures) if failures else None)


def _widen(values: pa.ChunkedArray, column_type: int, timezone: str) -> pa.ChunkedArray | None:
    """The lossless conversions always applied (int32 -> int64, float32 -> float64, time units, zones); None if not one."""
    source = values.type
    if pa.types.is_null(source):
        return _chunked(pc.cast(values, arrow_type(column_type)))
    if column_type == m.COLUMN_TYPE_INT and pa.types.is_integer(source) and (pa.types.is_signed_integer(source) or source.bit_width < 64):
        return _chunked(pc.cast(values, pa.int64()))
    if column_type == m.COLUMN_TYPE_FLOAT and pa.types.is_floating(source):
        return _chunked(pc.cast(values, pa.float64()))
    if column_type == m.COLUMN_TYPE_TIMESTAMP:
        if pa.types.is_timestamp(source):
            if source.tz is None:
                return _localize(_chunked(pc.cast(values, pa.timestamp("us"), safe=False)), timezone)
            return _chunked(pc.cast(values, pa.timestamp("us", tz="UTC"), safe=False))
        if pa.types.is_date(source):
            return _localize(_chunked(pc.cast(values, pa.timestamp("us"))), timezone)
    return None


def _coerce_typed(values: pa.ChunkedArray, column_type: int, timezone: str) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """coerce_types: exact conversions between Arrow types, failures flagged per row."""
    if column_type in TEXT_TYPES:
        return cast_with_failures(values, pa.string())
    if column_type == m.COLUMN_TYPE_FLOAT and pa.types.is_decimal(values.type):
        return _chunked(pc.cast(values, pa.float64(), safe=False)), None  # decimal -> float rounds by nature
    return cast_with_failures(values, arrow_type(column_type))


# -- hashing (deduplication and unique keys) ------------------------------------------------


def column_hash(values: pa.ChunkedArray) -> np.ndarray:
    """A uint64 hash per value; equal values hash equal across tables."""
    data_type = values.type
    if pa.types.is_dictionary(data_type):
        values = _chunked(pc.cast(values, data_type.value_type))
        data_type = values.type
    if _is_text(data_type) or pa.types.is_binary(data_type):
        array = values.to_numpy(zero_copy_only=False)
        hashes = pd.util.hash_array(np.asarray(array, dtype=object), categorize=True)
    else:
        if pa.types.is_timestamp(data_type) or pa.types.is_date(data_type):
            values = _chunked(pc.cast(values, pa.int64()))
        elif pa.types.is_boolean(data_type):
            values = _chunked(pc.cast(values, pa.int8()))
        elif pa.types.is_decimal(data_type):
            values = _chunked(pc.cast(values, pa.float64(), safe=False))
        filled = pc.fill_null(values, 0) if values.null_count else values
        array = filled.to_numpy() if isinstance(filled, pa.ChunkedArray) else filled.to_numpy(zero_copy_only=False)
        hashes = pd.util.hash_array(np.ascontiguousarray(array), categorize=False)
    if values.null_count:
        hashes = np.where(_mask(pc.is_null(values)), _NULL_HASH, hashes)
    return np.asarray(hashes, dtype=np.uint64)


def row_hashes(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """A uint64 hash per row over `columns`."""
    combined = np.zeros(table.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in columns:
            combined = (combined * _MIX) ^ column_hash(table.column(name))
    return combined


def _rows_equal(left: pa.Table, right: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """Per row: whether left and right hold the same values in every column (nulls equal nulls)."""
    same = np.ones(left.num_rows, dtype=bool)
    for name in columns:
        a, b = left.column(name), right.column(name)
        if pa.types.is_dictionary(a.type):
            a = a.cast(a.type.value_type)
        if pa.types.is_dictionary(b.type):
            b = b.cast(b.type.value_type)
        equal = _mask(pc.equal(a, b)) | (_mask(pc.is_null(a)) & _mask(pc.is_null(b)))
        if pa.types.is_floating(a.type):
            equal |= _mask(pc.is_nan(a)) & _mask(pc.is_nan(b))
        same &= equal
    return same


def _duplicates_of_earlier(table: pa.Table, columns: Sequence[str], hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows repeating an earlier row on `columns`, the earlier row of each), verified on values."""
    repeated = pd.Series(hashes).duplicated(keep="first").to_numpy()
    if not repeated.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    firsts = np.nonzero(~repeated)[0]
    later = np.nonzero(repeated)[0]
    earlier = firsts[pd.Index(hashes[firsts]).get_indexer(hashes[later])]
    same = _rows_equal(table.take(pa.array(later)), table.take(pa.array(earlier)), columns)
    return later[same], earlier[same]


# -- the validator ------------------------------------------------------------------------


@dataclass(frozen=True)
class InputShape:
    """How an input's values are represented."""

    # Every column is text (CSV files, JSON messages, corrected rows): always parsed.
    text: bool = False
    # Database drivers pick Arrow types (decimal, naive datetimes); convert like coerce_types.
    coerce: bool = False
    # strptime format for timestamp text (CSV option); empty means ISO-8601.
    timestamp_format: str = ""


class _Counts:
    def __init__(self) -> None:
        self.actions: Counter[tuple[int, str]] = Counter()

    def add(self, action: int, column: str, count: int) -> None:
        if count:
            self.actions[(action, column)] += count


def _schema_mismatch(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(f"schema mismatch: {message}", reason="SCHEMA_MISMATCH", metadata=metadata)


def validate(
    table: pa.Table,
    schema: m.Schema,
    policy: m.CleansingPolicy,
    *,
    shape: InputShape = InputShape(),
    existing_keys: KeyIndex | None = None,
) -> ValidationOutcome:
    """Cleanse and validate `table` against `schema` under `policy`.

    Raises InvalidArgument (SCHEMA_MISMATCH) when the input as a whole does not fit:
    undeclared columns under REJECT, a missing required column, or a type that is not
    the declared one without coerce_types. Row-level failures never raise; they go to
    quarantine with their reasons.
    """
    n = table.num_rows
    counts = _Counts()
    report = m.IngestReport(rows_in=n)
    names = table.column_names
    if len(set(names)) != len(names):
        repeated = sorted({c for c in names if names.count(c) > 1})
        raise _schema_mismatch(f"the input repeats column(s) {', '.join(repeated)}")
    declared = {c.name for c in schema.columns}
    extra = [c for c in names if c not in declared]
    if extra:
        if policy.extra_columns == m.EXTRA_COLUMN_POLICY_IGNORE:
            report.ignored_columns.extend(extra)
            for name in extra:
                counts.add(m.CLEANSING_ACTION_DROP_EXTRA_COLUMN, name, n)
        else:
            raise _schema_mismatch(
                f"undeclared column(s) {', '.join(extra)}; declare them (EvolveSchema) or set extra_columns to IGNORE",
                columns=",".join(extra),
            )
    rules = {rule.column: rule for rule in policy.column_rules}
    null_tokens = pa.array(list(policy.null_tokens), pa.string()) if policy.null_tokens else None
    timezone = policy.default_timezone or "UTC"
    failures = _Failures(n)
    output: list[pa.ChunkedArray] = []
    for column in schema.columns:
        rule = rules.get(column.name, m.ColumnCleansingRule())
        if column.name in names:
            values = table.column(column.name)
        elif column.nullable or rule.HasField("null_fill_value"):
            values = pa.chunked_array([pa.nulls(n, arrow_type(column.type))])
        else:
            raise _schema_mismatch(f"required column {column.name!r} is missing", column=column.name)
        output.append(_column(values, column, rule, policy, shape, null_tokens, timezone, counts, failures))
    row_failed = failures.any_mask()
    quarantined: dict[int, list[m.RowViolation]] = failures.entries() if row_failed is not None else {}
    accepted = pa.Table.from_arrays(output, schema=arrow_schema(schema)) if n else arrow_schema(schema).empty_table()
    survivors: np.ndarray | None = None
    if row_failed is not None:
        survivors = np.nonzero(~row_failed)[0]
        accepted = accepted.take(pa.array(survivors))

    accepted, survivors = _deduplicate(accepted, survivors, schema, policy, counts)
    accepted, survivors = _unique_keys(accepted, survivors, schema, existing_keys, quarantined)

    entries = [QuarantineEntry(row, violations) for row, violations in sorted(quarantined.items())]
    report.rows_accepted = accepted.num_rows
    report.rows_quarantined = len(entries)
    report.rows_deduplicated = n - accepted.num_rows - len(entries)
    by_reason: Counter[tuple[int, str]] = Counter()
    for entry in entries:
        for rule_column in {(v.rule, v.column) for v in entry.violations}:
            by_reason[rule_column] += 1
    for (rule_value, column_name), count in sorted(by_reason.items()):
        report.quarantined_by_reason.add(rule=rule_value, column=column_name, row_count=count)
    for (action, column_name), count in sorted(counts.actions.items()):
        report.cleansing_actions.add(action=action, column=column_name, value_count=count)
    return ValidationOutcome(accepted, entries, report, table)


def _column(
    values: pa.ChunkedArray,
    column: m.Column,
    rule: m.ColumnCleansingRule,
    policy: m.CleansingPolicy,
    shape: InputShape,
    null_tokens: pa.Array | None,
    timezone: str,
    counts: _Counts,
    failures: _Failures,
) -> pa.ChunkedArray:
    """One column cleansed, coerced and checked; failures are added to `failures`."""
    name, column_type = column.name, column.type
    target = arrow_type(column_type)
    raw = values
    if pa.types.is_dictionary(values.type) and _is_text(values.type.value_type):
        values = _chunked(pc.cast(values, pa.string()))
    text_input = _is_text(values.type)
    if text_input:
        values = _chunked(pc.cast(values, pa.string())) if not pa.types.is_string(values.type) else values
        is_text_target = column_type in TEXT_TYPES
        if is_text_target and policy.trim_strings:
            trimmed = _chunked(pc.utf8_trim_whitespace(values))
            counts.add(m.CLEANSING_ACTION_TRIM, name, int(pc.sum(pc.not_equal(values, trimmed)).as_py() or 0))
            values = trimmed
        elif not is_text_target:
            values = _chunked(pc.utf8_trim_whitespace(values))
        if null_tokens is not None:
            token = pc.is_in(values, value_set=null_tokens)
            hits = int(pc.sum(token).as_py() or 0)
            if hits:
                counts.add(m.CLEANSING_ACTION_NULL_TOKEN, name, hits)
                values = _chunked(pc.if_else(token, pa.scalar(None, pa.string()), values))
        if not is_text_target:
            values = _chunked(pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values))
        if is_text_target and rule.lowercase:
            lowered = _chunked(pc.utf8_lower(values))
            counts.add(m.CLEANSING_ACTION_LOWERCASE, name, int(pc.sum(pc.not_equal(values, lowered)).as_py() or 0))
            values = lowered
    type_failed: np.ndarray | None = None
    if values.type == target or (column_type == m.COLUMN_TYPE_CATEGORY and pa.types.is_string(values.type)):
        pass
    elif text_input and (shape.text or shape.coerce or policy.coerce_types):
        values, type_failed = coerce_text(values, column_type, timezone, shape.timestamp_format)
        if not shape.text:
            counts.add(m.CLEANSING_ACTION_COERCE, name, len(values) - values.null_count)
    elif (widened := _widen(values, column_type, timezone)) is not None:
        values = widened
    elif shape.coerce or policy.coerce_types:
        values, type_failed = _coerce_typed(values, column_type, timezone)
        counts.add(m.CLEANSING_ACTION_COERCE, name, len(values) - values.null_count)
    else:
        raise _schema_mismatch(
            f"column {name!r} is {values.type} but declared {type_name(column_type)}; send {target} or enable coerce_types",
            column=name,
        )
    if type_failed is not None:
        expected = type_name(column_type)
        failures.add(m.VALIDATION_RULE_TYPE, name, type_failed, f"value {{value}} is not a valid {expected}", raw)
    if column_type in TEXT_TYPES and rule.lowercase and not text_input:
        values = _chunked(pc.utf8_lower(values))
    if values.null_count and rule.HasField("null_fill_value"):
        fill = _fill_scalar(rule.null_fill_value, column_type)
        counts.add(m.CLEANSING_ACTION_NULL_FILL, name, values.null_count - (int(type_failed.sum()) if type_failed is not None else 0))
        if type_failed is not None and type_failed.any():
            filled = _chunked(pc.fill_null(values, fill))
            values = _with_nulls(filled, type_failed)
        else:
            values = _chunked(pc.fill_null(values, fill))
    if not column.nullable and values.null_count:
        missing = _mask(pc.is_null(values))
        if type_failed is not None:
            missing &= ~type_failed
        failures.add(m.VALIDATION_RULE_NOT_NULL, name, missing, "null in a non-nullable column", None)
    if rule.clip_to_range and column_type in NUMERIC_TYPES:
        values = _clip(values, column, counts)
    if not rule.skip_constraint_checks:
        _check_constraints(values, column, failures)
    if column_type == m.COLUMN_TYPE_CATEGORY:
        values = _chunked(pc.dictionary_encode(values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)))
        if values.type != target:
            values = _chunked(pc.cast(values, target))
    return values


def _fill_scalar(text: str, column_type: int) -> pa.Scalar:
    parsed, failed = coerce_text(pa.chunked_array([pa.array([text], pa.string())]), column_type, "UTC", "")
    if failed is not None and failed.any():
        raise InvalidArgument(f"null_fill_value {text!r} is not a valid {type_name(column_type)}", reason="INVALID_CLEANSING_POLICY")
    scalar = parsed[0]
    return scalar.cast(pa.string()) if column_type == m.COLUMN_TYPE_CATEGORY else scalar


def _clip(values: pa.ChunkedArray, column: m.Column, counts: _Counts) -> pa.ChunkedArray:
    bounds = column.constraints.range
    clipped = values
    if bounds.HasField("min") and not bounds.min_exclusive:
        clipped = _chunked(pc.max_element_wise(clipped, pa.scalar(bounds.min).cast(values.type, safe=False), skip_nulls=False))
    if bounds.HasField("max") and not bounds.max_exclusive:
        clipped = _chunked(pc.min_element_wise(clipped, pa.scalar(bounds.max).cast(values.type, safe=False), skip_nulls=False))
    if clipped is not values:
        counts.add(m.CLEANSING_ACTION_CLIP, column.name, int(pc.sum(pc.not_equal(values, clipped)).as_py() or 0))
    return clipped


def _check_constraints(values: pa.ChunkedArray, column: m.Column, failures: _Failures) -> None:
    name, constraints = column.name, column.constraints
    bounds = constraints.range
    low: pa.Scalar | None = None
    high: pa.Scalar | None = None
    low_text = high_text = ""
    if column.type in NUMERIC_TYPES:
        if bounds.HasField("min"):
            low, low_text = pa.scalar(bounds.min, pa.float64()), f"{bounds.min:g}"
        if bounds.HasField("max"):
            high, high_text = pa.scalar(bounds.max, pa.float64()), f"{bounds.max:g}"
    elif column.type == m.COLUMN_TYPE_TIMESTAMP:
        if bounds.HasField("min_time"):
            low = pa.scalar(bounds.min_time.ToDatetime(tzinfo=dt.UTC), pa.timestamp("us", tz="UTC"))
            low_text = bounds.min_time.ToJsonString()
        if bounds.HasField("max_time"):
            high = pa.scalar(bounds.max_time.ToDatetime(tzinfo=dt.UTC), pa.timestamp("us", tz="UTC"))
            high_text = bounds.max_time.ToJsonString()
    compared = _chunked(pc.cast(values, pa.float64())) if column.type == m.COLUMN_TYPE_INT else values
    if low is not None:
        below = pc.less_equal(compared, low) if bounds.min_exclusive else pc.less(compared, low)
        word = "at or below" if bounds.min_exclusive else "below"
        failures.add(m.VALIDATION_RULE_RANGE, name, _mask(below), f"value {{value}} is {word} the minimum {low_text}", values)
    if high is not None:
        above = pc.greater_equal(compared, high) if bounds.max_exclusive else pc.greater(compared, high)
        word = "at or above" if bounds.max_exclusive else "above"
        failures.add(m.VALIDATION_RULE_RANGE, name, _mask(above), f"value {{value}} is {word} the maximum {high_text}", values)
    text: pa.ChunkedArray | None = None
    if constraints.allowed_values:
        text = values if pa.types.is_string(values.type) else _chunked(pc.cast(values, pa.string()))
        allowed = pa.array(list(constraints.allowed_values), pa.string())
        outside = pc.and_(pc.is_valid(text), pc.invert(pc.is_in(text, value_set=allowed)))
        shown = ", ".join(list(constraints.allowed_values)[:10]) + (", ..." if len(constraints.allowed_values) > 10 else "")
        failures.add(m.VALIDATION_RULE_ALLOWED_VALUES, name, _mask(outside), f"value {{value}} is not one of: {shown}", values)
    if constraints.regex:
        text = text if text is not None else values if pa.types.is_string(values.type) else _chunked(pc.cast(values, pa.string()))
        pattern = regex_pattern(constraints.regex)
        mismatched = pc.invert(pc.match_substring_regex(text, pattern))
        failures.add(
            m.VALIDATION_RULE_REGEX,
            name,
            _mask(mismatched),
            "value {value} does not match /" + constraints.regex + "/",
            values,
        )


def _deduplicate(
    accepted: pa.Table, survivors: np.ndarray | None, schema: m.Schema, policy: m.CleansingPolicy, counts: _Counts
) -> tuple[pa.Table, np.ndarray | None]:
    mode = policy.deduplication or m.DEDUPLICATION_MODE_EXACT_ROWS
    if mode == m.DEDUPLICATION_MODE_NONE or accepted.num_rows < 2:
        return accepted, survivors
    keys = list(schema.unique_key_columns)
    if mode == m.DEDUPLICATION_MODE_EXACT_ROWS or not keys:
        columns = accepted.column_names
        later, _ = _duplicates_of_earlier(accepted, columns, row_hashes(accepted, columns))
        drop = later
    else:
        hashes = row_hashes(accepted, keys)
        if mode == m.DEDUPLICATION_MODE_KEY_KEEP_FIRST:
            later, _ = _duplicates_of_earlier(accepted, keys, hashes)
            drop = later
        else:
            drop = _keep_latest(accepted, keys, hashes, schema.event_time_column)
    if len(drop) == 0:
        return accepted, survivors
    counts.add(m.CLEANSING_ACTION_DEDUPLICATE, "", len(drop))
    keep = np.ones(accepted.num_rows, dtype=bool)
    keep[drop] = False
    kept = np.nonzero(keep)[0]
    return accepted.take(pa.array(kept)), (survivors[kept] if survivors is not None else kept)


def _keep_latest(accepted: pa.Table, keys: Sequence[str], hashes: np.ndarray, event_time: str) -> np.ndarray:
    """Rows to drop so that, per unique key, only the latest event time (last received on ties, or without event time) stays."""
    if event_time:
        times = pc.cast(accepted.column(event_time), pa.int64())
        when = pc.fill_null(times, np.iinfo(np.int64).min).to_numpy()
    else:
        when = np.zeros(accepted.num_rows, dtype=np.int64)
    frame = pd.DataFrame({"h": hashes, "t": when, "i": np.arange(accepted.num_rows)})
    keepers = frame.sort_values(["h", "t", "i"], kind="stable").drop_duplicates("h", keep="last")
    keeper_of = pd.Series(keepers["i"].to_numpy(), index=keepers["h"].to_numpy())
    candidates = np.setdiff1d(np.arange(accepted.num_rows), keepers["i"].to_numpy())
    if len(candidates) == 0:
        return candidates
    keeper = keeper_of.reindex(hashes[candidates]).to_numpy()
    same = _rows_equal(accepted.take(pa.array(candidates)), accepted.take(pa.array(keeper)), keys)
    return np.asarray(candidates[same], dtype=np.int64)


def _key_text(table: pa.Table, keys: Sequence[str], row: int) -> str:
    values = {k: table.column(k)[row].as_py() for k in keys}
    return ", ".join(f"{k}={_show(v)}" for k, v in values.items())


def _unique_keys(
    accepted: pa.Table,
    survivors: np.ndarray | None,
    schema: m.Schema,
    existing: KeyIndex | None,
    quarantined: dict[int, list[m.RowViolation]],
) -> tuple[pa.Table, np.ndarray | None]:
    keys = list(schema.unique_key_columns)
    if not keys or accepted.num_rows == 0:
        return accepted, survivors
    hashes = row_hashes(accepted, keys)
    input_row = survivors if survivors is not None else np.arange(accepted.num_rows)
    bad = np.zeros(accepted.num_rows, dtype=bool)
    later, earlier = _duplicates_of_earlier(accepted, keys, hashes)
    for row, first in zip(later.tolist(), earlier.tolist(), strict=True):
        bad[row] = True
        reason = f"unique key ({_key_text(accepted, keys, row)}) repeats input row {int(input_row[first])} of this commit"
        quarantined.setdefault(int(input_row[row]), []).append(m.RowViolation(rule=m.VALIDATION_RULE_UNIQUE_KEY, reason=reason))
    if existing is not None and len(existing.hashes):
        candidates = np.nonzero(np.isin(hashes, existing.hashes) & ~bad)[0]
        if len(candidates):
            stored_index = pd.Index(existing.hashes)
            if stored_index.is_unique:
                positions = stored_index.get_indexer(hashes[candidates])
            else:
                first_of = pd.Series(np.arange(len(existing.hashes)), index=existing.hashes)
                positions = first_of[~first_of.index.duplicated()].reindex(hashes[candidates]).to_numpy()
            same = _rows_equal(accepted.select(keys).take(pa.array(candidates)), existing.keys.take(pa.array(positions)), keys)
            for row in candidates[same].tolist():
                bad[row] = True
                reason = f"unique key ({_key_text(accepted, keys, row)}) already exists in {existing.version}"
                quarantined.setdefault(int(input_row[row]), []).append(m.RowViolation(rule=m.VALIDATION_RULE_UNIQUE_KEY, reason=reason))
    if not bad.any():
        return accepted, survivors
    kept = np.nonzero(~bad)[0]
    return accepted.take(pa.array(kept)), input_row[kept]


# -- inputs as text -----------------------------------------------------------------------


def as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | decimal.Decimal):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, sort_keys=True)


def table_from_records(records: Sequence[Mapping[str, Any]], schema: m.Schema) -> pa.Table:
    """JSON-like records as an all-text table (declared columns first), parsed by validate(shape=text)."""
    declared = [c.name for c in schema.columns]
    seen = set(declared)
    extra: list[str] = []
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                extra.append(key)
    # Every declared column is present, so a field missing from one record is that
    # row's NOT NULL failure rather than a mismatch of the whole input.
    return pa.table({name: pa.array([as_text(r.get(name)) for r in records], pa.string()) for name in declared + extra})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def rows_as_json(table: pa.Table, rows: Iterable[int]) -> list[str]:
    """Rows of `table` as JSON objects from column name to value, as received."""
    positions = list(rows)
    if not positions:
        return []
    picked = table.take(pa.array(positions, pa.int64())).to_pylist()
    return [json.dumps(_json_safe(row), sort_keys=False) for row in picked]
