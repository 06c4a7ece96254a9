"""Dataset schemas: definition checks, the Arrow type of every column, and evolution.

The declared `Schema` (a contract message, used here as a plain value) is the one
source of truth: Arrow types, Parquet files and validation all derive from it.
Evolution compares two schemas column by column; compatible changes make a minor
version, breaking ones a major version that needs an explicit migration.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
CATEGORY_TYPE = pa.dictionary(pa.int32(), pa.string())

ARROW_TYPES: dict[int, pa.DataType] = {
    m.COLUMN_TYPE_INT: pa.int64(),
    m.COLUMN_TYPE_FLOAT: pa.float64(),
    m.COLUMN_TYPE_STRING: pa.string(),
    m.COLUMN_TYPE_BOOL: pa.bool_(),
    m.COLUMN_TYPE_TIMESTAMP: TIMESTAMP_TYPE,
    m.COLUMN_TYPE_CATEGORY: CATEGORY_TYPE,
}

NUMERIC_TYPES = (m.COLUMN_TYPE_INT, m.COLUMN_TYPE_FLOAT)
TEXT_TYPES = (m.COLUMN_TYPE_STRING, m.COLUMN_TYPE_CATEGORY)

COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def type_name(column_type: int) -> str:
    return m.ColumnType.Name(column_type).removeprefix("COLUMN_TYPE_")  # type: ignore[arg-type]


def arrow_type(column_type: int) -> pa.DataType:
    return ARROW_TYPES[column_type]


def arrow_schema(schema: m.Schema) -> pa.Schema:
    """The Arrow schema of stored data: declared order, declared types and nullability."""
    return pa.schema([pa.field(c.name, arrow_type(c.type), nullable=c.nullable) for c in schema.columns])


def columns_by_name(schema: m.Schema) -> dict[str, m.Column]:
    return {c.name: c for c in schema.columns}


def regex_pattern(regex: str) -> str:
    """RE2 full-match pattern for a declared regex."""
    return f"^(?:{regex})$"


def check_regex(regex: str) -> str | None:
    """Why `regex` is not a valid RE2 pattern, or None."""
    try:
        pc.match_substring_regex(pa.array([""]), regex_pattern(regex))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        return str(error).splitlines()[0]
    return None


def check_schema(schema: m.Schema) -> None:
    """Refuse a schema that cannot be enforced, listing every problem at once."""
    problems: list[str] = []
    if not schema.columns:
        problems.append("the schema declares no columns")
    seen: set[str] = set()
    for column in schema.columns:
        label = column.name or "(unnamed)"
        if not COLUMN_NAME.match(column.name):
            problems.append(f"column name {column.name!r} must start with a letter or _ and hold only letters, digits and _")
        if column.name in seen:
            problems.append(f"column {column.name!r} is declared twice")
        seen.add(column.name)
        if column.type not in ARROW_TYPES:
            problems.append(f"column {label!r} has no type")
            continue
        if m.PII_CATEGORY_UNSPECIFIED in column.pii_categories:
            problems.append(f"column {label!r} has an unspecified PII category")
        problems.extend(_constraint_problems(column))
    names = columns_by_name(schema)

    def role(columns: Iterable[str], what: str) -> None:
        for name in columns:
            if name not in names:
                problems.append(f"{what} column {name!r} is not declared")

    role(schema.entity_key_columns, "entity-key")
    role(schema.unique_key_columns, "unique-key")
    if len(set(schema.unique_key_columns)) != len(schema.unique_key_columns):
        problems.append("unique-key columns repeat a column")
    if schema.event_time_column:
        event_time = names.get(schema.event_time_column)
        if event_time is None:
            problems.append(f"event-time column {schema.event_time_column!r} is not declared")
        elif event_time.type != m.COLUMN_TYPE_TIMESTAMP:
            problems.append(f"event-time column {schema.event_time_column!r} must be TIMESTAMP, not {type_name(event_time.type)}")
    if schema.data_subject_column:
        subject = names.get(schema.data_subject_column)
        if subject is None:
            problems.append(f"data-subject column {schema.data_subject_column!r} is not declared")
        elif subject.type not in (*TEXT_TYPES, m.COLUMN_TYPE_INT):
            problems.append(f"data-subject column {schema.data_subject_column!r} must be STRING, CATEGORY or INT")
    if problems:
        raise InvalidArgument("the schema is not valid: " + "; ".join(problems), reason="INVALID_SCHEMA")


def _constraint_problems(column: m.Column) -> list[str]:
    problems: list[str] = []
    constraints = column.constraints
    bounds = constraints.range
    if bounds.HasField("min") or bounds.HasField("max"):
        if column.type not in NUMERIC_TYPES:
            problems.append(f"column {column.name!r}: numeric range on a {type_name(column.type)} column")
        elif bounds.HasField("min") and bounds.HasField("max") and bounds.min > bounds.max:
            problems.append(f"column {column.name!r}: range minimum {bounds.min} is above maximum {bounds.max}")
    if bounds.HasField("min_time") or bounds.HasField("max_time"):
        if column.type != m.COLUMN_TYPE_TIMESTAMP:
            problems.append(f"column {column.name!r}: time range on a {type_name(column.type)} column")
        elif (
            bounds.HasField("min_time")
            and bounds.HasField("max_time")
            and bounds.min_time.ToMicroseconds() > bounds.max_time.ToMicroseconds()
        ):
            problems.append(f"column {column.name!r}: range min_time is after max_time")
    if constraints.regex:
        if column.type not in TEXT_TYPES:
            problems.append(f"column {column.name!r}: regex on a {type_name(column.type)} column")
        elif (why := check_regex(constraints.regex)) is not None:
            problems.append(f"column {column.name!r}: regex is not valid RE2: {why}")
    if constraints.allowed_values and column.type in (m.COLUMN_TYPE_TIMESTAMP,):
        problems.append(f"column {column.name!r}: allowed values on a TIMESTAMP column")
    return problems


def check_cleansing(policy: m.CleansingPolicy, schema: m.Schema) -> None:
    """Refuse a cleansing policy that names unknown columns, zones or unparseable fills."""
    problems: list[str] = []
    if policy.default_timezone:
        try:
            zoneinfo.ZoneInfo(policy.default_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"default_timezone {policy.default_timezone!r} is not an IANA time zone")
    names = columns_by_name(schema)
    seen: set[str] = set()
    for rule in policy.column_rules:
        column = names.get(rule.column)
        if column is None:
            problems.append(f"cleansing rule for undeclared column {rule.column!r}")
            continue
        if rule.column in seen:
            problems.append(f"two cleansing rules for column {rule.column!r}")
        seen.add(rule.column)
        if rule.HasField("null_fill_value") and parse_text_value(rule.null_fill_value, column.type) is None:
            problems.append(f"null_fill_value {rule.null_fill_value!r} is not a valid {type_name(column.type)}")
        if rule.lowercase and column.type not in TEXT_TYPES:
            problems.append(f"lowercase on {type_name(column.type)} column {rule.column!r}")
        if rule.clip_to_range and column.type not in NUMERIC_TYPES:
            problems.append(f"clip_to_range on {type_name(column.type)} column {rule.column!r}")
    if problems:
        raise InvalidArgument("the cleansing policy is not valid: " + "; ".join(problems), reason="INVALID_CLEANSING_POLICY")


def parse_text_value(text: str, column_type: int) -> pa.Scalar | None:
    """`text` parsed as a value of `column_type`, or None when it does not parse."""
    from falaj_platform.services.ingest.validation import coerce_text  # cycle: validation uses the schema helpers

    values, failed = coerce_text(pa.chunked_array([pa.array([text], pa.string())]), column_type, "UTC", "")
    if failed is not None and failed.any():
        return None
    return values[0]


# -- evolution ------------------------------------------------------------------------


@dataclass(frozen=True)
class Evolution:
    """How a proposed schema relates to the current one."""

    changes: list[m.SchemaChange]

    @property
    def breaking(self) -> bool:
        return any(change.breaking for change in self.changes)

    @property
    def kind(self) -> int:
        return m.SCHEMA_CHANGE_KIND_BREAKING if self.breaking else m.SCHEMA_CHANGE_KIND_COMPATIBLE


def _change(column: str, change_type: int, breaking: bool, detail: str) -> m.SchemaChange:
    return m.SchemaChange(column=column, type=change_type, breaking=breaking, detail=detail)  # type: ignore[arg-type]


def _range_relaxed(old: m.RangeConstraint, new: m.RangeConstraint) -> bool:
    def lower(r: m.RangeConstraint) -> tuple[float, bool] | None:
        if r.HasField("min"):
            return r.min, r.min_exclusive
        if r.HasField("min_time"):
            return float(r.min_time.ToMicroseconds()), r.min_exclusive
        return None

    def upper(r: m.RangeConstraint) -> tuple[float, bool] | None:
        if r.HasField("max"):
            return r.max, r.max_exclusive
        if r.HasField("max_time"):
            return float(r.max_time.ToMicroseconds()), r.max_exclusive
        return None

    old_low, new_low, old_high, new_high = lower(old), lower(new), upper(old), upper(new)
    low_ok = new_low is None or (
        old_low is not None and (new_low[0] < old_low[0] or (new_low[0] == old_low[0] and (not new_low[1] or old_low[1])))
    )
    high_ok = new_high is None or (
        old_high is not None and (new_high[0] > old_high[0] or (new_high[0] == old_high[0] and (not new_high[1] or old_high[1])))
    )
    return low_ok and high_ok


def _constraints_change(old: m.Column, new: m.Column) -> m.SchemaChange | None:
    a, b = old.constraints, new.constraints
    if a == b:
        return None
    relaxed = _range_relaxed(a.range, b.range)
    if list(a.allowed_values) != list(b.allowed_values):
        relaxed = relaxed and (not b.allowed_values or (bool(a.allowed_values) and set(b.allowed_values) >= set(a.allowed_values)))
    if a.regex != b.regex:
        relaxed = relaxed and not b.regex
    detail = "constraints relaxed" if relaxed else "constraints tightened or changed; existing rows may not satisfy them"
    return _change(new.name, m.SCHEMA_CHANGE_TYPE_CONSTRAINTS_CHANGED, not relaxed, detail)


def renames_in(migration: m.SchemaMigration | None) -> dict[str, str]:
    if migration is None:
        return {}
    return {step.rename.column: step.rename.new_name for step in migration.steps if step.WhichOneof("step") == "rename"}


def diff_schemas(old: m.Schema, new: m.Schema, migration: m.SchemaMigration | None = None) -> Evolution:
    """Column-level differences from `old` to `new`; renames come from the migration's steps."""
    changes: list[m.SchemaChange] = []
    old_cols, new_cols = columns_by_name(old), columns_by_name(new)
    renames = {a: b for a, b in renames_in(migration).items() if a in old_cols and b in new_cols and b not in old_cols}
    for name, column in old_cols.items():
        target_name = renames.get(name, name)
        if target_name != name:
            changes.append(_change(name, m.SCHEMA_CHANGE_TYPE_COLUMN_RENAMED, True, f"renamed to {target_name}"))
        target = new_cols.get(target_name)
        if target is None:
            changes.append(_change(name, m.SCHEMA_CHANGE_TYPE_COLUMN_REMOVED, True, "column removed"))
            continue
        if target.type != column.type:
            detail = f"type {type_name(column.type)} -> {type_name(target.type)}"
            changes.append(_change(target_name, m.SCHEMA_CHANGE_TYPE_TYPE_CHANGED, True, detail))
        if target.nullable != column.nullable:
            tightened = not target.nullable
            detail = "now NOT NULL" if tightened else "now nullable"
            changes.append(_change(target_name, m.SCHEMA_CHANGE_TYPE_NULLABILITY_CHANGED, tightened, detail))
        constraint_change = _constraints_change(column, target)
        if constraint_change is not None:
            changes.append(constraint_change)
        if target.description != column.description or list(target.pii_categories) != list(column.pii_categories):
            changes.append(_change(target_name, m.SCHEMA_CHANGE_TYPE_METADATA_CHANGED, False, "description or PII tags changed"))
    renamed_targets = set(renames.values())
    for name, column in new_cols.items():
        if name in old_cols or name in renamed_targets:
            continue
        breaking = not column.nullable
        detail = "NOT NULL column added; existing rows need a value" if breaking else "nullable column added"
        changes.append(_change(name, m.SCHEMA_CHANGE_TYPE_COLUMN_ADDED, breaking, detail))
    mapped_old_event_time = renames.get(old.event_time_column, old.event_time_column)
    if mapped_old_event_time != new.event_time_column:
        detail = f"event-time column {old.event_time_column or '(none)'} -> {new.event_time_column or '(none)'} changes partitioning"
        changes.append(_change(new.event_time_column, m.SCHEMA_CHANGE_TYPE_ROLES_CHANGED, True, detail))
    mapped_unique = [renames.get(c, c) for c in old.unique_key_columns]
    if mapped_unique != list(new.unique_key_columns):
        relaxed = not new.unique_key_columns
        changes.append(_change("", m.SCHEMA_CHANGE_TYPE_ROLES_CHANGED, not relaxed, "unique key changed"))
    mapped_entity = [renames.get(c, c) for c in old.entity_key_columns]
    mapped_subject = renames.get(old.data_subject_column, old.data_subject_column)
    if mapped_entity != list(new.entity_key_columns) or mapped_subject != new.data_subject_column:
        changes.append(_change("", m.SCHEMA_CHANGE_TYPE_ROLES_CHANGED, False, "entity-key or data-subject role changed"))
    return Evolution(changes)


