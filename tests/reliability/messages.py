"""Hypothesis strategies built from protobuf descriptors: hostile but well-formed messages.

`message_strategy(descriptor)` draws a message of that type with every kind of field
filled or left out: boundary integers, NaN and infinities, unknown enum numbers, strings
meant to trip path, name, SQL and template handling, odd bytes, nested messages down to a
bounded depth, repeated and map fields. The values aim at the handling code, not at the
wire format (random bytes cover that).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

# Strings that have broken, or leaked from, request handling elsewhere.
HOSTILE_STRINGS = [
    "",
    " ",
    "../../../../etc/passwd",
    "/etc/passwd",
    "file:///etc/passwd",
    "datasets/../../../etc",
    "datasets/sales/../../pki/ca-key.pem",
    "datasets//sales",
    "datasets/%2e%2e/secret",
    "datasets/\u2024\u2024/x",  # one-dot leaders: look like '..'
    "ｄａｔａｓｅｔｓ/sales",  # fullwidth look-alike
    "models/churn/versions/-1",
    "models/churn/versions/99999999999999999999999",
    "experiments/\u202eexe.txt",  # right-to-left override
    "deployments/\x00null",
    "x" * 300,
    "name-" + "a" * 70_000,
    "' OR '1'='1' --",
    "'; DROP TABLE datasets; --",
    "{{7*7}}${7*7}%s%n%x",
    "${jndi:ldap://127.0.0.1:1/a}",
    "http://169.254.169.254/latest/meta-data/",
    "sqlite:////etc/passwd",
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    "\U0001f600" * 50,
    "*",
    "-1",
    "NaN",
    "1e309",
    "\r\nX-Injected: yes",
    "<script>alert(1)</script>",
]

# Resource-looking prefixes so that some names get past the first parse into the lookups.
NAME_PREFIXES = [
    "datasets/",
    "entities/",
    "featureViews/",
    "featureServices/",
    "models/",
    "trainingJobs/",
    "deployments/",
    "servedModels/",
    "experiments/",
    "monitors/",
    "alertRules/",
    "policies/",
    "roles/",
]

HOSTILE_BYTES = [
    b"",
    b"\x00" * 64,
    b"\xff" * 64,
    b"ARROW1\x00\x00\xff\xff\xff\xff",
    b"PAR1\x00\x00\x00\x00PAR1",
    b"\x08\x96\x01",  # a protobuf varint, in a bytes field
    b"\x0a\xff\xff\xff\xff\x0f",  # a length-delimited field claiming 4 GiB
]

INT_BOUNDS = {
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = INT_BOUNDS[field_type]
    edges = sorted({low, high, 0, 1, -1 if low < 0 else 2, 1_000_000, min(high, 2**31)})
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(-3, 100).filter(lambda v: v >= low))


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=24),
        st.builds(
            lambda prefix, rest: prefix + rest, st.sampled_from(NAME_PREFIXES), st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=12)
        ),
    )


def _bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(HOSTILE_BYTES), st.binary(max_size=64))


def _enum(field: d.FieldDescriptor) -> st.SearchStrategy[int]:
    numbers = [value.number for value in field.enum_type.values]
    if field.enum_type.is_closed:  # proto2: an unknown number cannot be set on the message
        return st.sampled_from(numbers)
    return st.one_of(st.sampled_from(numbers), st.integers(-5, 5), st.sampled_from([2**31 - 1, -(2**31)]))


def _scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_BOUNDS:
        return _integers(kind)
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == d.FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == d.FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == d.FieldDescriptor.TYPE_STRING:
        return _strings()
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return _bytes()
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return _enum(field)
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


@dataclass(frozen=True)
class Bounds:
    """How big a drawn message may get: nesting depth, and items per repeated field."""

    depth: int = 3
    items: int = 3


def message_class(descriptor: d.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)  # type: ignore[no-any-return]


def _is_map(field: d.FieldDescriptor) -> bool:
    return field.type == d.FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _is_repeated(field: d.FieldDescriptor) -> bool:
    return bool(field.is_repeated) if hasattr(field, "is_repeated") else field.label == d.FieldDescriptor.LABEL_REPEATED


def message_strategy(descriptor: d.Descriptor, bounds: Bounds = Bounds()) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with hostile values in any subset of their fields."""
    return _message(descriptor, bounds, bounds.depth)


def _message(descriptor: d.Descriptor, bounds: Bounds, depth: int) -> st.SearchStrategy[Message]:
    cls = message_class(descriptor)
    if depth <= 0:
        return st.just(cls())

    @st.composite
    def draw_message(draw: st.DrawFn) -> Message:
        message = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            _fill(draw, message, field, bounds, depth)
        return message

    return draw_message()


