"""Parquet files of dataset versions: atomic publication, reads, rewrites, orphan cleanup.

Layout under the service's data dir::

    datasets/{dataset}/.staging/{commit}/...                  being written (never read)
    datasets/{dataset}/files/{commit}/event_date=YYYY-MM-DD/part-00000.parquet

A commit writes its files into `.staging/{commit}`, fsyncs every file and folder, and
renames the folder into `files/` in one step. The files become part of a version only
when the catalog row naming them commits, so a crash at any point leaves either a whole
version or files no catalog row names, which `remove_orphans` deletes at the next boot.
Versions share files: an append's version lists its parent's files plus its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

NULL_PARTITION = "__null__"


@dataclass(frozen=True)
class StoredFile:
    """One Parquet file of a version, as the catalog lists it."""

    path: str  # relative to the storage root
    event_date: str  # YYYY-MM-DD, NULL_PARTITION, or '' for datasets without event time
    row_count: int
    size_bytes: int
    sha256: str
    min_event_time: dt.datetime | None = None
    max_event_time: dt.datetime | None = None


@dataclass(frozen=True)
class StagedCommit:
    """Files written and synced under .staging, not yet published."""

    dataset: str
    commit_id: str
    files: list[StoredFile]  # paths as they will be once published

    @property
    def relative_dir(self) -> str:
        return f"datasets/{self.dataset}/files/{self.commit_id}"


def content_hash(files: Sequence[StoredFile]) -> str:
    """SHA-256 over the files' own SHA-256 digests, in partition order: the version's identity."""
    digest = hashlib.sha256()
    for stored in sorted_files(files):
        digest.update(bytes.fromhex(stored.sha256))
    return digest.hexdigest()


def sorted_files(files: Iterable[StoredFile]) -> list[StoredFile]:
    """Partition order (event date, then commit order within a date) — the order rows are read in."""
    indexed = list(enumerate(files))
    indexed.sort(key=lambda item: (item[1].event_date, item[0]))
    return [f for _, f in indexed]


class _HashingWriter:
    """A file object that hashes what passes through, so files are not read back to hash them."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True  # the caller closes (and fsyncs) the real file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _event_range(table: pa.Table, event_time_column: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    if not event_time_column or table.num_rows == 0:
        return None, None
    bounds = pc.min_max(table.column(event_time_column))
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    return low, high


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """Data read from a file in the version's schema: declared order, types, missing (added) columns as nulls."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    arrays = []
    for schema_field in schema:
        if schema_field.name in table.column_names:
            column = table.column(schema_field.name)
            arrays.append(column if column.type == schema_field.type else column.cast(schema_field.type))
        else:
            arrays.append(pa.chunked_array([pa.nulls(table.num_rows, schema_field.type)]))
    return pa.Table.from_arrays(arrays, schema=schema)


class VersionStorage:
    """Reads and writes the Parquet files of every dataset's versions under `root`."""

    def __init__(self, root: Path, row_group_rows: int = 128 * 1024):
        self.root = root
        self.row_group_rows = row_group_rows

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    # -- writing ---------------------------------------------------------------------------
    def stage(self, dataset: str, table: pa.Table, event_time_column: str) -> StagedCommit:
        """Write `table` as Parquet partitioned by event date into a synced staging folder."""
        commit_id = uuid.uuid4().hex
        staging = self.root / "datasets" / dataset / ".staging" / commit_id
        staging.mkdir(parents=True, exist_ok=False)
        try:
            files = [
                self._write_partition(staging, dataset, commit_id, part, key, event_time_column)
                for key, part in self._partitions(table, event_time_column)
            ]
            for folder in {staging, *(p.parent for p in staging.rglob("*.parquet"))}:
                _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedCommit(dataset, commit_id, files)

    def _partitions(self, table: pa.Table, event_time_column: str) -> Iterator[tuple[str, pa.Table]]:
        if not event_time_column:
            yield "", table
            return
        if table.num_rows == 0:
            return
        dates = pc.cast(table.column(event_time_column), pa.date32())
        order = pc.array_sort_indices(dates, null_placement="at_end")
        days = pc.take(dates, order)
        day_numbers = pc.fill_null(pc.cast(days, pa.int32()), np.iinfo(np.int32).max).to_numpy()
        starts = np.concatenate(([0], np.nonzero(np.diff(day_numbers))[0] + 1))
        ends = np.concatenate((starts[1:], [len(day_numbers)]))
        already_sorted = bool(np.all(order.to_numpy()[:-1] < order.to_numpy()[1:])) if table.num_rows > 1 else True
        ordered = table if already_sorted else table.take(order)
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            day = days[start].as_py()
            key = NULL_PARTITION if day is None else day.isoformat()
            yield key, ordered.slice(start, end - start)

    def _write_partition(self, staging: Path, dataset: str, commit_id: str, part: pa.Table, key: str, event_time_column: str) -> StoredFile:
        folder = staging / f"event_date={key}" if key else staging
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "part-00000.parquet"
        # Dictionary pages pay off for strings, categories and integers; random floats
        # only make the writer try and fall back on every row group.
        dictionary = [f.name for f in part.schema if not pa.types.is_floating(f.type)]
        with path.open("wb") as handle:
            hashing = _HashingWriter(handle)
            pq.write_table(part, hashing, row_group_size=self.row_group_rows, use_dictionary=dictionary)
            handle.flush()
            os.fsync(handle.fileno())
        low, high = _event_range(part, event_time_column)
        relative = f"datasets/{dataset}/files/{commit_id}/" + (f"event_date={key}/" if key else "") + path.name
        return StoredFile(relative, key, part.num_rows, hashing.size, hashing.digest.hexdigest(), low, high)

    def publish(self, staged: StagedCommit) -> None:
        """Move a staged commit into place in one rename; its files exist, unreferenced, until the catalog commits."""
        staging = self.root / "datasets" / staged.dataset / ".staging" / staged.commit_id
        target = self.root / staged.relative_dir
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
        _fsync_dir(target.parent)
        _fsync_dir(staging.parent)

    def discard(self, staged: StagedCommit) -> None:
        """Remove a staged or published commit whose catalog row did not commit."""
        shutil.rmtree(self.root / "datasets" / staged.dataset / ".staging" / staged.commit_id, ignore_errors=True)
        shutil.rmtree(self.root / staged.relative_dir, ignore_errors=True)

    def rewrite(self, dataset: str, source: StoredFile, keep: pa.Array, event_time_column: str) -> tuple[StagedCommit, StoredFile]:
        """A copy of `source` holding only the rows where `keep` is true, staged under a new commit."""
        table = pq.read_table(self.absolute(source.path))
        kept = table.filter(keep)
        commit_id = uuid.uuid4().hex
        staging = self.root / "datasets" / dataset / ".staging" / commit_id
        staging.mkdir(parents=True, exist_ok=False)
        try:
            written = self._write_partition(staging, dataset, commit_id, kept, source.event_date, event_time_column)
            for folder in {staging, *(p.parent for p in staging.rglob("*.parquet"))}:
                _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedCommit(dataset, commit_id, [written]), written

    # -- reading ---------------------------------------------------------------------------
    def file_columns(self, stored: StoredFile) -> list[str]:
        return list(pq.read_schema(self.absolute(stored.path)).names)

    def read_file(self, stored: StoredFile, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.absolute(stored.path), columns=list(columns) if columns is not None else None)

    def read_table(self, files: Sequence[StoredFile], schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
        """Every row of the files, in partition order, in `schema` (optionally only `columns`)."""
        wanted = pa.schema([schema.field(c) for c in columns]) if columns is not None else schema
        tables = [self._read_conformed(f, wanted) for f in sorted_files(files)]
        return pa.concat_tables(tables) if tables else wanted.empty_table()

    def _read_conformed(self, stored: StoredFile, wanted: pa.Schema) -> pa.Table:
        present = set(pq.read_schema(self.absolute(stored.path)).names)
        table = pq.read_table(self.absolute(stored.path), columns=[c for c in wanted.names if c in present])
        return conform(table, wanted)

    def scan(
        self,
        files: Sequence[StoredFile],
        schema: pa.Schema,
        *,
        columns: Sequence[str],
        event_time_column: str,
        start: dt.datetime | None,
        end: dt.datetime | None,
        batch_rows: int,
    ) -> Iterator[pa.Table]:
        """Rows in partition order, filtered to [start, end) on event time, `columns` only, in batches."""
        need = list(dict.fromkeys([*columns, *([event_time_column] if event_time_column and (start or end) else [])]))
        read_schema = pa.schema([schema.field(c) for c in need])
        out_schema = pa.schema([schema.field(c) for c in columns])
        for stored in sorted_files(files):
            if start is not None and stored.max_event_time is not None and stored.max_event_time < start:
                continue
            if end is not None and stored.min_event_time is not None and stored.min_event_time >= end:
                continue
            path = self.absolute(stored.path)
            present = set(pq.read_schema(path).names)
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[c for c in need if c in present]):
                table = conform(batch, read_schema)
                if start is not None or end is not None:
                    times = table.column(event_time_column)
                    keep = pc.is_valid(times)
                    if start is not None:
                        keep = pc.and_(keep, pc.greater_equal(times, pa.scalar(start, times.type)))
                    if end is not None:
                        keep = pc.and_(keep, pc.less(times, pa.scalar(end, times.type)))
                    table = table.filter(keep)
                if table.num_rows:
                    yield table.select(columns).cast(out_schema)

    # -- housekeeping ------------------------------------------------------------------------
    def delete_files(self, relative_paths: Iterable[str]) -> None:
        """Delete files no version references any more, and the folders they leave empty."""
        for relative in relative_paths:
            path = self.absolute(relative)
            path.unlink(missing_ok=True)
            self._prune_empty(path.parent)

    def _prune_empty(self, folder: Path) -> None:
        datasets = self.root / "datasets"
        while folder != datasets and folder.is_relative_to(datasets):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def delete_dataset(self, dataset: str) -> None:
        shutil.rmtree(self.root / "datasets" / dataset, ignore_errors=True)

    def remove_orphans(self, referenced: set[str]) -> list[str]:
        """Delete staging folders and every file no catalog row references; returns what was removed."""
        removed: list[str] = []
        datasets = self.root / "datasets"
        if not datasets.is_dir():
            return removed
        for dataset_dir in sorted(p for p in datasets.iterdir() if p.is_dir()):
            staging = dataset_dir / ".staging"
            if staging.exists():
                removed.extend(str(p.relative_to(self.root)) for p in staging.iterdir())
                shutil.rmtree(staging, ignore_errors=True)
            files = dataset_dir / "files"
            if files.is_dir():
                for path in sorted(files.rglob("*")):
                    if path.is_file() and str(path.relative_to(self.root)) not in referenced:
                        removed.append(str(path.relative_to(self.root)))
                        path.unlink(missing_ok=True)
                for folder in sorted((p for p in files.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    try:
                        folder.rmdir()
                    except OSError:
                        pass
            self._prune_empty(files)
        return removed