def check_migration(old: m.Schema, new: m.Schema, migration: m.SchemaMigration) -> None:
    """Refuse a migration whose steps do not turn the old columns into exactly the new ones."""
    current = {c.name: c.type for c in old.columns}
    new_cols = columns_by_name(new)
    problems: list[str] = []
    for position, step in enumerate(migration.steps, start=1):
        kind = step.WhichOneof("step")
        if kind == "cast":
            if step.cast.column not in current:
                problems.append(f"step {position}: cast of unknown column {step.cast.column!r}")
            elif step.cast.to_type not in ARROW_TYPES:
                problems.append(f"step {position}: cast of {step.cast.column!r} has no target type")
            else:
                target = new_cols.get(step.cast.column)
                if step.cast.on_failure == m.CAST_FAILURE_ACTION_SET_NULL and target is not None and not target.nullable:
                    problems.append(f"step {position}: SET_NULL on non-nullable column {step.cast.column!r}")
                current[step.cast.column] = step.cast.to_type
        elif kind == "rename":
            if step.rename.column not in current:
                problems.append(f"step {position}: rename of unknown column {step.rename.column!r}")
            elif step.rename.new_name in current:
                problems.append(f"step {position}: rename target {step.rename.new_name!r} already exists")
            else:
                current[step.rename.new_name] = current.pop(step.rename.column)
        elif kind == "drop":
            if current.pop(step.drop.column, None) is None:
                problems.append(f"step {position}: drop of unknown column {step.drop.column!r}")
        elif kind == "add":
            column = new_cols.get(step.add.column)
            if column is None:
                problems.append(f"step {position}: added column {step.add.column!r} is not in the new schema")
            elif step.add.column in current:
                problems.append(f"step {position}: added column {step.add.column!r} already exists")
            else:
                if step.add.fill_null and not column.nullable:
                    problems.append(f"step {position}: fill_null for non-nullable column {step.add.column!r}")
                if not step.add.fill_null and parse_text_value(step.add.fill_value, column.type) is None:
                    problems.append(f"step {position}: fill_value {step.add.fill_value!r} is not a valid {type_name(column.type)}")
                current[step.add.column] = column.type
        else:
            problems.append(f"step {position}: empty step")
    for name, column in new_cols.items():
        if name not in current:
            if column.nullable:
                current[name] = column.type  # a new nullable column is read as null
            else:
                problems.append(f"new NOT NULL column {name!r} gets no value (add an AddColumn step)")
        elif current[name] != column.type:
            problems.append(f"column {name!r} is {type_name(current[name])} after the steps but {type_name(column.type)} in the new schema")
    for name in current:
        if name not in new_cols:
            problems.append(f"column {name!r} remains after the steps but is not in the new schema (add a DropColumn step)")
    if problems:
        raise FailedPrecondition("the migration does not produce the new schema: " + "; ".join(problems), reason="MIGRATION_INVALID")
