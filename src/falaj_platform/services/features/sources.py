"""Where feature data comes from: ingest dataset versions, behind one small interface.

In production the data is pulled over gRPC from the ingest service through the gateway
(`ingest_client.IngestDatasetSource`). `InMemoryDatasetSource` serves Arrow tables held
in the process, with the same semantics (versions are full snapshots, reads filter on
event time), for tests, demos and notebooks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from falaj_platform.services.features import names


@dataclass(frozen=True)
class DatasetInfo:
    """What the features service needs to know about an ingest dataset."""

    name: str  # datasets/{dataset}
    residency_region: str
    # Column name -> ingest ColumnType, in schema order.
    columns: Mapping[str, int]
    event_time_column: str
    entity_key_columns: tuple[str, ...] = ()
    data_subject_column: str = ""
    latest_version: str = ""  # datasets/{dataset}/versions/{n}; empty before the first commit


@dataclass(frozen=True)
class VersionInfo:
    """The manifest of one ingest dataset version."""

    name: str  # datasets/{dataset}/versions/{n}
    dataset: str  # datasets/{dataset}
    version_number: int
    content_hash: str
    row_count: int
    residency_region: str
    min_event_time: dt.datetime | None = None
    max_event_time: dt.datetime | None = None


@dataclass(frozen=True)
class ErasedKeys:
    """Entity keys an erasure removed from one dataset."""

    dataset: str
    entity_key_columns: tuple[str, ...]
    # One tuple per erased key, ordered like entity_key_columns.
    keys: tuple[tuple[object, ...], ...]


@dataclass(frozen=True)
class ErasureInfo:
    """A completed ingest erasure receipt."""

    name: str  # erasureReceipts/{receipt}
    receipt_digest: str
    completed: bool
    datasets: tuple[ErasedKeys, ...] = ()


class DatasetSource(Protocol):
    """Read access to ingest datasets (through the gateway in production)."""

    def get_dataset(self, dataset: str) -> DatasetInfo:
        """The dataset `datasets/{dataset}`; NotFound when it does not exist."""

    def get_version(self, version: str) -> VersionInfo:
        """The manifest of `datasets/{dataset}/versions/{n}` (or `latest`)."""

    def read_version(
        self,
        version: str,
        columns: Sequence[str] = (),
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        *,
        expected_content_hash: str = "",
    ) -> Iterator[pa.RecordBatch]:
        """The version's rows (event time in [start, end) when given) as Arrow batches.

        With `expected_content_hash` the read fails (FailedPrecondition) if the version
        was rewritten (by an erasure) since its manifest was read."""

    def consented_subjects(self, subject_ids: Sequence[str], purpose: str) -> set[str]:
        """The subjects among `subject_ids` whose consent to `purpose` is granted now."""
        ...

    def get_erasure_receipt(self, receipt: str) -> ErasureInfo:
        """An erasure receipt `erasureReceipts/{receipt}`."""


@dataclass
class _Dataset:
    info: DatasetInfo
    versions: list[pa.Table] = field(default_factory=list)


class InMemoryDatasetSource:
    """Datasets and versions held as Arrow tables in this process."""

    def __init__(self) -> None:
        self._datasets: dict[str, _Dataset] = {}
        self._receipts: dict[str, ErasureInfo] = {}
        self._consents: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def grant_consent(self, subject_id: str, purpose: str) -> None:
        with self._lock:
            self._consents.setdefault(purpose, set()).add(subject_id)

    def consented_subjects(self, subject_ids: Sequence[str], purpose: str) -> set[str]:
        with self._lock:
            return set(subject_ids) & self._consents.get(purpose, set())

    def add_dataset(
        self,
        dataset_id: str,
        columns: Mapping[str, int],
        *,
        event_time_column: str,
        residency_region: str,
        entity_key_columns: Sequence[str] = (),
        data_subject_column: str = "",
    ) -> str:
        name = f"datasets/{dataset_id}"
        with self._lock:
            self._datasets[name] = _Dataset(
                DatasetInfo(name, residency_region, dict(columns), event_time_column, tuple(entity_key_columns), data_subject_column)
            )
        return name

    def commit(self, dataset: str, table: pa.Table, *, append: bool = True) -> str:
        """Commit a new version: the previous rows plus `table` (append) or `table` alone."""
        with self._lock:
            held = self._datasets[dataset]
            if append and held.versions:
                table = pa.concat_tables([held.versions[-1], table.cast(held.versions[-1].schema)])
            held.versions.append(table)
            number = len(held.versions)
            version = f"{dataset}/versions/{number}"
            held.info = DatasetInfo(**{**held.info.__dict__, "latest_version": version})
        return version

    def add_erasure_receipt(self, receipt: ErasureInfo) -> None:
        with self._lock:
            self._receipts[receipt.name] = receipt

    def get_dataset(self, dataset: str) -> DatasetInfo:
        held = self._datasets.get(dataset)
        if held is None:
            raise NotFound(f"dataset {dataset} does not exist", reason="DATASET_NOT_FOUND", metadata={"dataset": dataset})
        return held.info

    def _version(self, version: str) -> tuple[_Dataset, int, pa.Table]:
        dataset_id, number = names.parse_dataset_version(version)
        held = self._datasets.get(f"datasets/{dataset_id}")
        if held is None:
            raise NotFound(f"dataset datasets/{dataset_id} does not exist", reason="DATASET_NOT_FOUND")
        if number == "latest":
            if not held.versions:
                raise FailedPrecondition(f"dataset datasets/{dataset_id} has no version yet", reason="NO_DATASET_VERSION")
            index = len(held.versions)
        elif number.isdigit() and 1 <= int(number) <= len(held.versions):
            index = int(number)
        else:
            raise NotFound(
                f"dataset version {version} does not exist", reason="DATASET_VERSION_NOT_FOUND", metadata={"dataset_version": version}
            )
        return held, index, held.versions[index - 1]

    def get_version(self, version: str) -> VersionInfo:
        held, number, table = self._version(version)
        times = table.column(held.info.event_time_column) if held.info.event_time_column else None
        low = pc.min(times).as_py() if times is not None and len(table) else None
        high = pc.max(times).as_py() if times is not None and len(table) else None
        digest = hashlib.sha256()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue().to_pybytes())
        return VersionInfo(
            f"{held.info.name}/versions/{number}",
            held.info.name,
            number,
            digest.hexdigest(),
            len(table),
            held.info.residency_region,
            low,
            high,
        )

    def read_version(
        self,
        version: str,
        columns: Sequence[str] = (),
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        *,
        expected_content_hash: str = "",
    ) -> Iterator[pa.RecordBatch]:
        if expected_content_hash and self.get_version(version).content_hash != expected_content_hash:
            raise FailedPrecondition(f"dataset version {version} changed since it was read", reason="CONTENT_HASH_MISMATCH")
        held, _, table = self._version(version)
        unknown = [c for c in columns if c not in table.column_names]
        if unknown:
            raise InvalidArgument(f"dataset {held.info.name} has no column {unknown[0]!r}", reason="UNKNOWN_COLUMN")
        event_time = held.info.event_time_column
        if start is not None:
            table = table.filter(pc.greater_equal(table.column(event_time), pa.scalar(start, table.schema.field(event_time).type)))
        if end is not None:
            table = table.filter(pc.less(table.column(event_time), pa.scalar(end, table.schema.field(event_time).type)))
        if columns:
            table = table.select(list(columns))
        yield from table.to_batches(max_chunksize=65_536)

    def get_erasure_receipt(self, receipt: str) -> ErasureInfo:
        found = self._receipts.get(receipt)
        if found is None:
            raise NotFound(
                f"erasure receipt {receipt} does not exist", reason="ERASURE_RECEIPT_NOT_FOUND", metadata={"erasure_receipt": receipt}
            )
        return found
