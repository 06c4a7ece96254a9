"""A NATS JetStream source against the real server: at-least-once, deduplicated by key + event time."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import nats
import pytest
from google.protobuf import duration_pb2

from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.services.ingest import nats_source
from falaj_platform.services.ingest.config import IngestConfig
from tests.conftest import missing_service
from tests.ingest.conftest import ALICE, IngestUnderTest, create_dataset, quarantined, read_version, status_of, versions_of

NATS_URL = os.environ.get("FALAJ_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


class Stream:
    """A uniquely named JetStream stream on the real server, deleted afterwards."""

    def __init__(self) -> None:
        self.name = f"FALAJ_TEST_{uuid.uuid4().hex[:10].upper()}"
        self.subject = f"falaj.test.{self.name.lower()}.payments"

    async def _create(self) -> None:
        client = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
        try:
            await client.jetstream().add_stream(name=self.name, subjects=[self.subject])
        finally:
            await client.close()

    async def _delete(self) -> None:
        client = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
        try:
            await client.jetstream().delete_stream(self.name)
        finally:
            await client.close()

    def publish(self, *payloads: bytes) -> None:
        async def send() -> None:
            client = await nats.connect(NATS_URL, connect_timeout=2)
            try:
                js = client.jetstream()
                for payload in payloads:
                    await js.publish(self.subject, payload)
            finally:
                await client.close()

        _run(send())

    def consumers(self) -> list[str]:
        async def names() -> list[str]:
            client = await nats.connect(NATS_URL, connect_timeout=2)
            try:
                return [c.name for c in await client.jetstream().consumers_info(self.name)]
            finally:
                await client.close()

        result: list[str] = _run(names())
        return result


@pytest.fixture
def jetstream() -> Iterator[Stream]:
    stream = Stream()
    try:
        _run(stream._create())
    except Exception as error:  # noqa: BLE001 - any connection failure means the server is not there
        missing_service(f"NATS JetStream at {NATS_URL} is not reachable: {error!r}")
    yield stream
    _run(stream._delete())


def event(payment_id: int, minute: int = 0, customer: str = "c-1", amount: float = 20.0) -> bytes:
    return json.dumps(
        {
            "payment_id": payment_id,
            "customer_id": customer,
            "amount": amount,
            "channel": "pos",
            "email": None,
            "paid_at": f"2025-03-01T10:{minute:02d}:00Z",
        }
    ).encode()


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def nats_spec(stream: Stream, **options: Any) -> m.NatsSubscriptionSpec:
    return m.NatsSubscriptionSpec(
        server_url=NATS_URL,
        stream=stream.name,
        subject=stream.subject,
        dedup_key_columns=["payment_id"],
        commit_max_rows=4,
        commit_max_interval=duration_pb2.Duration(nanos=200_000_000),
        **options,
    )


def source_status(ingest: IngestUnderTest, name: str) -> m.Source:
    return ingest.stub.GetSource(rr.GetSourceRequest(name=name), metadata=ALICE).source


def test_messages_are_committed_as_versions_and_redelivered_or_republished_rows_skipped(
    start_ingest: Callable[..., IngestUnderTest], jetstream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = start_ingest(config=IngestConfig(worker_poll_seconds=0.1))
    dataset = create_dataset(ingest, "payments").name
    # The first commit "crashes" before acknowledging: NATS redelivers those messages after ack_wait.
    real_commit = nats_source.NatsConsumer._commit
    dropped_acks: list[int] = []

    async def commit_without_first_ack(self: nats_source.NatsConsumer, pending: list[Any]) -> None:
        if not dropped_acks:
            dropped_acks.append(len(pending))
            await asyncio.to_thread(self.commit, [nats_source.ReceivedMessage(msg.metadata.sequence.stream, msg.data) for msg in pending])
            return
        await real_commit(self, pending)

    monkeypatch.setattr(nats_source.NatsConsumer, "_commit", commit_without_first_ack)
    jetstream.publish(event(1, 1), event(2, 2), event(3, 3), event(4, 4))
    spec = nats_spec(jetstream, ack_wait=duration_pb2.Duration(seconds=1))
    source = ingest.stub.CreateSource(
        rr.CreateSourceRequest(parent=dataset, source_id="pos-events", source=m.Source(nats=spec)), metadata=ALICE
    ).source
    assert source.state == m.SOURCE_STATE_ACTIVE

    wait_for(lambda: versions_of(ingest, dataset))
    # A publisher retry (same key and event time) and a bad message, next to new rows.
    jetstream.publish(event(2, 2), b"{not json", event(5, 5), event(6, 6, amount=-1.0))
    status = wait_for(lambda: (s := source_status(ingest, source.name).status).messages_received >= 12 and s)
    assert status.messages_deduplicated == 5  # the four redelivered, the one re-published
    assert status.last_acked_sequence == 8 and status.last_error == ""
    latest = versions_of(ingest, dataset)[0]
    table = read_version(ingest, latest.name)
    assert sorted(table.column("payment_id").to_pylist()) == [1, 2, 3, 4, 5]
    assert latest.source_kind == m.SOURCE_KIND_NATS and latest.lineage.source == source.name
    bad = {r.batch_id: [m.ValidationRule.Name(v.rule) for v in r.violations] for r in quarantined(ingest, dataset)}
    assert bad == {f"{jetstream.name}:6": ["VALIDATION_RULE_PARSE"], f"{jetstream.name}:8": ["VALIDATION_RULE_RANGE"]}

    # Pause commits what it holds and stops; resume continues from the last acknowledgement.
    paused = ingest.stub.PauseSource(rr.PauseSourceRequest(name=source.name), metadata=ALICE).source
    assert paused.state == m.SOURCE_STATE_PAUSED
    jetstream.publish(event(7, 7))
    time.sleep(0.5)
    assert len(read_version(ingest, f"{dataset}/versions/latest")) == 5
    ingest.stub.ResumeSource(rr.ResumeSourceRequest(name=source.name), metadata=ALICE)
    wait_for(lambda: 7 in read_version(ingest, f"{dataset}/versions/latest").column("payment_id").to_pylist())

    # Deleting the source stops it and removes its durable consumer from the server.
    assert jetstream.consumers() == [nats_source.durable_name(spec, "payments", "pos-events")]
    ingest.stub.DeleteSource(rr.DeleteSourceRequest(name=source.name), metadata=ALICE)
    assert jetstream.consumers() == []


def test_a_restarted_service_resumes_its_subscription_without_duplicates(
    start_ingest: Callable[..., IngestUnderTest], jetstream: Stream
) -> None:
    config = IngestConfig(worker_poll_seconds=0.1)
    first = start_ingest(config=config)
    dataset = create_dataset(first, "payments").name
    source = first.stub.CreateSource(
        rr.CreateSourceRequest(parent=dataset, source_id="feed", source=m.Source(nats=nats_spec(jetstream))), metadata=ALICE
    ).source
    jetstream.publish(*(event(i, i) for i in range(1, 5)))
    wait_for(lambda: source_status(first, source.name).status.last_acked_sequence == 4)
    first.stop()

    jetstream.publish(event(4, 4), event(5, 5))  # one already committed, one new, while the service is down
    second = start_ingest(config=config)  # same data dir and catalog: the worker starts on boot
    # A loaded machine can time out the first reconnect; the source retries with backoff.
    wait_for(lambda: source_status(second, source.name).status.last_acked_sequence == 6, timeout=60)
    assert sorted(read_version(second, f"{dataset}/versions/latest").column("payment_id").to_pylist()) == [1, 2, 3, 4, 5]
    assert source_status(second, source.name).status.messages_deduplicated == 1


def test_nats_source_definitions_are_checked(ingest: IngestUnderTest, jetstream: Stream) -> None:
    dataset = create_dataset(ingest, "payments").name
    missing_stream = m.NatsSubscriptionSpec(server_url=NATS_URL, stream=f"{jetstream.name}_NOPE", subject=jetstream.subject)
    with pytest.raises(grpc.RpcError) as no_stream:
        ingest.stub.CreateSource(
            rr.CreateSourceRequest(parent=dataset, source_id="x", source=m.Source(nats=missing_stream), validate_only=True), metadata=ALICE
        )
    assert status_of(no_stream.value) == (grpc.StatusCode.FAILED_PRECONDITION, "NATS_STREAM_NOT_FOUND")
    unreachable = m.NatsSubscriptionSpec(server_url="nats://127.0.0.1:1", stream=jetstream.name, subject=jetstream.subject)
    with pytest.raises(grpc.RpcError) as down:
        ingest.stub.CreateSource(
            rr.CreateSourceRequest(parent=dataset, source_id="x", source=m.Source(nats=unreachable), validate_only=True), metadata=ALICE
        )
    assert status_of(down.value) == (grpc.StatusCode.UNAVAILABLE, "NATS_UNREACHABLE")
    with pytest.raises(grpc.RpcError) as no_subject:
        ingest.stub.CreateSource(
            rr.CreateSourceRequest(parent=dataset, source_id="x", source=m.Source(nats=m.NatsSubscriptionSpec(stream="S"))), metadata=ALICE
        )
    assert status_of(no_subject.value) == (grpc.StatusCode.INVALID_ARGUMENT, "NATS_SUBJECT_REQUIRED")
    source = ingest.stub.CreateSource(
        rr.CreateSourceRequest(parent=dataset, source_id="feed", source=m.Source(nats=nats_spec(jetstream))), metadata=ALICE
    ).source
    with pytest.raises(grpc.RpcError) as run:
        ingest.stub.RunSource(rr.RunSourceRequest(name=source.name), metadata=ALICE)
    assert status_of(run.value) == (grpc.StatusCode.FAILED_PRECONDITION, "SOURCE_RUNS_CONTINUOUSLY")
    ingest.stub.DeleteSource(rr.DeleteSourceRequest(name=source.name), metadata=ALICE)
