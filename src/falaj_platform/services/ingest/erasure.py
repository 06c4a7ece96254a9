"""EraseSubject (UAE PDPL): remove a data subject's rows from every version, with a receipt.

Versions share Parquet files, so erasure rewrites each affected file once (a copy
without the subject's rows, staged and published like a commit) and then, in one
transaction per dataset, points every version listing the old file at the new one,
recomputes content hashes and profiles, records the rewrite in each version's lineage,
and deletes the subject's quarantined rows. Old files are deleted after that commit.
A crash leaves either the old or the new file referenced; the other is an orphan the
next boot removes, and a retry with the same request id finishes the job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from falaj.common.v1 import common_pb2 as common
from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, InvalidArgument, Unavailable
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.ingest import names
from falaj_platform.services.ingest.commits import Committer, now_utc
from falaj_platform.services.ingest.profiles import profile_table
from falaj_platform.services.ingest.residency import AuditSink
from falaj_platform.services.ingest.schema import arrow_schema
from falaj_platform.services.ingest.storage import StagedCommit, StoredFile, VersionStorage
from falaj_platform.services.ingest.store import IngestStore, VersionRecord

log = get_logger()


@dataclass
class _FileErasure:
    old: StoredFile
    new: StoredFile | None
    staged: StagedCommit | None
    removed: int


def receipt_digest(receipt: m.ErasureReceipt) -> str:
    copy = m.ErasureReceipt()
    copy.CopyFrom(receipt)
    copy.ClearField("receipt_digest")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


class Eraser:
    """Erases data subjects across datasets and issues receipts."""

    def __init__(self, store: IngestStore, storage: VersionStorage, committer: Committer, audit: AuditSink):
        self.store = store
        self.storage = storage
        self.committer = committer
        self.audit = audit

    def erase(
        self, subject_id: str, legal_basis: str, dataset_names: Sequence[str], validate_only: bool, request_id: str, caller: str
    ) -> m.ErasureReceipt:
        if not subject_id.strip():
            raise InvalidArgument("subject_id is required", reason="SUBJECT_ID_REQUIRED")
        if not legal_basis.strip():
            raise InvalidArgument("legal_basis is required: say why the subject's data is erased", reason="LEGAL_BASIS_REQUIRED")
        targets = self._targets(dataset_names)
        existing = None if validate_only else self.store.receipt_by_request(request_id)
        if existing is not None:
            if existing.subject_id != subject_id or existing.legal_basis != legal_basis:
                raise FailedPrecondition(
                    f"request_id {request_id!r} was already used for a different erasure; use a new request id",
                    reason="REQUEST_ID_REUSED",
                    metadata={"request_id": request_id},
                )
            if existing.state == m.ERASURE_STATE_COMPLETED:
                return existing
        receipt_id = existing.name.rsplit("/", 1)[-1] if existing is not None else uuid.uuid4().hex
        receipt = m.ErasureReceipt(
            name="" if validate_only else names.receipt_name(receipt_id),
            subject_id=subject_id,
            request_id=request_id,
            legal_basis=legal_basis,
            state=m.ERASURE_STATE_UNSPECIFIED if validate_only else m.ERASURE_STATE_IN_PROGRESS,
            request_stamp=existing.request_stamp if existing is not None else common.AuditStamp(actor=caller),
        )
        if existing is None:
            receipt.request_stamp.time.FromDatetime(now_utc())
        if existing is not None:
            receipt.datasets.extend(existing.datasets)
            receipt.rows_erased = existing.rows_erased
        if not validate_only:
            with self.store.transaction() as session:
                self.store.save_receipt(session, receipt_id, receipt, now_utc())
        try:
            for dataset in targets:
                with self.committer.dataset_lock(dataset.name.split("/", 1)[1]):
                    erased = self._erase_dataset(dataset, subject_id, receipt, receipt_id, validate_only)
                if erased is not None:
                    receipt.datasets.append(erased)
            receipt.rows_erased = sum(v.rows_removed for d in receipt.datasets for v in d.versions) + sum(
                d.quarantined_rows_erased for d in receipt.datasets
            )
            if validate_only:
                return receipt
            record = self.audit.report(
                gateway_messages.SECURITY_EVENT_TYPE_DATA_ERASED,
                resource=receipt.name,
                action="erase",
                allowed=True,
                detail=f"erased a data subject's rows from {len(receipt.datasets)} dataset(s) ({receipt.rows_erased} rows) under {legal_basis}",
                attributes={
                    "receipt": receipt.name,
                    "rows_erased": str(receipt.rows_erased),
                    "datasets": ",".join(d.dataset for d in receipt.datasets),
                },
                report_id=f"erasure-{receipt_id}",
                caller=caller,
            )
            receipt.audit_event_id = str(getattr(record, "sequence", "") or "")
            receipt.state = m.ERASURE_STATE_COMPLETED
            receipt.complete_time.FromDatetime(now_utc())
            receipt.receipt_digest = receipt_digest(receipt)
            with self.store.transaction() as session:
                self.store.save_receipt(session, receipt_id, receipt, now_utc())
            return receipt
        except FalajError as error:
            if not validate_only:
                receipt.state = m.ERASURE_STATE_FAILED
                receipt.error_message = (
                    f"{error.message}; rows already erased stay erased, retry with the same request id to finish"
                    if isinstance(error, Unavailable)
                    else error.message
                )
                with self.store.transaction() as session:
                    self.store.save_receipt(session, receipt_id, receipt, now_utc())
            raise

    def _targets(self, dataset_names: Sequence[str]) -> list[m.Dataset]:
        if dataset_names:
            found = [self.store.get_dataset(names.parse_dataset(name, "datasets")) for name in dataset_names]
            lacking = [d.name for d in found if not d.schema.data_subject_column]
            if lacking:
                raise FailedPrecondition(f"dataset(s) {', '.join(lacking)} declare no data-subject column", reason="NO_DATA_SUBJECT_COLUMN")
            return found
        return [d for d in self.store.list_datasets("", "") if d.schema.data_subject_column]

    def _erase_dataset(
        self, dataset: m.Dataset, subject_id: str, receipt: m.ErasureReceipt, receipt_id: str, validate_only: bool
    ) -> m.ErasedDataset | None:
        dataset_id = dataset.name.split("/", 1)[1]
        with self.store.transaction() as session:
            versions = self.store.versions_using(session, dataset_id, self.store.dataset_file_paths(session, dataset_id))
            records = [self.store.version_record(session, dataset_id, row.version_number) for row in versions]
            quarantined = self.store.count_quarantined_of_subject(session, dataset_id, subject_id)
        files: dict[str, StoredFile] = {}
        schema_of: dict[str, m.Schema] = {}
        for record in records:
            if record is None:
                continue
            with self.store.transaction() as session:
                schema = self.store.schema_of(session, dataset_id, record.schema_major, record.schema_minor)
            for stored in record.files:
                files.setdefault(stored.path, stored)
                schema_of.setdefault(stored.path, schema)
        erasures: list[_FileErasure] = []
        entity_keys: set[str] = set()
        try:
            for path, stored in files.items():
                schema = schema_of[path]
                subject_column = schema.data_subject_column or dataset.schema.data_subject_column
                present = self.storage.file_columns(stored)
                if subject_column not in present:
                    continue
                subjects = self.storage.read_file(stored, columns=[subject_column]).column(subject_column)
                text = subjects if pa.types.is_string(subjects.type) else subjects.cast(pa.string())
                hits = pc.fill_null(pc.equal(text, pa.scalar(subject_id)), False)
                removed = int(pc.sum(hits).as_py() or 0)
                if not removed:
                    continue
                keys = [k for k in schema.entity_key_columns if k in present]
                if keys:
                    key_rows = self.storage.read_file(stored, columns=keys).filter(hits).to_pylist()
                    entity_keys.update(json.dumps([_plain(row[k]) for k in keys]) for row in key_rows)
                if validate_only:
                    erasures.append(_FileErasure(stored, None, None, removed))
                    continue
                staged, new = self.storage.rewrite(dataset_id, stored, pc.invert(hits), schema.event_time_column)
                self.storage.publish(staged)
                erasures.append(_FileErasure(stored, new, staged, removed))
            if not erasures and not quarantined:
                return None
            erased = m.ErasedDataset(
                dataset=dataset.name, quarantined_rows_erased=quarantined, entity_key_columns=list(dataset.schema.entity_key_columns)
            )
            erased.erased_entity_keys_json.extend(sorted(entity_keys))
            if validate_only:
                for record in records:
                    if record is None:
                        continue
                    paths = {f.path for f in record.files}
                    removed = sum(e.removed for e in erasures if e.old.path in paths)
                    if removed:
                        erased.versions.add(
                            dataset_version=names.version_name(dataset_id, record.number),
                            rows_removed=removed,
                            previous_content_hash=record.content_hash,
                        )
                return erased
            replacements = {e.old.path: e.new for e in erasures if e.new is not None}
            profiles = self._profiles(dataset_id, records, replacements, schema_of)
            now = now_utc()

            def rewrite_of(version_id: str, previous: str, new: str) -> m.VersionRewrite:
                rewrite = m.VersionRewrite(erasure_receipt=receipt.name, previous_content_hash=previous, new_content_hash=new)
                rewrite.rewrite_time.FromDatetime(now)
                return rewrite

            with self.store.transaction() as session:
                changed = self.store.replace_files(session, dataset_id, replacements, rewrite_of, profiles, now)
                self.store.delete_quarantined_of_subject(session, dataset_id, subject_id)
            for version_id, number, previous, new_hash in changed:
                record = next(r for r in records if r is not None and r.id == version_id)
                before = record.row_count
                after = sum((replacements.get(stored_file.path) or stored_file).row_count for stored_file in record.files)
                erased.versions.add(
                    dataset_version=names.version_name(dataset_id, number),
                    rows_removed=before - after,
                    previous_content_hash=previous,
                    new_content_hash=new_hash,
                )
        except BaseException:
            for erasure in erasures:
                if erasure.staged is not None:
                    self.storage.discard(erasure.staged)
            raise
        self.storage.delete_files(replacements)
        return erased

    def _profiles(
        self, dataset_id: str, records: Sequence[VersionRecord | None], replacements: dict[str, StoredFile], schema_of: dict[str, m.Schema]
    ) -> dict[str, m.DatasetProfile]:
        profiles: dict[str, m.DatasetProfile] = {}
        for record in records:
            if record is None or not any(f.path in replacements for f in record.files):
                continue
            new_files = [replacements.get(f.path, f) for f in record.files]
            schema = schema_of[record.files[0].path]
            table = self.storage.read_table(new_files, arrow_schema(schema))
            profile = profile_table(table, schema)
            profile.dataset_version = names.version_name(dataset_id, record.number)
            profile.compute_time.FromDatetime(dt.datetime.now(dt.UTC))
            profiles[record.id] = profile
        return profiles


def _plain(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value
