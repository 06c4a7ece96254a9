"""Erasure: an ingest erasure receipt removes the data subject from the offline and online stores.

The receipt (fetched from ingest, never taken from the caller) lists, per dataset, the
entity keys of the erased rows. Every offline copy of that dataset is rewritten without
those rows, and every view over it loses those keys online. Applying a receipt twice
returns the first application; the erasure is reported to the audit log.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value as FeastValue

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.audit import SecurityEvent
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.services.features import names
from falaj_platform.services.features.catalog import Auditor
from falaj_platform.services.features.feast_repo import FeastRepo
from falaj_platform.services.features.paging import paginate
from falaj_platform.services.features.sources import DatasetSource, ErasedKeys
from falaj_platform.services.features.store import FeaturesStore, OfflineSnapshot

log = logging.getLogger(__name__)
STATE = messages.ErasureApplicationState
VT = messages.ValueType


def _key_value(value: object, value_type: int) -> FeastValue:
    if value_type == VT.VALUE_TYPE_INT32:
        return FeastValue(int32_val=int(value))  # type: ignore[call-overload]
    if value_type == VT.VALUE_TYPE_INT64:
        return FeastValue(int64_val=int(value))  # type: ignore[call-overload]
    if value_type == VT.VALUE_TYPE_BYTES:
        return FeastValue(bytes_val=value if isinstance(value, bytes) else str(value).encode())
    return FeastValue(string_val=str(value))


def _without_keys(path: str, erased: ErasedKeys) -> int:
    """Rewrite one offline file without the erased keys' rows; returns rows removed."""
    table = pq.read_table(path)
    if any(column not in table.column_names for column in erased.entity_key_columns) or not erased.keys:
        return 0
    keys = pa.table({column: [key[i] for key in erased.keys] for i, column in enumerate(erased.entity_key_columns)})
    keys = keys.cast(pa.schema([table.schema.field(c) for c in erased.entity_key_columns]))
    marked = keys.append_column("__erased", pa.array([True] * keys.num_rows))
    joined = table.join(marked, list(erased.entity_key_columns), join_type="left outer")
    kept = joined.filter(pc.invert(pc.fill_null(joined.column("__erased"), False))).drop_columns(["__erased"]).select(table.column_names)
    removed = table.num_rows - kept.num_rows
    if removed:
        partial = Path(path).with_suffix(".erasing")
        pq.write_table(kept.cast(table.schema), partial)
        partial.replace(path)
    return removed


class Eraser:
    """Applies ingest erasure receipts to the feature store."""

    def __init__(self, store: FeaturesStore, repo: FeastRepo, source: DatasetSource, audit: Auditor):
        self.store = store
        self.repo = repo
        self.source = source
        self.audit = audit

    def apply(self, request: requests.ApplyErasureReceiptRequest) -> messages.ErasureApplication:
        receipt_id = names.parse(request.erasure_receipt, "erasureReceipts", "erasure_receipt")
        receipt_name = f"erasureReceipts/{receipt_id}"
        with self.store.transaction() as session:
            earlier = self.store.get_erasure_application(session, receipt_name)
        if earlier is not None and earlier.state == STATE.ERASURE_APPLICATION_STATE_COMPLETED:
            return earlier
        receipt = self.source.get_erasure_receipt(receipt_name)
        if not receipt.completed:
            raise FailedPrecondition(f"{receipt_name} is not completed in ingest yet; apply it once it is", reason="RECEIPT_NOT_COMPLETED")
        application = messages.ErasureApplication(
            name=earlier.name if earlier else f"{names.ERASURE_APPLICATIONS}/{uuid.uuid4().hex}",
            erasure_receipt=receipt_name,
            receipt_digest=receipt.receipt_digest,
            state=STATE.ERASURE_APPLICATION_STATE_IN_PROGRESS,
            request_id=request.request_id,
        )
        application.create_stamp.actor = current_caller()
        application.create_stamp.time.FromDatetime(dt.datetime.now(dt.UTC))
        try:
            for erased in receipt.datasets:
                self._erase_dataset(erased, application)
        except Exception as error:
            application.state = STATE.ERASURE_APPLICATION_STATE_FAILED
            application.error_message = getattr(error, "message", None) or f"internal error ({type(error).__name__})"
            with self.store.transaction() as session:
                self.store.put_erasure_application(session, application)
            raise
        application.state = STATE.ERASURE_APPLICATION_STATE_COMPLETED
        application.complete_time.FromDatetime(dt.datetime.now(dt.UTC))
        self.audit.report(
            SecurityEvent.DATA_ERASED,
            resource=application.name,
            action="ApplyErasureReceipt",
            detail=f"applied {receipt_name}: {application.offline_rows_removed} offline rows, {application.online_keys_removed} online keys removed",
            attributes={"erasure_receipt": receipt_name, "receipt_digest": receipt.receipt_digest},
            report_id=f"features-erasure-{receipt_id}",
        )
        with self.store.transaction() as session:
            self.store.put_erasure_application(session, application)
        return application

    def _erase_dataset(self, erased: ErasedKeys, application: messages.ErasureApplication) -> None:
        with self.store.transaction() as session:
            snapshots = self.store.snapshots_of(session, erased.dataset)
            views = self.store.list_feature_views(session, dataset=erased.dataset)
            entities = {e.name: e for e in self.store.list_entities(session)}
        for snapshot in snapshots:
            removed = _without_keys(snapshot.path, erased) if Path(snapshot.path).exists() else 0
            if removed:
                application.offline_rows_removed += removed
                with self.store.transaction() as session:
                    held = self.store.get_snapshot(session, snapshot.dataset_version)
                    if held is not None:
                        self.store.put_snapshot(session, OfflineSnapshot(**{**held.__dict__, "row_count": held.row_count - removed}))
        for view in views:
            if view.name not in application.feature_views:
                application.feature_views.append(view.name)
            if not view.online:
                continue
            dataset_column = {target: column for column, target in view.source.field_mapping.items()}
            join_keys = [(k.name, k.value_type) for e in view.entities for k in (entities[e].join_keys if e in entities else ())]
            positions = []
            for name, _ in join_keys:
                column = dataset_column.get(name, name)
                if column not in erased.entity_key_columns:
                    raise InvalidArgument(
                        f"{view.name} is keyed by {name!r}, which the receipt's keys of {erased.dataset} do not include",
                        reason="RECEIPT_KEYS_MISMATCH",
                    )
                positions.append(erased.entity_key_columns.index(dataset_column.get(name, name)))
            keys = [
                EntityKey(
                    join_keys=[n for n, _ in join_keys],
                    entity_values=[_key_value(key[p], t) for (_, t), p in zip(join_keys, positions, strict=True)],
                )
                for key in erased.keys
            ]
            application.online_keys_removed += self.repo.delete_online_keys(names.parse(view.name, names.FEATURE_VIEWS), keys)

    def list_applications(self, request: requests.ListErasureApplicationsRequest) -> tuple[list[messages.ErasureApplication], str]:
        with self.store.transaction() as session:
            found = self.store.list_erasure_applications(session, request.erasure_receipt)
        return paginate(found, request.page_size, request.page_token, {"erasure_receipt": request.erasure_receipt})
