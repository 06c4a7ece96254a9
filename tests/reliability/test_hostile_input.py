"""Hostile input through the real gateway: every RPC of every contract answers with a status.

Each method of the six services, the Open Inference Protocol and the gateway's admin API
gets structure-aware messages drawn from its request descriptor (tests/reliability/
messages.py) and plain random bytes, as the `root` identity so that calls get past
authorization into the service code. Every call must end with a status that is not
UNKNOWN, whose details carry no traceback, source path or server path; INTERNAL is
accepted only where a bug is known (KNOWN_INTERNAL, each with a strict xfail repro below);
bytes that are not the request message are INVALID_ARGUMENT (the runtime's deserializer).
The owning service and the gateway still answer SERVING afterwards.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from falaj.common.v1 import common_pb2 as common
from falaj.features.v1 import request_response_pb2 as features
from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gs
from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest
from falaj.monitoring.v1 import request_response_pb2 as monitoring
from falaj.serving.v1 import request_response_pb2 as serving
from falaj.training.v1 import request_response_pb2 as training
from falaj_platform.gateway.routing import owner_of
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import health_status
from tests.conftest import identity
from tests.gateway.conftest import Platform
from tests.reliability.conftest import service_health, start_falaj, stop_falaj
from tests.reliability.messages import Rpc, edge_cases, message_strategy, platform_rpcs

SOURCE_ROOT = Path(__file__).resolve().parents[2] / "src"
GENERIC_INTERNAL = "internal error; see the service log for the request id"
UNPARSEABLE = "Exception deserializing request!"  # grpc-python's status when the request deserializer raises
CALL_TIMEOUT_S = 60
SERVICE_LIMIT = 2 * 1024 * 1024  # FALAJ_MAX_MESSAGE_BYTES of the services here
GATEWAY_LIMIT = 4 * 1024 * 1024  # ... and of the gateway

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# The admin API last: its fuzzed writes (policy imports, revocations) may narrow what root can do.
RPCS = sorted(platform_rpcs(), key=lambda rpc: rpc.service.startswith("falaj.gateway."))

# -- bugs the fuzzer found: input a service should refuse with INVALID_ARGUMENT ended in INTERNAL ----
BAD_NANOS = timestamp_pb2.Timestamp(seconds=0, nanos=-1)
FAR_SECONDS = timestamp_pb2.Timestamp(seconds=2**40)
UNKNOWN_ENUM = 99
BUGS: dict[str, tuple[str, str, Message, str]] = {
    # id: (method, kind, request, the bug in one line): all fixed (runtime/validate.py), kept as regression repros
    "ingest-consents-timestamp": (
        "/falaj.ingest.v1.IngestService/ListConsents",
        "unary",
        ingest.ListConsentsRequest(changed_after=BAD_NANOS),
        "ingest consent.py _time(): Timestamp.ToDatetime() ValueError on nanos=-1 becomes INTERNAL",
    ),
    "ingest-consents-enum": (
        "/falaj.ingest.v1.IngestService/ListConsents",
        "unary",
        ingest.ListConsentsRequest(purpose=UNKNOWN_ENUM),
        "ingest store.py enum_name(): unknown ConsentPurpose number raises ValueError, INTERNAL",
    ),
    "ingest-check-consent-timestamp": (
        "/falaj.ingest.v1.IngestService/CheckConsent",
        "unary",
        ingest.CheckConsentRequest(subject_ids=["s-1"], purpose=1, as_of_time=BAD_NANOS),
        "ingest consent.py _time(): invalid as_of_time becomes INTERNAL",
    ),
    "ingest-record-consent-timestamp": (
        "/falaj.ingest.v1.IngestService/RecordConsent",
        "unary",
        ingest.RecordConsentRequest(subject_id="s-1", purpose=2, grant_time=BAD_NANOS, evidence="form"),
        "ingest consent.py _time(): invalid grant_time becomes INTERNAL",
    ),
    "ingest-withdraw-consent-timestamp": (
        "/falaj.ingest.v1.IngestService/WithdrawConsent",
        "unary",
        ingest.WithdrawConsentRequest(subject_id="s-1", purpose=2, withdraw_time=BAD_NANOS, evidence="letter"),
        "ingest consent.py _time(): invalid withdraw_time becomes INTERNAL",
    ),
    "ingest-erasure-receipts-enum": (
        "/falaj.ingest.v1.IngestService/ListErasureReceipts",
        "unary",
        ingest.ListErasureReceiptsRequest(state=UNKNOWN_ENUM),
        "ingest store.py enum_name(): unknown ErasureState filter becomes INTERNAL",
    ),
    "ingest-erasure-receipts-timestamp": (
        "/falaj.ingest.v1.IngestService/ListErasureReceipts",
        "unary",
        ingest.ListErasureReceiptsRequest(completed_after=BAD_NANOS),
        "ingest: invalid completed_after Timestamp becomes INTERNAL",
    ),
    "features-materializations-enum": (
        "/falaj.features.v1.FeaturesService/ListMaterializations",
        "unary",
        features.ListMaterializationsRequest(trigger=UNKNOWN_ENUM),
        "features materialization.py list_runs(): unknown trigger/state filter number becomes INTERNAL",
    ),
    "features-materialize-window": (
        "/falaj.features.v1.FeaturesService/Materialize",
        "unary",
        features.MaterializeRequest(mode=1, window_start=BAD_NANOS, window_end=FAR_SECONDS),
        "features materialization.py:175: window_start/window_end ToDatetime() ValueError becomes INTERNAL",
    ),
    "training-jobs-enum": (
        "/falaj.training.v1.TrainingService/ListTrainingJobs",
        "unary",
        training.ListTrainingJobsRequest(state=UNKNOWN_ENUM),
        "training convert.py enum_suffix(): unknown TrainingJobState filter becomes INTERNAL",
    ),
    "training-version-number-overflow": (
        "/falaj.training.v1.TrainingService/GetModelVersion",
        "unary",
        training.GetModelVersionRequest(name="models/churn/versions/99999999999999999999999"),
        "training store.py get_version(): a version number past int64 overflows SQLite, INTERNAL",
    ),
    "serving-served-models-enum": (
        "/falaj.serving.v1.ServingService/ListServedModels",
        "unary",
        serving.ListServedModelsRequest(state=UNKNOWN_ENUM),
        "serving convert.py enum_name(): unknown ServedModelState filter becomes INTERNAL",
    ),
    "serving-deployments-enum": (
        "/falaj.serving.v1.ServingService/ListDeployments",
        "unary",
        serving.ListDeploymentsRequest(state=UNKNOWN_ENUM),
        "serving: unknown DeploymentState filter of ListDeployments becomes INTERNAL",
    ),
    "monitoring-alerts-enum": (
        "/falaj.monitoring.v1.MonitoringService/ListAlerts",
        "unary",
        monitoring.ListAlertsRequest(state=UNKNOWN_ENUM),
        "monitoring catalog.py list_alerts(): unknown AlertState filter becomes INTERNAL",
    ),
    "monitoring-alerts-timestamp": (
        "/falaj.monitoring.v1.MonitoringService/ListAlerts",
        "unary",
        monitoring.ListAlertsRequest(start_time=FAR_SECONDS),
        "monitoring catalog.py list_alerts(): start_time past year 9999 becomes INTERNAL",
    ),
    "monitoring-negative-row-count": (
        "/falaj.monitoring.v1.MonitoringService/IngestPredictionLogs",
        "client_stream",
        monitoring.IngestPredictionLogsRequest(batch=common.ArrowBatch(arrow_ipc=b"junk", batch_id="b-1", row_count=-1)),
        "monitoring ingestion.py _ingest_log_batch(): negative row_count of a malformed batch reaches Counter.inc(), INTERNAL",
    ),
    "gateway-audit-filter-enum": (
        "/falaj.gateway.v1.GatewayAdminService/QueryAuditRecords",
        "unary",
        gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(event_type=UNKNOWN_ENUM)),
        "gateway api.py _filter(): unknown SecurityEventType number becomes INTERNAL",
    ),
    "gateway-audit-filter-timestamp": (
        "/falaj.gateway.v1.GatewayAdminService/QueryAuditRecords",
        "unary",
        gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(start_time=BAD_NANOS)),
        "gateway api.py _filter(): invalid start_time Timestamp becomes INTERNAL",
    ),
}
# Methods where an INTERNAL for bad input is a known bug (each with a strict xfail repro): none now.
KNOWN_INTERNAL: set[str] = set()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A platform with small message limits: the gateway's above the services' (both checked below)."""
    root = tmp_path_factory.mktemp("hostile")
    pki = PKI(root / "pki")
    pki.init()
    started = start_falaj(
        root / "home",
        pki,
        service_env={"FALAJ_MAX_MESSAGE_BYTES": str(SERVICE_LIMIT)},
        gateway_env={"FALAJ_MAX_MESSAGE_BYTES": str(GATEWAY_LIMIT)},
    )
    yield started
    stuck = stop_falaj(started, timeout=10)
    assert not stuck, f"servers that did not stop within 10 s after the fuzzing: {stuck}"


