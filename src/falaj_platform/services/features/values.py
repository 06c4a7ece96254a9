"""Value types and values across the three vocabularies the service speaks.

`falaj.features.v1.ValueType`/`Value` (Falaj's API), Feast's types and `feast.types.Value`
(Feast's registry, online store and serving contract), and Arrow (ingest data and
historical results). One table per direction, so a type is mapped in exactly one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from feast import types as feast_types
from feast.protos.feast.types.Value_pb2 import Value as FeastValue
from feast.value_type import ValueType as FeastValueType

from falaj.features.v1 import message_pb2 as messages
from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj_platform.runtime.errors import InvalidArgument

VT = messages.ValueType

# Falaj value type -> (Feast dtype, Feast ValueType, Feast Value field, Falaj Value field).
_TYPES: dict[int, tuple[Any, FeastValueType, str, str]] = {
    VT.VALUE_TYPE_INT32: (feast_types.Int32, FeastValueType.INT32, "int32_val", "int32_value"),
    VT.VALUE_TYPE_INT64: (feast_types.Int64, FeastValueType.INT64, "int64_val", "int64_value"),
    VT.VALUE_TYPE_FLOAT: (feast_types.Float32, FeastValueType.FLOAT, "float_val", "float_value"),
    VT.VALUE_TYPE_DOUBLE: (feast_types.Float64, FeastValueType.DOUBLE, "double_val", "double_value"),
    VT.VALUE_TYPE_STRING: (feast_types.String, FeastValueType.STRING, "string_val", "string_value"),
    VT.VALUE_TYPE_BOOL: (feast_types.Bool, FeastValueType.BOOL, "bool_val", "bool_value"),
    VT.VALUE_TYPE_BYTES: (feast_types.Bytes, FeastValueType.BYTES, "bytes_val", "bytes_value"),
    VT.VALUE_TYPE_TIMESTAMP: (feast_types.UnixTimestamp, FeastValueType.UNIX_TIMESTAMP, "unix_timestamp_val", "timestamp_value"),
    VT.VALUE_TYPE_INT64_LIST: (feast_types.Array(feast_types.Int64), FeastValueType.INT64_LIST, "int64_list_val", "int64_list_value"),
    VT.VALUE_TYPE_FLOAT_LIST: (feast_types.Array(feast_types.Float32), FeastValueType.FLOAT_LIST, "float_list_val", "float_list_value"),
    VT.VALUE_TYPE_DOUBLE_LIST: (feast_types.Array(feast_types.Float64), FeastValueType.DOUBLE_LIST, "double_list_val", "double_list_value"),
    VT.VALUE_TYPE_STRING_LIST: (feast_types.Array(feast_types.String), FeastValueType.STRING_LIST, "string_list_val", "string_list_value"),
    VT.VALUE_TYPE_BOOL_LIST: (feast_types.Array(feast_types.Bool), FeastValueType.BOOL_LIST, "bool_list_val", "bool_list_value"),
}

_FALAJ_FIELD_TO_FEAST = {falaj: feast for _, _, feast, falaj in _TYPES.values()}
_FEAST_FIELD_TO_FALAJ = {feast: falaj for falaj, feast in _FALAJ_FIELD_TO_FEAST.items()}
_FEAST_FIELD_OF = {value_type: entry[2] for value_type, entry in _TYPES.items()}

# Which feature and key types an ingest column of each type may back.
_COMPATIBLE_COLUMN_TYPES: dict[int, frozenset[int]] = {
    ingest_messages.COLUMN_TYPE_INT: frozenset({VT.VALUE_TYPE_INT32, VT.VALUE_TYPE_INT64}),
    ingest_messages.COLUMN_TYPE_FLOAT: frozenset({VT.VALUE_TYPE_FLOAT, VT.VALUE_TYPE_DOUBLE}),
    ingest_messages.COLUMN_TYPE_STRING: frozenset({VT.VALUE_TYPE_STRING}),
    ingest_messages.COLUMN_TYPE_CATEGORY: frozenset({VT.VALUE_TYPE_STRING}),
    ingest_messages.COLUMN_TYPE_BOOL: frozenset({VT.VALUE_TYPE_BOOL}),
    ingest_messages.COLUMN_TYPE_TIMESTAMP: frozenset({VT.VALUE_TYPE_TIMESTAMP}),
}


def type_name(value_type: int) -> str:
    return VT.Name(VT.ValueType(value_type)).removeprefix("VALUE_TYPE_") if value_type in VT.values() else str(value_type)


def check_value_type(value_type: int, where: str) -> int:
    if value_type not in _TYPES:
        raise InvalidArgument(f"{where}: a value type is required", reason="INVALID_VALUE_TYPE", metadata={"field": where})
    return value_type


def feast_dtype(value_type: int) -> Any:
    return _TYPES[value_type][0]


def feast_value_type(value_type: int) -> FeastValueType:
    return _TYPES[value_type][1]


def column_backs(column_type: int, value_type: int) -> bool:
    """Whether an ingest column of `column_type` may hold values of `value_type`."""
    return value_type in _COMPATIBLE_COLUMN_TYPES.get(column_type, frozenset())


def column_type_name(column_type: int) -> str:
    return ingest_messages.ColumnType.Name(ingest_messages.ColumnType.ValueType(column_type)).removeprefix("COLUMN_TYPE_")


def arrow_backs(arrow_type: pa.DataType, value_type: int) -> bool:
    """Whether an Arrow column of `arrow_type` may hold keys of `value_type` (inline entity rows)."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if value_type in (VT.VALUE_TYPE_INT32, VT.VALUE_TYPE_INT64):
        return pa.types.is_integer(arrow_type)
    if value_type in (VT.VALUE_TYPE_FLOAT, VT.VALUE_TYPE_DOUBLE):
        return pa.types.is_floating(arrow_type)
    if value_type == VT.VALUE_TYPE_STRING:
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if value_type == VT.VALUE_TYPE_BOOL:
        return pa.types.is_boolean(arrow_type)
    if value_type == VT.VALUE_TYPE_BYTES:
        return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
    if value_type == VT.VALUE_TYPE_TIMESTAMP:
        return pa.types.is_timestamp(arrow_type)
    return False


