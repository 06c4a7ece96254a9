"""Quarantine: rows that failed validation, kept with every reason until fixed or discarded.

Re-submission sends rows (corrected, or as they are after a schema or cleansing change)
through the same validation as any ingestion: rows that pass are committed together as
one new version; rows that fail stay quarantined with their new reasons.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument
from falaj_platform.runtime.idempotency import request_digest
from falaj_platform.services.ingest import names, paging
from falaj_platform.services.ingest.commits import Batch, Committer, Idempotency, IngestInput, Options, Origin, ParseFailure, now_utc
from falaj_platform.services.ingest.residency import AuditSink, ResidencyGuard
from falaj_platform.services.ingest.store import IngestStore, NewQuarantinedRow
from falaj_platform.services.ingest.validation import InputShape, table_from_records

SERVICE = "/falaj.ingest.v1.IngestService/"
MAX_ROWS = 10_000
RAW_KEYS = {"_raw", "_raw_line", "_raw_bytes"}


class _ResubmitHooks:
    """Updates the re-submitted rows in the commit transaction instead of quarantining copies."""

    def __init__(self, store: IngestStore, dataset_id: str, record_ids: list[str], failure_ids: list[str], actor: str):
        self.store = store
        self.dataset_id = dataset_id
        self.record_ids = record_ids
        self.failure_ids = failure_ids
        self.actor = actor
        self.still: list[str] = []
        self.still_rows: list[m.QuarantinedRow] = []

    def quarantine(
        self, session: Session, ingestion_id: str, schema_version: str, rows: list[NewQuarantinedRow], input_rows: list[int]
    ) -> None:
        parse_failures = iter(self.failure_ids)
        for row, input_row in zip(rows, input_rows, strict=True):
            row_id = self.record_ids[input_row] if input_row >= 0 else next(parse_failures)
            self.store.requarantine(session, self.dataset_id, row_id, row.values_json, row.violations, schema_version)
            self.still.append(row_id)

    def after_commit(self, session: Session, ingestion: m.Ingestion, rejected_input_rows: set[int]) -> None:
        accepted = [row_id for i, row_id in enumerate(self.record_ids) if i not in rejected_input_rows]
        self.store.resolve_resubmitted(session, self.dataset_id, accepted, ingestion.name.rsplit("/", 1)[-1], self.actor, now_utc())
        self.still_rows = self.store.quarantined_by_ids(session, self.dataset_id, self.still) if self.still else []


class Quarantine:
    def __init__(self, store: IngestStore, committer: Committer, guard: ResidencyGuard, audit: AuditSink):
        self.store = store
        self.committer = committer
        self.guard = guard
        self.audit = audit

    def list_rows(self, request: rr.ListQuarantinedRowsRequest, caller: str) -> rr.ListQuarantinedRowsResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        self.guard(self.store.get_dataset(dataset_id), "read_quarantine", caller)
        size = paging.page_size(request.page_size, 100)
        ingestion = names.parse_child(request.ingestion, "ingestions")[1] if request.ingestion else ""
        filters = {"p": dataset_id, "s": request.state, "r": request.rule, "c": request.column, "i": ingestion}
        offset = paging.decode(request.page_token, filters)
        rows, more = self.store.list_quarantined(
            dataset_id, state=request.state, rule=request.rule, column=request.column, ingestion=ingestion, offset=offset, limit=size
        )
        return rr.ListQuarantinedRowsResponse(quarantined_rows=rows, next_page_token=paging.encode(offset + size, filters) if more else "")

    def _row_ids(self, dataset_id: str, request: rr.ResubmitQuarantinedRowsRequest) -> tuple[list[str], dict[str, dict[str, Any]]]:
        if len(request.corrections) > MAX_ROWS:
            raise InvalidArgument(f"at most {MAX_ROWS} corrections per call", reason="TOO_MANY_ROWS")
        row_ids: list[str] = []
        overrides: dict[str, dict[str, Any]] = {}
        for correction in request.corrections:
            owner, row_id = names.parse_child(correction.quarantined_row, "quarantinedRows")
            if owner != dataset_id:
                raise InvalidArgument(
                    f"{correction.quarantined_row} is not a row of {names.dataset_name(dataset_id)}", reason="ROW_OF_OTHER_DATASET"
                )
            if correction.values_json:
                try:
                    values = json.loads(correction.values_json)
                except json.JSONDecodeError as error:
                    raise InvalidArgument(
                        f"values_json of {correction.quarantined_row} is not JSON: {error.msg}", reason="INVALID_VALUES_JSON"
                    ) from None
                if not isinstance(values, dict):
                    raise InvalidArgument(
                        f"values_json of {correction.quarantined_row} must be a JSON object", reason="INVALID_VALUES_JSON"
                    )
                overrides[row_id] = values
            if row_id not in row_ids:
                row_ids.append(row_id)
        if request.ingestion:
            owner, ingestion_id = names.parse_child(request.ingestion, "ingestions")
            if owner != dataset_id:
                raise InvalidArgument(
                    f"{request.ingestion} is not an ingestion of {names.dataset_name(dataset_id)}", reason="INGESTION_OF_OTHER_DATASET"
                )
            self.store.get_ingestion(dataset_id, ingestion_id)
            with self.store.transaction() as session:
                row_ids.extend(r for r in self.store.quarantined_ids_of_ingestion(session, dataset_id, ingestion_id) if r not in overrides)
            row_ids = list(dict.fromkeys(row_ids))
        if not row_ids:
            raise InvalidArgument(
                "nothing to re-submit: give corrections or an ingestion with quarantined rows", reason="NOTHING_TO_RESUBMIT"
            )
        if len(row_ids) > MAX_ROWS:
            raise InvalidArgument(f"at most {MAX_ROWS} rows per call; re-submit in parts", reason="TOO_MANY_ROWS")
        return row_ids, overrides

    def resubmit(self, request: rr.ResubmitQuarantinedRowsRequest, caller: str) -> rr.ResubmitQuarantinedRowsResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "resubmit", caller)
        method = SERVICE + "ResubmitQuarantinedRows"
        replay = self.store.replay(method, request, rr.ResubmitQuarantinedRowsResponse)
        if replay is not None:
            return replay
        row_ids, overrides = self._row_ids(dataset_id, request)
        with self.store.transaction() as session:
            rows = self.store.quarantined_by_ids(session, dataset_id, row_ids)
        settled = [r.name for r in rows if r.state != m.QUARANTINE_STATE_QUARANTINED]
        if settled:
            raise FailedPrecondition(f"row(s) {', '.join(settled[:5])} are no longer quarantined", reason="ROW_NOT_QUARANTINED")
        records: list[dict[str, Any]] = []
        record_ids: list[str] = []
        record_batches: list[str] = []
        failures: list[ParseFailure] = []
        failure_ids: list[str] = []
        for row in rows:
            row_id = row.name.rsplit("/", 1)[-1]
            values = overrides.get(row_id) or json.loads(row.values_json)
            if set(values) and set(values) <= RAW_KEYS:
                failures.append(
                    ParseFailure(
                        row.batch_id, row.row_index, values, "the record still cannot be parsed; give the corrected row as values_json"
                    )
                )
                failure_ids.append(row_id)
                continue
            records.append(values)
            record_ids.append(row_id)
            record_batches.append(row.batch_id)
        schema = dataset.schema
        hooks = _ResubmitHooks(self.store, dataset_id, record_ids, failure_ids, caller)

        def read() -> IngestInput:
            table = table_from_records(records, schema)
            return IngestInput(
                batches=[Batch("resubmission", table, row_batch_ids=record_batches)],
                shape=InputShape(text=True),
                parse_failures=failures,
                batches_received=1,
                resubmitted_rows=[names.quarantined_row_name(dataset_id, r) for r in record_ids],
            )

        return self.committer.run(
            dataset_id,
            read,
            Origin(m.SOURCE_KIND_QUARANTINE_RESUBMISSION, f"re-submission of {len(rows)} quarantined row(s)"),
            Options(m.WRITE_MODE_APPEND, request.validate_only),
            lambda ingestion: rr.ResubmitQuarantinedRowsResponse(ingestion=ingestion, still_quarantined=hooks.still_rows),
            rr.ResubmitQuarantinedRowsResponse,
            caller,
            idempotency=Idempotency(method, request.request_id, request_digest(request)) if request.request_id else None,
            hooks=hooks,
        )

    def discard(self, request: rr.DiscardQuarantinedRowsRequest, caller: str) -> rr.DiscardQuarantinedRowsResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "discard_quarantine", caller)
        if not request.reason.strip():
            raise InvalidArgument("reason is required: say why the rows are given up", reason="REASON_REQUIRED")
        if not request.quarantined_rows:
            raise InvalidArgument("quarantined_rows is empty", reason="NOTHING_TO_DISCARD")
        if len(request.quarantined_rows) > MAX_ROWS:
            raise InvalidArgument(f"at most {MAX_ROWS} rows per call", reason="TOO_MANY_ROWS")
        row_ids = []
        for name in request.quarantined_rows:
            owner, row_id = names.parse_child(name, "quarantinedRows")
            if owner != dataset_id:
                raise InvalidArgument(f"{name} is not a row of {dataset.name}", reason="ROW_OF_OTHER_DATASET")
            row_ids.append(row_id)

        def write(session: Session) -> rr.DiscardQuarantinedRowsResponse:
            self.store.quarantined_by_ids(session, dataset_id, row_ids)
            # Audited first: a discard that cannot be recorded does not happen.
            self.audit.report(
                gateway_messages.SECURITY_EVENT_TYPE_OTHER,
                resource=dataset.name,
                action="discard_quarantined_rows",
                detail=f"discarded {len(row_ids)} quarantined row(s): {request.reason}"[:500],
                attributes={"event_name": "QUARANTINED_ROWS_DISCARDED", "rows": str(len(row_ids))},
                caller=caller,
            )
            count = self.store.discard_quarantined(session, dataset_id, row_ids, request.reason, caller, now_utc())
            return rr.DiscardQuarantinedRowsResponse(discarded_count=count)

        return self.store.idempotent(SERVICE + "DiscardQuarantinedRows", request, rr.DiscardQuarantinedRowsResponse, write)