def invoke(channel: grpc.Channel, rpc: Rpc, payloads: Sequence[bytes], **kwargs: object) -> tuple[grpc.StatusCode, str]:
    """Send one call of `rpc`'s kind with raw payloads; (status code, details). Reads at most 50 responses."""
    try:
        if rpc.client_streaming and rpc.server_streaming:
            call = channel.stream_stream(rpc.path)(iter(payloads), timeout=CALL_TIMEOUT_S, **kwargs)
            _drain(call)
        elif rpc.client_streaming:
            channel.stream_unary(rpc.path)(iter(payloads), timeout=CALL_TIMEOUT_S, **kwargs)
        elif rpc.server_streaming:
            _drain(channel.unary_stream(rpc.path)(payloads[0], timeout=CALL_TIMEOUT_S, **kwargs))
        else:
            channel.unary_unary(rpc.path)(payloads[0], timeout=CALL_TIMEOUT_S, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _drain(call: Iterator[bytes]) -> None:
    for count, _ in enumerate(call):
        if count >= 50:
            call.cancel()  # type: ignore[attr-defined]
            return


def assert_acceptable(rpc: Rpc, outcome: tuple[grpc.StatusCode, str], *, structured: bool, platform: Platform) -> None:
    code, details = outcome
    where = f"{rpc.path} -> {code.name}: {details[:300]!r}"
    assert code is not grpc.StatusCode.UNKNOWN, where
    assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"hung for {CALL_TIMEOUT_S}s: {where}"
    for leak in ("Traceback", 'File "', "site-packages", str(SOURCE_ROOT), str(platform.home), str(platform.pki.root)):
        assert leak not in details, f"details leak {leak!r}: {where}"
    if code is grpc.StatusCode.INTERNAL:
        assert rpc.path in KNOWN_INTERNAL and details == GENERIC_INTERNAL, f"INTERNAL for bad input: {where}"


def assert_still_serving(platform: Platform, rpc: Rpc) -> None:
    owner = owner_of(rpc.path)
    if owner is not None:
        running, _ = platform.services[owner]
        assert health_status(f"127.0.0.1:{running.port}", identity(platform.pki, "service", "gateway"), timeout=5) == "SERVING", owner
    assert health_status(platform.gateway_addr, identity(platform.pki, "client", "root"), timeout=5) == "SERVING", "gateway"


def fuzz(platform: Platform, rpc: Rpc, *, structured: int, random: int, salt: int) -> None:
    channel = platform.channel("root")
    messages = message_strategy(rpc.request)
    stream = st.lists(messages, min_size=1, max_size=3) if rpc.client_streaming else st.tuples(messages).map(list)
    common_settings = settings(
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )

    @seed(zlib.crc32(rpc.path.encode()) + salt)
    @settings(common_settings, max_examples=structured)
    @given(stream)
    def structured_messages(sent: list[Message]) -> None:
        outcome = invoke(channel, rpc, [m.SerializeToString() for m in sent])
        assert_acceptable(rpc, outcome, structured=True, platform=platform)

    @seed(zlib.crc32(rpc.path.encode()) + salt + 1)
    @settings(common_settings, max_examples=random)
    @given(st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=2 if rpc.client_streaming else 1))
    def random_bytes(sent: list[bytes]) -> None:
        assert_acceptable(rpc, invoke(channel, rpc, sent), structured=False, platform=platform)

    policy = [stored.line for stored in platform.gateway.store.lines()]
    try:
        structured_messages()
        random_bytes()
        assert_still_serving(platform, rpc)
    finally:
        if rpc.service.startswith("falaj.gateway."):  # undo fuzzed policy imports (see test_security's lockout xfail)
            platform.gateway.store.apply_lines(policy, replace=True, actor="tests", dry_run=False)
            platform.gateway.reloader.reload_now()


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.path.rsplit(".", 1)[-1])
def test_every_rpc_answers_hostile_messages_with_a_status(platform: Platform, rpc: Rpc) -> None:
    fuzz(platform, rpc, structured=4, random=2, salt=0)


