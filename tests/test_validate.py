"""The runtime's request field checks (runtime/validate.py) and its refusal of bytes that do not parse."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest
from falaj_platform.pki import PKI
from falaj_platform.runtime import server as server_module
from falaj_platform.runtime import tls, validate
from falaj_platform.runtime.errors import Aborted, InvalidArgument
from falaj_platform.runtime.interceptors import _CheckedRequests, _tolerant, _Unparseable
from falaj_platform.runtime.server import RunningServer, create_server
from tests.conftest import identity


def test_enum_name_names_a_known_number_and_refuses_an_unknown_one_by_field() -> None:
    assert validate.enum_name(ingest_messages.WriteMode, ingest_messages.WRITE_MODE_APPEND, "write_mode") == "WRITE_MODE_APPEND"
    assert validate.enum_name(ingest_messages.WriteMode, ingest_messages.WRITE_MODE_APPEND, "write_mode", prefix="WRITE_MODE_") == "APPEND"
    with pytest.raises(InvalidArgument) as refused:
        validate.enum_name(ingest_messages.WriteMode, 99, "header.write_mode")
    assert refused.value.reason == "INVALID_ENUM"
    assert refused.value.metadata == {"field": "header.write_mode"}
    assert "header.write_mode 99 is not a known WriteMode value" in refused.value.message


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [
        (0, 0, dt.datetime(1970, 1, 1, tzinfo=dt.UTC)),
        (1_700_000_000, 500_000_000, dt.datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=dt.UTC)),
        (validate.MIN_TIMESTAMP_SECONDS, 0, dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
        (validate.MAX_TIMESTAMP_SECONDS, 999_999_999, dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC)),
    ],
)
def test_timestamp_to_datetime_converts_every_valid_timestamp_to_utc(seconds: int, nanos: int, expected: dt.datetime) -> None:
    assert validate.timestamp_to_datetime(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "start_time") == expected


@pytest.mark.parametrize(
    ("seconds", "nanos", "said"),
    [
        (0, -1, "nanos -1"),
        (0, 1_000_000_000, "nanos 1000000000"),
        (2**40, 0, f"seconds {2**40}"),
        (validate.MAX_TIMESTAMP_SECONDS + 1, 0, "seconds"),
        (validate.MIN_TIMESTAMP_SECONDS - 1, 0, "seconds"),
        (-(2**63), 0, "seconds"),
    ],
)
def test_timestamp_to_datetime_refuses_an_invalid_timestamp_by_field(seconds: int, nanos: int, said: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate.timestamp_to_datetime(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "filter.start_time")
    assert refused.value.reason == "INVALID_TIMESTAMP"
    assert refused.value.metadata == {"field": "filter.start_time"}
    assert refused.value.message.startswith("filter.start_time has ") and said in refused.value.message


def test_optional_datetime_reads_a_set_field_and_defaults_an_unset_one() -> None:
    default = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    request = ingest.ListErasureReceiptsRequest()
    assert validate.optional_datetime(request, "completed_after") is None
    assert validate.optional_datetime(request, "completed_after", default) == default
    request.completed_after.CopyFrom(timestamp_pb2.Timestamp(seconds=0))  # set, and the epoch: not the default
    assert validate.optional_datetime(request, "completed_after", default) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    request.completed_after.nanos = -1
    with pytest.raises(InvalidArgument, match="completed_after"):
        validate.optional_datetime(request, "completed_after", default)


def test_int64_and_non_negative_bound_numbers_by_field() -> None:
    assert validate.int64(2**63 - 1, "version number") == 2**63 - 1
    assert validate.int64(-(2**63), "offset") == -(2**63)
    for number in (2**63, -(2**63) - 1, 10**23):
        with pytest.raises(InvalidArgument) as refused:
            validate.int64(number, "version number")
        assert refused.value.metadata == {"field": "version number"}
    assert validate.non_negative(0, "batch.row_count") == 0
    with pytest.raises(InvalidArgument, match="batch.row_count must not be negative"):
        validate.non_negative(-1, "batch.row_count")


# -- request messages that do not parse (runtime/interceptors.py) -----------------------------


def test_the_runtime_deserializer_hands_back_bytes_that_do_not_parse_as_an_invalid_argument() -> None:
    deserialize = _tolerant(ingest.ListDatasetsRequest.FromString, "/falaj.ingest.v1.IngestService/ListDatasets")
    assert deserialize is not None
    assert deserialize(ingest.ListDatasetsRequest(page_size=3).SerializeToString()) == ingest.ListDatasetsRequest(page_size=3)
    for junk in (b"\xff\xff", b"\xfb\x07" * 101 + b"\xfc\x07" * 101):
        unparseable = deserialize(junk)
        assert isinstance(unparseable, _Unparseable)
        assert unparseable.error.reason == "UNPARSEABLE_REQUEST"
        assert "falaj.ingest.v1.ListDatasetsRequest" in unparseable.error.message
    assert _tolerant(None, "/raw") is None  # the gateway's proxy forwards bytes unparsed


class _Context:
    def __init__(self, active: bool):
        self.active = active

    def is_active(self) -> bool:
        return self.active


def _checked(items: list[Any], *, active: bool = True) -> _CheckedRequests:
    return _CheckedRequests(iter(items), _Context(active))  # type: ignore[arg-type]


def test_a_client_stream_raises_at_a_message_that_does_not_parse_and_after_it() -> None:
    error = InvalidArgument("the request is not a falaj.x message", reason="UNPARSEABLE_REQUEST")
    header = common.ArrowBatch(batch_id="b-1")
    requests = _checked([header, _Unparseable(error), common.ArrowBatch(batch_id="b-2")])
    assert next(requests) == header
    with pytest.raises(InvalidArgument):
        next(requests)
    assert requests.failure is error
    with pytest.raises(InvalidArgument):  # a handler that caught it cannot read on past the cut
        next(requests)


def test_a_client_stream_ends_normally_only_while_the_call_is_active() -> None:
    assert list(_checked([1, 2])) == [1, 2]
    cut = _checked([1], active=False)
    with pytest.raises(Aborted) as aborted:
        list(cut)
    assert aborted.value.reason == "STREAM_CUT"
    assert cut.failure is aborted.value


class _ParsingHandler(grpc.GenericRpcHandler):
    """Methods with a real request deserializer, as generated servicers have."""

    def __init__(self) -> None:
        self.committed: list[list[str]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        parse = ingest.ListDatasetsRequest.FromString
        table: dict[str, grpc.RpcMethodHandler] = {
            "Get": grpc.unary_unary_rpc_method_handler(self._get, parse, bytes),
            "Commit": grpc.stream_unary_rpc_method_handler(self._commit, parse, bytes),
        }
        return table.get(details.method.removeprefix(PROBE)) if details.method.startswith(PROBE) else None

    def _get(self, request: ingest.ListDatasetsRequest, context: grpc.ServicerContext) -> bytes:
        return request.page_token.encode()

    def _commit(self, requests: Iterator[ingest.ListDatasetsRequest], context: grpc.ServicerContext) -> bytes:
        tokens = [r.page_token for r in requests]
        self.committed.append(tokens)
        return ",".join(tokens).encode()


PROBE = "/falaj.test.v1.ParseProbe/"


@pytest.fixture
def parsing(settings_for: Callable[..., Any], pki: PKI) -> Iterator[tuple[_ParsingHandler, RunningServer, grpc.Channel]]:
    handler = _ParsingHandler()
    running = create_server(settings_for("ingest"), lambda server: [], listen_addr="127.0.0.1:0", handlers=[handler])
    creds = tls.channel_credentials(identity(pki, "client", "admin"))
    channel = grpc.secure_channel(f"127.0.0.1:{running.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
    yield handler, running, channel
    channel.close()
    running.stop(0)


def _token(text: str) -> bytes:
    return ingest.ListDatasetsRequest(page_token=text).SerializeToString()


def test_a_unary_request_that_does_not_parse_is_invalid_argument(parsing: tuple[_ParsingHandler, RunningServer, grpc.Channel]) -> None:
    _, _, channel = parsing
    assert channel.unary_unary(PROBE + "Get")(_token("ok"), timeout=10) == b"ok"
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(PROBE + "Get")(b"\xff\xff", timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "the request is not a falaj.ingest.v1.ListDatasetsRequest message"


def test_a_client_stream_cut_by_a_message_that_does_not_parse_commits_nothing(
    parsing: tuple[_ParsingHandler, RunningServer, grpc.Channel],
) -> None:
    handler, _, channel = parsing
    with pytest.raises(grpc.RpcError) as raised:
        channel.stream_unary(PROBE + "Commit")(iter([_token("a"), b"\xff\xff", _token("b")]), timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert handler.committed == []
    assert channel.stream_unary(PROBE + "Commit")(iter([_token("a"), _token("b")]), timeout=10) == b"a,b"
    assert handler.committed == [["a", "b"]]


class _NeverDone:
    """A grpc server whose shutdown never completes (an RPC state left behind, as grpc did after unparseable streams)."""

    def __init__(self, server: grpc.Server):
        self.server = server

    def stop(self, grace: float | None) -> threading.Event:
        self.server.stop(grace)
        return threading.Event()


def test_stop_returns_when_grpc_never_finishes_shutting_down(
    parsing: tuple[_ParsingHandler, RunningServer, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, running, _ = parsing
    stopped: list[str] = []
    running.stop_callbacks.append(lambda: stopped.append("background work"))
    monkeypatch.setattr(server_module, "STOP_SLACK_S", 0.5)
    monkeypatch.setattr(running, "server", _NeverDone(running.server))
    started = time.monotonic()
    running.stop(0)
    assert time.monotonic() - started < 5
    assert stopped == ["background work"]
