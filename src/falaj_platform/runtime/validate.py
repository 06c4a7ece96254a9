"""Request field checks every service needs the same way: enum numbers, Timestamps, 64-bit integers.

Protobuf lets a client send any enum number, any Timestamp and any integer the wire
type holds; these turn the ones a service cannot use into InvalidArgument naming the
field, instead of a ValueError deep in a service (INTERNAL) or an overflow in the
database.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import timestamp_pb2

from falaj_platform.runtime.errors import InvalidArgument

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def enum_name(enum_type: Any, number: int, field: str, *, prefix: str = "") -> str:
    """The name of `number` in `enum_type` (an `EnumTypeWrapper`) without `prefix`.

    InvalidArgument (reason INVALID_ENUM, metadata field) for a number the enum does not define.
    """
    try:
        name = str(enum_type.Name(number))
    except ValueError:
        kind = enum_type.DESCRIPTOR.name
        raise InvalidArgument(f"{field} {number} is not a known {kind} value", reason="INVALID_ENUM", metadata={"field": field}) from None
    return name.removeprefix(prefix)


def check_timestamp(stamp: timestamp_pb2.Timestamp, field: str) -> None:
    """InvalidArgument (reason INVALID_TIMESTAMP) unless `stamp` is a valid Timestamp (years 1 to 9999, nanos in [0, 1e9))."""
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"{field} has nanos {stamp.nanos}; they must be in [0, 999999999]", reason="INVALID_TIMESTAMP", metadata={"field": field}
        )
    if not MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidArgument(
            f"{field} has seconds {stamp.seconds}, outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z",
            reason="INVALID_TIMESTAMP",
            metadata={"field": field},
        )


def timestamp_to_datetime(stamp: timestamp_pb2.Timestamp, field: str) -> dt.datetime:
    """`stamp` as an aware UTC datetime (microseconds); InvalidArgument naming `field` when it is not a valid Timestamp."""
    check_timestamp(stamp, field)
    return stamp.ToDatetime(tzinfo=dt.UTC)


def optional_datetime(message: Any, field: str, default: dt.datetime | None = None) -> dt.datetime | None:
    """The Timestamp field `field` of `message` as an aware UTC datetime when set, else `default`."""
    if not message.HasField(field):
        return default
    return timestamp_to_datetime(getattr(message, field), field)


def int64(number: int, field: str) -> int:
    """`number` when it fits a signed 64-bit integer (what the databases store); InvalidArgument naming `field` otherwise."""
    if not INT64_MIN <= number <= INT64_MAX:
        raise InvalidArgument(f"{field} {number} does not fit a 64-bit integer", reason="OUT_OF_RANGE", metadata={"field": field})
    return number


def non_negative(number: int, field: str) -> int:
    """`number` when it is 0 or more; InvalidArgument naming `field` otherwise."""
    if number < 0:
        raise InvalidArgument(f"{field} must not be negative (got {number})", reason="OUT_OF_RANGE", metadata={"field": field})
    return number