@pytest.mark.slow
@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.path.rsplit(".", 1)[-1])
def test_every_rpc_answers_many_hostile_messages_with_a_status(platform: Platform, rpc: Rpc) -> None:
    fuzz(platform, rpc, structured=40, random=10, salt=1_000_003)


SERVICES = sorted({rpc.service for rpc in RPCS}, key=lambda name: name.startswith("falaj.gateway."))


@pytest.mark.parametrize("service", SERVICES, ids=lambda name: name.rsplit(".", 1)[-1])
def test_every_number_enum_and_time_field_at_its_edge_answers_without_internal(platform: Platform, service: str) -> None:
    """Deterministic sweep: one field at a time set to min/max/-1, NaN/inf, an unknown enum number,
    or an out-of-range Timestamp/Duration (the fuzzer's best finds, made exhaustive)."""
    channel = platform.channel("root")
    failures = []
    for rpc in (r for r in RPCS if r.service == service):
        policy = [stored.line for stored in platform.gateway.store.lines()]
        for label, message in edge_cases(rpc.request):
            try:
                assert_acceptable(rpc, invoke(channel, rpc, [message.SerializeToString()]), structured=True, platform=platform)
            except AssertionError as error:
                failures.append(f"{label}: {str(error).splitlines()[0]}")
        if rpc.service.startswith("falaj.gateway."):
            platform.gateway.store.apply_lines(policy, replace=True, actor="tests", dry_run=False)
            platform.gateway.reloader.reload_now()
        assert_still_serving(platform, rpc)
    assert not failures, failures


