"""Validation and cleansing: bad rows go to quarantine with rule and reason, and can be fixed and re-submitted."""

from __future__ import annotations

import json

import grpc
import pyarrow as pa
import pytest
from google.protobuf import field_mask_pb2

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from tests.ingest.conftest import (
    ALICE,
    IngestUnderTest,
    column,
    create_dataset,
    ingest_tables,
    payments,
    quarantined,
    read_version,
    status_of,
    versions_of,
)


def _bad_payments() -> pa.Table:
    """Five rows: two fine, three failing different checks (one fails two)."""
    good = payments(range(5)).to_pylist()
    good[1]["amount"] = 75_000.0  # above the maximum
    good[2]["channel"] = "fax"  # not an allowed category
    good[2]["email"] = "not-an-address"  # fails the regex too
    good[3]["customer_id"] = None  # NOT NULL
    return pa.Table.from_pylist(good, schema=payments(range(1)).schema)


def test_failing_rows_are_quarantined_with_every_rule_and_reason_and_the_rest_committed(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    ingestion = ingest_tables(ingest, dataset, [_bad_payments()])

    report = ingestion.report
    assert (report.rows_in, report.rows_accepted, report.rows_quarantined, report.rows_deduplicated) == (5, 2, 3, 0)
    by_reason = {(m.ValidationRule.Name(v.rule), v.column): v.row_count for v in report.quarantined_by_reason}
    assert by_reason == {
        ("VALIDATION_RULE_RANGE", "amount"): 1,
        ("VALIDATION_RULE_ALLOWED_VALUES", "channel"): 1,
        ("VALIDATION_RULE_REGEX", "email"): 1,
        ("VALIDATION_RULE_NOT_NULL", "customer_id"): 1,
    }
    assert read_version(ingest, ingestion.dataset_version).column("payment_id").to_pylist() == [0, 4]

    rows = quarantined(ingest, dataset)
    assert [r.row_index for r in rows] == [1, 2, 3]
    assert all(r.ingestion == ingestion.name and r.state == m.QUARANTINE_STATE_QUARANTINED for r in rows)
    assert all(r.schema_version == f"{dataset}/schemaVersions/1.0" for r in rows)
    reasons = {r.row_index: [(m.ValidationRule.Name(v.rule), v.column, v.reason) for v in r.violations] for r in rows}
    assert reasons[1] == [("VALIDATION_RULE_RANGE", "amount", "value 75000.0 is above the maximum 50000")]
    assert reasons[2] == [
        ("VALIDATION_RULE_ALLOWED_VALUES", "channel", "value 'fax' is not one of: pos, online, atm"),
        ("VALIDATION_RULE_REGEX", "email", "value 'not-an-address' does not match /[^@\\s]+@[^@\\s]+/"),
    ]
    assert reasons[3] == [("VALIDATION_RULE_NOT_NULL", "customer_id", "null in a non-nullable column")]
    assert json.loads(rows[0].values_json)["amount"] == 75000.0  # the row as received

    only_regex = quarantined(ingest, dataset, rule=m.VALIDATION_RULE_REGEX)
    assert [r.row_index for r in only_regex] == [2]
    assert [r.row_index for r in quarantined(ingest, dataset, column="customer_id")] == [3]
    page = ingest.stub.ListQuarantinedRows(rr.ListQuarantinedRowsRequest(parent=dataset, page_size=2), metadata=ALICE)
    assert len(page.quarantined_rows) == 2 and page.next_page_token
    with pytest.raises(grpc.RpcError) as other_filter:
        ingest.stub.ListQuarantinedRows(
            rr.ListQuarantinedRowsRequest(parent=dataset, page_token=page.next_page_token, column="amount"), metadata=ALICE
        )
    assert status_of(other_filter.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


def test_fixed_rows_resubmitted_are_committed_as_a_new_version_and_the_rest_stay_with_new_reasons(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    ingestion = ingest_tables(ingest, dataset, [_bad_payments()])
    rows = {r.row_index: r for r in quarantined(ingest, dataset)}
    fixed_amount = json.loads(rows[1].values_json) | {"amount": 750.0}
    still_bad = json.loads(rows[2].values_json) | {"channel": "online"}  # the e-mail is still wrong
    request = rr.ResubmitQuarantinedRowsRequest(
        parent=dataset,
        corrections=[
            rr.RowCorrection(quarantined_row=rows[1].name, values_json=json.dumps(fixed_amount)),
            rr.RowCorrection(quarantined_row=rows[2].name, values_json=json.dumps(still_bad)),
        ],
        request_id="fix-1",
    )
    response = ingest.stub.ResubmitQuarantinedRows(request, metadata=ALICE)

    assert response.ingestion.source_kind == m.SOURCE_KIND_QUARANTINE_RESUBMISSION
    assert (response.ingestion.report.rows_accepted, response.ingestion.report.rows_quarantined) == (1, 1)
    assert [r.name for r in response.still_quarantined] == [rows[2].name]
    assert [(m.ValidationRule.Name(v.rule), v.column) for v in response.still_quarantined[0].violations] == [
        ("VALIDATION_RULE_REGEX", "email")
    ]
    assert response.still_quarantined[0].resubmit_attempts == 1
    version = versions_of(ingest, dataset)[0]
    assert version.name == response.ingestion.dataset_version and version.row_count == 3
    assert list(version.lineage.resubmitted_rows) == [rows[1].name]
    assert read_version(ingest, version.name).column("payment_id").to_pylist() == [0, 4, 1]

    resolved = quarantined(ingest, dataset, state=m.QUARANTINE_STATE_RESUBMITTED)
    assert [(r.name, r.accepted_by_ingestion) for r in resolved] == [(rows[1].name, response.ingestion.name)]
    assert resolved[0].resolve_stamp.actor == "spiffe://falaj.local/client/alice"
    # The retry of the same request answers the same; a resolved row cannot be re-submitted again.
    assert ingest.stub.ResubmitQuarantinedRows(request, metadata=ALICE) == response
    with pytest.raises(grpc.RpcError) as settled:
        ingest.stub.ResubmitQuarantinedRows(
            rr.ResubmitQuarantinedRowsRequest(parent=dataset, corrections=[rr.RowCorrection(quarantined_row=rows[1].name)]), metadata=ALICE
        )
    assert status_of(settled.value) == (grpc.StatusCode.FAILED_PRECONDITION, "ROW_NOT_QUARANTINED")

    # Every still-quarantined row of the ingestion, after the policy learns to fill the missing customer.
    policy = m.CleansingPolicy(trim_strings=True, column_rules=[m.ColumnCleansingRule(column="customer_id", null_fill_value="unknown")])
    ingest.stub.UpdateDataset(
        rr.UpdateDatasetRequest(
            dataset=m.Dataset(name=dataset, cleansing=policy), update_mask=field_mask_pb2.FieldMask(paths=["cleansing"])
        ),
        metadata=ALICE,
    )
    again = ingest.stub.ResubmitQuarantinedRows(rr.ResubmitQuarantinedRowsRequest(parent=dataset, ingestion=ingestion.name), metadata=ALICE)
    assert (again.ingestion.report.rows_accepted, again.ingestion.report.rows_quarantined) == (1, 1)
    assert [r.name for r in again.still_quarantined] == [rows[2].name]


def test_discarding_quarantined_rows_needs_a_reason_and_is_audited(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    ingest_tables(ingest, dataset, [_bad_payments()])
    rows = quarantined(ingest, dataset)
    with pytest.raises(grpc.RpcError) as no_reason:
        ingest.stub.DiscardQuarantinedRows(
            rr.DiscardQuarantinedRowsRequest(parent=dataset, quarantined_rows=[rows[0].name]), metadata=ALICE
        )
    assert status_of(no_reason.value) == (grpc.StatusCode.INVALID_ARGUMENT, "REASON_REQUIRED")
    discarded = ingest.stub.DiscardQuarantinedRows(
        rr.DiscardQuarantinedRowsRequest(parent=dataset, quarantined_rows=[rows[0].name], reason="test transaction from the acquirer"),
        metadata=ALICE,
    )
    assert discarded.discarded_count == 1
    gone = quarantined(ingest, dataset, state=m.QUARANTINE_STATE_DISCARDED)
    assert [(r.name, r.discard_reason) for r in gone] == [(rows[0].name, "test transaction from the acquirer")]
    [event] = ingest.audit.of(gateway_messages.SECURITY_EVENT_TYPE_OTHER)
    assert (event.resource, event.action, event.attributes["event_name"]) == (
        dataset,
        "discard_quarantined_rows",
        "QUARANTINED_ROWS_DISCARDED",
    )


def test_cleansing_trims_coerces_fills_and_deduplicates_and_counts_every_action(ingest: IngestUnderTest) -> None:
    schema = m.Schema(
        columns=[
            column("order_id", m.COLUMN_TYPE_INT),
            column("city", m.COLUMN_TYPE_CATEGORY, allowed_values=["dubai", "abu dhabi"]),
            column("score", m.COLUMN_TYPE_FLOAT, nullable=True, range=m.RangeConstraint(min=0, max=1)),
            column("seen_at", m.COLUMN_TYPE_TIMESTAMP),
            column("vip", m.COLUMN_TYPE_BOOL),
        ],
        event_time_column="seen_at",
        unique_key_columns=["order_id"],
    )
    policy = m.CleansingPolicy(
        coerce_types=True,
        trim_strings=True,
        null_tokens=["", "NA"],
        extra_columns=m.EXTRA_COLUMN_POLICY_IGNORE,
        default_timezone="Asia/Dubai",
        deduplication=m.DEDUPLICATION_MODE_KEY_KEEP_LATEST,
        column_rules=[
            m.ColumnCleansingRule(column="city", lowercase=True),
            m.ColumnCleansingRule(column="score", clip_to_range=True),
            m.ColumnCleansingRule(column="vip", null_fill_value="false"),
        ],
    )
    dataset = create_dataset(ingest, "orders", schema, cleansing=policy).name
    table = pa.table(
        {
            "order_id": ["1", "2", "2", "3", "x"],
            "city": ["  Dubai ", "ABU DHABI", "abu dhabi", "dubai", "dubai"],
            "score": ["0.5", "1.7", "NA", "0.2", "0.1"],
            "seen_at": ["2025-03-01 10:00:00", "2025-03-01T08:00:00Z", "2025-03-01T09:00:00Z", "2025-03-02 01:00", "2025-03-01 00:00"],
            "vip": ["true", None, "false", "1", "0"],
            "debug": ["a", "b", "c", "d", "e"],
        }
    )
    ingestion = ingest_tables(ingest, dataset, [table])
    report = ingestion.report
    actions = {(m.CleansingAction.Name(c.action), c.column): c.value_count for c in report.cleansing_actions}
    assert actions == {
        ("CLEANSING_ACTION_TRIM", "city"): 1,
        ("CLEANSING_ACTION_LOWERCASE", "city"): 2,
        ("CLEANSING_ACTION_NULL_TOKEN", "score"): 1,
        ("CLEANSING_ACTION_COERCE", "order_id"): 4,  # "x" is a TYPE failure, not a coercion
        ("CLEANSING_ACTION_COERCE", "score"): 4,
        ("CLEANSING_ACTION_COERCE", "seen_at"): 5,
        ("CLEANSING_ACTION_COERCE", "vip"): 4,
        ("CLEANSING_ACTION_NULL_FILL", "vip"): 1,
        ("CLEANSING_ACTION_CLIP", "score"): 1,
        ("CLEANSING_ACTION_DEDUPLICATE", ""): 1,
        ("CLEANSING_ACTION_DROP_EXTRA_COLUMN", "debug"): 5,
    }
    assert list(report.ignored_columns) == ["debug"]
    assert (report.rows_in, report.rows_accepted, report.rows_quarantined, report.rows_deduplicated) == (5, 3, 1, 1)
    rows = read_version(ingest, ingestion.dataset_version).to_pylist()
    by_id = {r["order_id"]: r for r in rows}
    assert by_id[1]["city"] == "dubai" and by_id[1]["seen_at"].isoformat() == "2025-03-01T06:00:00+00:00"  # Dubai is UTC+4
    assert by_id[2]["score"] is None and by_id[2]["seen_at"].isoformat() == "2025-03-01T09:00:00+00:00"  # the latest of the two
    assert by_id[2]["vip"] is False and by_id[3]["vip"] is True
    [bad] = quarantined(ingest, dataset)
    assert [(m.ValidationRule.Name(v.rule), v.column) for v in bad.violations] == [("VALIDATION_RULE_TYPE", "order_id")]
    assert bad.violations[0].reason == "value 'x' is not a valid INT"

    # The unique key holds across commits: a repeat of order 3 is quarantined, not appended.
    later = ingest_tables(ingest, dataset, [table.slice(3, 1)])
    assert later.report.rows_quarantined == 1 and not later.dataset_version
    repeat = [r for r in quarantined(ingest, dataset) if r.ingestion == later.name]
    assert repeat[0].violations[0].reason == f"unique key (order_id=3) already exists in {dataset}/versions/1"