def _value(field: d.FieldDescriptor, bounds: Bounds, depth: int) -> st.SearchStrategy[Any]:
    if field.type in (d.FieldDescriptor.TYPE_MESSAGE, d.FieldDescriptor.TYPE_GROUP):
        return st.deferred(lambda: _message(field.message_type, bounds, depth - 1))
    return _scalar(field)


def _fill(draw: st.DrawFn, message: Message, field: d.FieldDescriptor, bounds: Bounds, depth: int) -> None:
    target = getattr(message, field.name)
    if _is_map(field):
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_scalar(key_field), _value(value_field, bounds, depth), max_size=bounds.items))
        for key, value in entries.items():
            if value_field.type == d.FieldDescriptor.TYPE_MESSAGE:
                target[key].CopyFrom(value)
            else:
                target[key] = value
        return
    if _is_repeated(field):
        values = draw(st.lists(_value(field, bounds, depth), max_size=bounds.items))
        if field.type == d.FieldDescriptor.TYPE_MESSAGE:
            for value in values:
                target.add().CopyFrom(value)
        else:
            target.extend(values)
        return
    value = draw(_value(field, bounds, depth))
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# -- the platform's contracts ------------------------------------------------------------------

SERVICE_MODULES = [f"falaj.{name}.v1.service_pb2" for name in ("ingest", "features", "training", "serving", "experiments", "monitoring")]
SERVICE_MODULES += ["falaj.gateway.v1.service_pb2", "falaj.inference.open_inference_grpc_pb2"]


@dataclass(frozen=True)
class Rpc:
    """One method of a platform contract."""

    path: str  # /package.Service/Method
    request: d.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def service(self) -> str:
        return self.path.split("/")[1]


def platform_rpcs() -> Iterator[Rpc]:
    """Every method of every service the gateway fronts, and of the gateway's admin API."""
    for module in (importlib.import_module(name) for name in SERVICE_MODULES):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield Rpc(f"/{service.full_name}/{method.name}", method.input_type, method.client_streaming, method.server_streaming)


# -- one field at a time at its edge ---------------------------------------------------------------

_EDGE_TIMESTAMPS = {"nanos=-1": {"nanos": -1}, "year 36812": {"seconds": 2**40}, "year -32873": {"seconds": -(2**40)}}
_EDGE_DURATIONS = {"mixed signs": {"seconds": 1, "nanos": -1}, "2**60 s": {"seconds": 2**60}, "negative": {"seconds": -5}}


def _edges(field: d.FieldDescriptor) -> dict[str, Any]:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_MESSAGE:
        return {
            "google.protobuf.Timestamp": _EDGE_TIMESTAMPS,
            "google.protobuf.Duration": _EDGE_DURATIONS,
        }.get(field.message_type.full_name, {})
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return {} if field.enum_type.is_closed else {"enum 99": 99, "enum -1": -1}
    if kind in INT_BOUNDS:
        low, high = INT_BOUNDS[kind]
        return {"min": low, "max": high} | ({"-1": -1} if low < 0 else {})
    if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    return {}


def edge_cases(descriptor: d.Descriptor, depth: int = 2) -> Iterator[tuple[str, Message]]:
    """(field path and value, message) with one number, enum, Timestamp or Duration field at an edge.

    Nested messages are entered down to `depth` (one element of a repeated message field);
    everything else in the message is left unset.
    """
    cls = message_class(descriptor)
    for path in _edge_paths(descriptor, (), depth):
        for label, value in _edges(path[-1]).items():
            message = cls()
            target: Any = message
            for field in path[:-1]:
                target = getattr(target, field.name).add() if _is_repeated(field) else getattr(target, field.name)
            last = path[-1]
            if isinstance(value, dict):
                holder = getattr(target, last.name).add() if _is_repeated(last) else getattr(target, last.name)
                for key, part in value.items():
                    setattr(holder, key, part)
            elif _is_repeated(last):
                getattr(target, last.name).append(value)
            else:
                setattr(target, last.name, value)
            yield ".".join(f.name for f in path) + " " + label, message


def _edge_paths(descriptor: d.Descriptor, prefix: tuple[d.FieldDescriptor, ...], depth: int) -> Iterator[tuple[d.FieldDescriptor, ...]]:
    for field in descriptor.fields:
        if _is_map(field):
            continue
        if _edges(field):
            yield (*prefix, field)
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE and depth > 0 and not field.message_type.full_name.startswith("google.protobuf."):
            yield from _edge_paths(field.message_type, (*prefix, field), depth - 1)