def test_the_platform_is_whole_after_the_fuzzing(platform: Platform) -> None:
    """Runs after the fuzz tests above (file order): every process serves and the audit chain verifies."""
    assert set(service_health(platform).values()) == {"SERVING"}, service_health(platform)
    platform.gateway.audit.checkpoint_now()
    result = gs.GatewayAdminServiceStub(platform.channel("root")).VerifyAuditChain(gr.VerifyAuditChainRequest(), timeout=60)
    assert result.intact, result.first_break.detail


# -- oversize, compressed and deeply nested messages ---------------------------------------------

LIST_DATASETS = Rpc("/falaj.ingest.v1.IngestService/ListDatasets", ingest.ListDatasetsRequest.DESCRIPTOR, False, False)
INGEST_BATCHES = Rpc("/falaj.ingest.v1.IngestService/IngestBatches", ingest.IngestBatchesRequest.DESCRIPTOR, True, False)


def _with_token(size: int) -> bytes:
    return ingest.ListDatasetsRequest(page_token="x" * size).SerializeToString()


def test_a_message_over_the_gateway_limit_is_refused_there(platform: Platform) -> None:
    code, details = invoke(platform.channel("root"), LIST_DATASETS, [_with_token(GATEWAY_LIMIT + 1024)])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
    # A dataset that exists, so that the service waits for the batches instead of answering NOT_FOUND first.
    schema = ingest_messages.Schema(columns=[ingest_messages.Column(name="id", type=ingest_messages.COLUMN_TYPE_INT)])
    dataset = ingest_messages.Dataset(schema=schema, residency=common.Residency(region="ae-dxb"))
    create = ingest.CreateDatasetRequest(dataset_id="oversize", dataset=dataset, request_id="oversize-dataset")
    platform.channel("root").unary_unary("/falaj.ingest.v1.IngestService/CreateDataset")(create.SerializeToString(), timeout=30)
    header = ingest.IngestBatchesRequest(header=ingest.IngestStreamHeader(dataset="datasets/oversize")).SerializeToString()
    code, details = invoke(platform.channel("root"), INGEST_BATCHES, [header, _with_token(GATEWAY_LIMIT + 1024)])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert_still_serving(platform, LIST_DATASETS)


def test_a_message_over_the_service_limit_is_refused_by_the_service(platform: Platform) -> None:
    """Between the two limits the gateway forwards the message and the service refuses it."""
    code, details = invoke(platform.channel("root"), LIST_DATASETS, [_with_token(SERVICE_LIMIT + 1024)])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert_still_serving(platform, LIST_DATASETS)


