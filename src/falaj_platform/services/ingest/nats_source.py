"""NATS JetStream sources: a durable pull consumer per source, at-least-once, deduplicated.

Messages are fetched in batches and held until `commit_max_rows` are pending or
`commit_max_interval` passed; then they are committed as one dataset version and only
after that commit acknowledged. A crash before the acknowledgement makes NATS
redeliver, and redelivered (or re-published) rows are recognised by a digest of their
dedup key and event time, stored in the same transaction as the version they went
into, and skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pyarrow as pa
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.ingest.commits import Batch, IngestInput, ParseFailure
from falaj_platform.services.ingest.validation import InputShape, table_from_records

log = get_logger()

_DELIVER_POLICIES = {
    m.NATS_DELIVER_POLICY_UNSPECIFIED: DeliverPolicy.ALL,
    m.NATS_DELIVER_POLICY_ALL: DeliverPolicy.ALL,
    m.NATS_DELIVER_POLICY_NEW: DeliverPolicy.NEW,
    m.NATS_DELIVER_POLICY_BY_START_TIME: DeliverPolicy.BY_START_TIME,
    m.NATS_DELIVER_POLICY_BY_START_SEQUENCE: DeliverPolicy.BY_START_SEQUENCE,
}


@dataclass(frozen=True)
class ReceivedMessage:
    """What the commit path needs of one JetStream message."""

    sequence: int
    data: bytes


@dataclass
class DecodedMessages:
    """Messages turned into rows (and parse failures), each with its dedup digest."""

    records: list[dict[str, Any]] = field(default_factory=list)
    record_batch_ids: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    failures: list[ParseFailure] = field(default_factory=list)
    failure_digests: list[str] = field(default_factory=list)

    def without(self, seen: set[str]) -> tuple[DecodedMessages, int]:
        """These messages less rows whose digest is in `seen` or repeats an earlier one here."""
        kept = DecodedMessages()
        skipped = 0
        local: set[str] = set()
        for record, batch_id, digest in zip(self.records, self.record_batch_ids, self.digests, strict=True):
            if digest in seen or digest in local:
                skipped += 1
                continue
            local.add(digest)
            kept.records.append(record)
            kept.record_batch_ids.append(batch_id)
            kept.digests.append(digest)
        for failure, digest in zip(self.failures, self.failure_digests, strict=True):
            if digest in seen or digest in local:
                skipped += 1
                continue
            local.add(digest)
            kept.failures.append(failure)
            kept.failure_digests.append(digest)
        return kept, skipped

    @property
    def all_digests(self) -> list[str]:
        return [*self.digests, *self.failure_digests]

    def to_input(self, schema: m.Schema, messages_received: int) -> IngestInput:
        table = (
            table_from_records(self.records, schema)
            if self.records
            else pa.table({c.name: pa.array([], pa.string()) for c in schema.columns})
        )
        batch = Batch("nats", table, row_batch_ids=self.record_batch_ids)
        return IngestInput(batches=[batch], shape=InputShape(text=True), parse_failures=self.failures, batches_received=messages_received)


def durable_name(spec: m.NatsSubscriptionSpec, dataset_id: str, source_id: str) -> str:
    if spec.durable_name:
        return spec.durable_name
    return f"falaj-ingest-{dataset_id}-{source_id}".replace(".", "-")


def check_spec(spec: m.NatsSubscriptionSpec) -> None:
    if not spec.stream:
        raise InvalidArgument("nats.stream is required", reason="NATS_STREAM_REQUIRED")
    if not spec.subject:
        raise InvalidArgument("nats.subject is required", reason="NATS_SUBJECT_REQUIRED")
    if spec.deliver_policy == m.NATS_DELIVER_POLICY_BY_START_TIME and not spec.HasField("start_time"):
        raise InvalidArgument("nats.start_time is required with NATS_DELIVER_POLICY_BY_START_TIME", reason="NATS_START_TIME_REQUIRED")
    if spec.deliver_policy == m.NATS_DELIVER_POLICY_BY_START_SEQUENCE and not spec.start_sequence:
        raise InvalidArgument(
            "nats.start_sequence is required with NATS_DELIVER_POLICY_BY_START_SEQUENCE", reason="NATS_START_SEQUENCE_REQUIRED"
        )
    if spec.commit_max_rows < 0:
        raise InvalidArgument("nats.commit_max_rows must not be negative", reason="INVALID_COMMIT_MAX_ROWS")


def consumer_config(spec: m.NatsSubscriptionSpec, durable: str) -> ConsumerConfig:
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=_DELIVER_POLICIES[spec.deliver_policy],
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=spec.subject,
        ack_wait=spec.ack_wait.ToTimedelta().total_seconds() if spec.HasField("ack_wait") else 60.0,
        max_ack_pending=-1,
    )
    if spec.deliver_policy == m.NATS_DELIVER_POLICY_BY_START_TIME:
        config.opt_start_time = spec.start_time.ToDatetime(tzinfo=dt.UTC)
    if spec.deliver_policy == m.NATS_DELIVER_POLICY_BY_START_SEQUENCE:
        config.opt_start_seq = spec.start_sequence
    return config


async def connect(url: str, credentials: Mapping[str, Any], *, reconnect: bool = True) -> nats.NATS:
    """A client; a consumer reconnects through server restarts, a one-off check fails fast."""
    # nats-py reads max_reconnect_attempts=0 as "forever"; 1 with a short wait fails fast.
    attempts: dict[str, Any] = (
        {"max_reconnect_attempts": 5, "reconnect_time_wait": 1} if reconnect else {"max_reconnect_attempts": 1, "reconnect_time_wait": 0.1}
    )

    async def quiet(error: Exception) -> None:  # failures surface as exceptions; no tracebacks on stderr
        log.debug("nats client error", url=url, error=str(error) or type(error).__name__)

    try:
        return await nats.connect(servers=[url], connect_timeout=3, error_cb=quiet, **attempts, **dict(credentials))
    except (TimeoutError, nats.errors.NoServersError, OSError, nats.errors.Error) as error:
        raise Unavailable(f"cannot reach NATS at {url}: {error or type(error).__name__}", reason="NATS_UNREACHABLE") from None


async def check_stream(url: str, credentials: Mapping[str, Any], stream: str) -> None:
    """The server answers and the stream exists (CreateSource validate_only)."""
    client = await connect(url, credentials, reconnect=False)
    try:
        await client.jetstream().stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise FailedPrecondition(f"JetStream stream {stream!r} does not exist on {url}", reason="NATS_STREAM_NOT_FOUND") from None
    finally:
        await client.close()


async def delete_consumer(url: str, credentials: Mapping[str, Any], stream: str, durable: str) -> None:
    client = await connect(url, credentials, reconnect=False)
    try:
        await client.jetstream().delete_consumer(stream, durable)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await client.close()


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def decode_messages(messages: list[ReceivedMessage], spec: m.NatsSubscriptionSpec, schema: m.Schema, stream: str) -> DecodedMessages:
    """Rows of the messages with their dedup digests (key columns + event time, or the whole row)."""
    key_columns = list(spec.dedup_key_columns) or list(schema.entity_key_columns)
    event_time = schema.event_time_column
    decoded = DecodedMessages()

    def fail(batch_id: str, values: dict[str, Any], reason: str, data: bytes) -> None:
        decoded.failures.append(ParseFailure(batch_id, 0, values, reason))
        decoded.failure_digests.append(_digest(["raw", hashlib.sha256(data).hexdigest()]))

    for message in messages:
        batch_id = f"{stream}:{message.sequence}"
        if spec.message_format == m.MESSAGE_FORMAT_ARROW_IPC:
            try:
                rows = pa.ipc.open_stream(pa.py_buffer(message.data)).read_all().to_pylist()
            except (pa.ArrowInvalid, OSError) as error:
                fail(batch_id, {"_raw_bytes": len(message.data)}, f"message is not an Arrow IPC stream: {error}", message.data)
                continue
        else:
            text = message.data.decode("utf-8", "replace")
            try:
                parsed = json.loads(message.data)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                fail(batch_id, {"_raw": text[:10_000]}, f"message is not JSON: {error}", message.data)
                continue
            if not isinstance(parsed, dict):
                fail(batch_id, {"_raw": text[:10_000]}, "message is JSON but not an object", message.data)
                continue
            rows = [parsed]
        for row in rows:
            if key_columns or event_time:
                digest = _digest([[row.get(k) for k in key_columns], row.get(event_time) if event_time else None])
            else:
                digest = _digest(["row", row])
            decoded.records.append(row)
            decoded.record_batch_ids.append(batch_id)
            decoded.digests.append(digest)
    return decoded


@dataclass
class ConsumerSettings:
    url: str
    credentials: Mapping[str, Any]
    stream: str
    subject: str
    durable: str
    config: ConsumerConfig
    max_rows: int
    max_interval: float


class NatsConsumer:
    """One source's consumer loop; `commit` runs the blocking commit of pending messages."""

    def __init__(
        self,
        key: tuple[str, str],
        settings: ConsumerSettings,
        commit: Callable[[list[ReceivedMessage]], None],
        on_error: Callable[[str, int], bool],
        report_pending: Callable[[int], None],
    ):
        self.key = key
        self.settings = settings
        self.commit = commit
        self.on_error = on_error  # (message, consecutive failures) -> keep trying?
        self.report_pending = report_pending
        self.stopping = asyncio.Event()
        self.subscription: Any = None

    async def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                await self._consume()
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure is reported on the source and retried
                failures += 1
                message = str(getattr(error, "message", "") or error) or type(error).__name__
                log.warning("nats source failed", source="/".join(self.key), error=message, attempt=failures)
                if not await asyncio.to_thread(self.on_error, message, failures):
                    return
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=min(30.0, 0.5 * 2**failures))
                except TimeoutError:
                    pass

    async def _consume(self) -> None:
        settings = self.settings
        client = await connect(settings.url, settings.credentials)
        try:
            js = client.jetstream()
            try:
                subscription = await js.pull_subscribe(
                    settings.subject, durable=settings.durable, stream=settings.stream, config=settings.config
                )
            except nats.js.errors.NotFoundError:
                raise FailedPrecondition(f"JetStream stream {settings.stream!r} does not exist", reason="NATS_STREAM_NOT_FOUND") from None
            pending: list[Any] = []
            oldest = 0.0
            self.subscription = subscription
            while True:
                if self.stopping.is_set():
                    break
                wait = settings.max_interval - (time.monotonic() - oldest) if pending else 1.0
                try:
                    fetched = await subscription.fetch(
                        batch=max(1, min(1000, settings.max_rows - len(pending))), timeout=max(0.05, min(1.0, wait))
                    )
                except nats.errors.TimeoutError:
                    fetched = []
                if fetched and not pending:
                    oldest = time.monotonic()
                pending.extend(fetched)
                due = pending and (len(pending) >= settings.max_rows or time.monotonic() - oldest >= settings.max_interval)
                if due:
                    await self._commit(pending)
                    pending = []
            if pending:
                await self._commit(pending)  # pausing commits what it holds first
        finally:
            await client.close()

    async def _commit(self, pending: list[Any]) -> None:
        received = [ReceivedMessage(msg.metadata.sequence.stream, msg.data) for msg in pending]
        await asyncio.to_thread(self.commit, received)
        for msg in pending:
            await msg.ack()
        try:
            info = await self.subscription.consumer_info()
            await asyncio.to_thread(self.report_pending, int(info.num_pending or 0))
        except (TimeoutError, nats.errors.Error) as error:
            log.debug("consumer info unavailable", error=str(error))