# -- values --------------------------------------------------------------------------------


def to_feast_value(value: messages.Value) -> FeastValue:
    """A Falaj value as a Feast value (null stays null)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return FeastValue()
    target = _FALAJ_FIELD_TO_FEAST[kind]
    if kind == "timestamp_value":
        return FeastValue(unix_timestamp_val=value.timestamp_value.seconds)
    if kind.endswith("_list_value"):
        converted = FeastValue()
        getattr(converted, target).val.extend(getattr(value, kind).values)
        return converted
    return FeastValue(**{target: getattr(value, kind)})


def to_falaj_value(value: FeastValue) -> messages.Value:
    """A Feast value as a Falaj value; kinds Falaj does not carry become null."""
    kind = value.WhichOneof("val")
    target = _FEAST_FIELD_TO_FALAJ.get(kind or "")
    if target is None:
        return messages.Value()
    if kind == "unix_timestamp_val":
        converted = messages.Value()
        converted.timestamp_value.seconds = value.unix_timestamp_val
        return converted
    if target.endswith("_list_value"):
        converted = messages.Value()
        getattr(converted, target).values.extend(getattr(value, kind or "").val)
        return converted
    return messages.Value(**{target: getattr(value, kind or "")})


def is_null(value: FeastValue) -> bool:
    kind = value.WhichOneof("val")
    return kind is None or kind == "null_val"


def check_feast_keys(join_key: str, value_type: int, values: Iterable[FeastValue]) -> None:
    """Refuse entity key values of another type than the join key's (or nulls)."""
    expected = _FEAST_FIELD_OF[value_type]
    for position, value in enumerate(values):
        kind = value.WhichOneof("val")
        if kind != expected:
            found = "null" if kind in (None, "null_val") else kind.removesuffix("_val").upper()
            raise InvalidArgument(
                f"entity key {join_key!r} takes {type_name(value_type)} values; row {position} is {found}",
                reason="ENTITY_KEY_TYPE_MISMATCH",
                metadata={"join_key": join_key, "expected": type_name(value_type), "row": str(position)},
            )


_ARROW_TYPES: dict[int, pa.DataType] = {
    VT.VALUE_TYPE_INT32: pa.int32(),
    VT.VALUE_TYPE_INT64: pa.int64(),
    VT.VALUE_TYPE_FLOAT: pa.float32(),
    VT.VALUE_TYPE_DOUBLE: pa.float64(),
    VT.VALUE_TYPE_STRING: pa.string(),
    VT.VALUE_TYPE_BOOL: pa.bool_(),
    VT.VALUE_TYPE_BYTES: pa.binary(),
    VT.VALUE_TYPE_TIMESTAMP: pa.timestamp("us", tz="UTC"),
    VT.VALUE_TYPE_INT64_LIST: pa.list_(pa.int64()),
    VT.VALUE_TYPE_FLOAT_LIST: pa.list_(pa.float32()),
    VT.VALUE_TYPE_DOUBLE_LIST: pa.list_(pa.float64()),
    VT.VALUE_TYPE_STRING_LIST: pa.list_(pa.string()),
    VT.VALUE_TYPE_BOOL_LIST: pa.list_(pa.bool_()),
}


def arrow_type(value_type: int) -> pa.DataType:
    """The Arrow type historical results carry for a feature of `value_type`."""
    return _ARROW_TYPES[value_type]