def test_a_compression_bomb_is_refused_by_its_inflated_size(platform: Platform) -> None:
    bomb = ingest.ListDatasetsRequest(page_token="\0" * (16 * GATEWAY_LIMIT)).SerializeToString()  # ~64 KiB gzipped
    code, details = invoke(platform.channel("root"), LIST_DATASETS, [bomb], compression=grpc.Compression.Gzip)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert_still_serving(platform, LIST_DATASETS)


def test_oversize_metadata_is_refused(platform: Platform) -> None:
    code, details = invoke(platform.channel("root"), LIST_DATASETS, [b""], metadata=[("x-padding", "a" * 100_000)])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert_still_serving(platform, LIST_DATASETS)


def _nested_groups(depth: int) -> bytes:
    """Unknown field 127 as `depth` nested groups: parsers recurse on groups (protobuf's recursion limit is 100)."""
    return b"\xfb\x07" * depth + b"\xfc\x07" * depth


def test_a_message_nested_past_the_recursion_limit_is_refused_and_a_shallower_one_parses(platform: Platform) -> None:
    channel = platform.channel("root")
    assert invoke(channel, LIST_DATASETS, [_nested_groups(50)]) == (grpc.StatusCode.OK, "")
    for depth in (101, 100_000):
        code, details = invoke(channel, LIST_DATASETS, [_nested_groups(depth)])
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), details
        assert details in (UNPARSEABLE,) or code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert_still_serving(platform, LIST_DATASETS)


def test_bytes_that_are_not_the_request_message_are_invalid_argument(platform: Platform) -> None:
    code, details = invoke(platform.channel("root"), LIST_DATASETS, [_nested_groups(101)])
    assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"


# -- the bugs, one repro each --------------------------------------------------------------------


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_bad_field_values_are_invalid_argument_not_internal(platform: Platform, bug: str) -> None:
    method, kind, request, _ = BUGS[bug]
    rpc = Rpc(method, request.DESCRIPTOR, kind == "client_stream", False)
    payloads = [request.SerializeToString()]
    if kind == "client_stream":  # a header first, then the bad batch
        payloads.insert(
            0,
            monitoring.IngestPredictionLogsRequest(
                header=monitoring.PredictionLogHeader(request_id=bug, model_version="models/churn/versions/1")
            ).SerializeToString(),
        )
    code, details = invoke(platform.channel("root"), rpc, payloads)
    assert code is not grpc.StatusCode.INTERNAL, f"{bug}: INTERNAL {details!r}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:  # a clear message: it names the field
        assert any(field.name in details for field, _ in request.ListFields()), f"{bug}: {details!r} names no field of the request"
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), f"{bug}: {code.name} {details!r}"


# -- client streams cut by a message that does not parse -----------------------------------------

PREDICTION_LOGS = Rpc(
    "/falaj.monitoring.v1.MonitoringService/IngestPredictionLogs", monitoring.IngestPredictionLogsRequest.DESCRIPTOR, True, False
)


def _log_messages(request_id: str, *row_counts: int) -> list[bytes]:
    header = monitoring.PredictionLogHeader(request_id=request_id, model_version="models/churn/versions/1")
    messages = [monitoring.IngestPredictionLogsRequest(header=header)]
    messages += [
        monitoring.IngestPredictionLogsRequest(batch=common.ArrowBatch(arrow_ipc=b"not arrow", batch_id=f"b-{i}", row_count=rows))
        for i, rows in enumerate(row_counts)
    ]
    return [m.SerializeToString() for m in messages]


def test_a_stream_cut_by_an_unparseable_message_commits_nothing(platform: Platform) -> None:
    header, first, second = _log_messages("cut-stream-1", 5, 7)
    code, details = invoke(platform.channel("root"), PREDICTION_LOGS, [header, first, b"\xff\xff", second])
    assert code is not grpc.StatusCode.OK, details
    retried = platform.channel("root").stream_unary(PREDICTION_LOGS.path)(iter([header, first, second]), timeout=CALL_TIMEOUT_S)
    stats = monitoring.IngestPredictionLogsResponse.FromString(retried).stats
    assert stats.rejected_rows == 5 + 7, f"the retry counted {stats.rejected_rows} rows: the cut stream's part was committed"


def test_monitoring_stops_after_unparseable_streams(tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    pki.init()
    fresh = start_falaj(tmp_path / "home", pki)
    channel = fresh.channel("root")
    for _ in range(100):
        assert invoke(channel, PREDICTION_LOGS, [b"\xff"])[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert stop_falaj(fresh, timeout=15) == []
