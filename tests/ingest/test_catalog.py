"""The dataset catalog: declared schemas, evolution by version, residency, and lifecycle."""

from __future__ import annotations

import grpc
import pyarrow as pa
import pytest
from google.protobuf import field_mask_pb2

from falaj.common.v1 import common_pb2 as common
from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.services.ingest.config import IngestConfig
from tests.ingest.conftest import (
    ALICE,
    IngestUnderTest,
    column,
    create_dataset,
    ingest_tables,
    payments,
    payments_schema,
    quarantined,
    read_version,
    status_of,
    versions_of,
)


def test_a_dataset_is_declared_once_read_listed_updated_and_deleted(ingest: IngestUnderTest) -> None:
    created = create_dataset(ingest, "payments", request_id="create-1")
    assert created.name == "datasets/payments" and created.schema_version == "datasets/payments/schemaVersions/1.0"
    assert created.owner == "spiffe://falaj.local/client/alice" and created.etag
    assert create_dataset(ingest, "payments", request_id="create-1") == created  # retried create
    with pytest.raises(grpc.RpcError) as exists:
        create_dataset(ingest, "payments")
    assert status_of(exists.value) == (grpc.StatusCode.ALREADY_EXISTS, "DATASET_EXISTS")
    create_dataset(ingest, "refunds")
    fetched = ingest.stub.GetDataset(rr.GetDatasetRequest(name="datasets/payments"), metadata=ALICE).dataset
    assert fetched == created

    page = ingest.stub.ListDatasets(rr.ListDatasetsRequest(page_size=1), metadata=ALICE)
    assert [d.name for d in page.datasets] == ["datasets/payments"] and page.next_page_token
    rest = ingest.stub.ListDatasets(rr.ListDatasetsRequest(page_size=1, page_token=page.next_page_token), metadata=ALICE)
    assert [d.name for d in rest.datasets] == ["datasets/refunds"] and not rest.next_page_token

    changed = ingest.stub.UpdateDataset(
        rr.UpdateDatasetRequest(
            dataset=m.Dataset(
                name=created.name, description="Card payments from POS terminals", labels={"team": "risk"}, etag=created.etag
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "labels"]),
        ),
        metadata=ALICE,
    ).dataset
    assert changed.description == "Card payments from POS terminals" and changed.etag != created.etag
    assert [d.name for d in ingest.stub.ListDatasets(rr.ListDatasetsRequest(labels={"team": "risk"}), metadata=ALICE).datasets] == [
        created.name
    ]
    with pytest.raises(grpc.RpcError) as stale:
        ingest.stub.UpdateDataset(
            rr.UpdateDatasetRequest(
                dataset=m.Dataset(name=created.name, description="x", etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            metadata=ALICE,
        )
    assert status_of(stale.value) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    with pytest.raises(grpc.RpcError) as residency:
        ingest.stub.UpdateDataset(
            rr.UpdateDatasetRequest(
                dataset=m.Dataset(name=created.name, residency=common.Residency(region="ae-auh")),
                update_mask=field_mask_pb2.FieldMask(paths=["residency"]),
            ),
            metadata=ALICE,
        )
    assert status_of(residency.value) == (grpc.StatusCode.INVALID_ARGUMENT, "RESIDENCY_IMMUTABLE")

    ingest_tables(ingest, created.name, [payments(range(3))])
    with pytest.raises(grpc.RpcError) as not_empty:
        ingest.stub.DeleteDataset(rr.DeleteDatasetRequest(name=created.name), metadata=ALICE)
    assert status_of(not_empty.value) == (grpc.StatusCode.FAILED_PRECONDITION, "DATASET_NOT_EMPTY")
    deleted = ingest.stub.DeleteDataset(rr.DeleteDatasetRequest(name=created.name, force=True), metadata=ALICE)
    assert deleted.versions_deleted == 1
    assert not (ingest.data_dir / "datasets" / "payments").exists()
    with pytest.raises(grpc.RpcError) as gone:
        ingest.stub.GetDataset(rr.GetDatasetRequest(name=created.name), metadata=ALICE)
    assert status_of(gone.value) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")


def test_schemas_that_cannot_be_enforced_are_refused(ingest: IngestUnderTest) -> None:
    broken = m.Schema(
        columns=[
            column("id", m.COLUMN_TYPE_INT),
            column("id", m.COLUMN_TYPE_STRING),
            column("when", m.COLUMN_TYPE_STRING, regex="(unclosed"),
        ],
        event_time_column="when",
        unique_key_columns=["missing"],
    )
    with pytest.raises(grpc.RpcError) as refused:
        create_dataset(ingest, "broken", broken)
    code, reason = status_of(refused.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCHEMA")
    details = refused.value.details()
    for problem in ("declared twice", "regex is not valid RE2", "must be TIMESTAMP", "unique-key column 'missing'"):
        assert problem in details
    with pytest.raises(grpc.RpcError) as bad_id:
        create_dataset(ingest, "Bad Name")
    assert status_of(bad_id.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID")


def test_compatible_changes_make_a_minor_version_and_old_data_reads_under_the_new_schema(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    ingest_tables(ingest, dataset, [payments(range(3))])
    evolved = payments_schema()
    evolved.columns.add(name="terminal", type=m.COLUMN_TYPE_STRING, nullable=True)
    evolved.columns[2].constraints.range.max = 100_000  # relaxed
    response = ingest.stub.EvolveSchema(
        rr.EvolveSchemaRequest(dataset=dataset, schema=evolved, expected_schema_version=f"{dataset}/schemaVersions/1.0"), metadata=ALICE
    )
    version = response.schema_version
    assert (version.name, version.change_kind) == (f"{dataset}/schemaVersions/1.1", m.SCHEMA_CHANGE_KIND_COMPATIBLE)
    assert {(c.column, m.SchemaChangeType.Name(c.type), c.breaking) for c in version.changes} == {
        ("terminal", "SCHEMA_CHANGE_TYPE_COLUMN_ADDED", False),
        ("amount", "SCHEMA_CHANGE_TYPE_CONSTRAINTS_CHANGED", False),
    }
    ingest_tables(ingest, dataset, [payments(range(3, 5)).append_column("terminal", pa.array(["t-1", "t-2"]))])
    latest = read_version(ingest, f"{dataset}/versions/latest")
    assert latest.column("terminal").to_pylist() == [None, None, None, "t-1", "t-2"]
    assert read_version(ingest, f"{dataset}/versions/1").column_names == [c.name for c in payments_schema().columns]
    listed = ingest.stub.ListSchemaVersions(rr.ListSchemaVersionsRequest(parent=dataset), metadata=ALICE).schema_versions
    assert [v.name.rsplit("/", 1)[-1] for v in listed] == ["1.1", "1.0"]
    with pytest.raises(grpc.RpcError) as stale:
        ingest.stub.EvolveSchema(
            rr.EvolveSchemaRequest(dataset=dataset, schema=evolved, expected_schema_version=f"{dataset}/schemaVersions/1.0"), metadata=ALICE
        )
    assert status_of(stale.value) == (grpc.StatusCode.ABORTED, "SCHEMA_VERSION_CHANGED")
    with pytest.raises(grpc.RpcError) as outdated_stream:
        ingest.stub.IngestBatches(
            iter(
                [
                    rr.IngestBatchesRequest(
                        header=rr.IngestStreamHeader(dataset=dataset, expected_schema_version=f"{dataset}/schemaVersions/1.0")
                    )
                ]
            ),
            metadata=ALICE,
        )
    assert status_of(outdated_stream.value) == (grpc.StatusCode.FAILED_PRECONDITION, "SCHEMA_VERSION_MISMATCH")


def test_a_type_change_needs_a_migration_and_makes_a_major_version_rewriting_the_latest_data(ingest: IngestUnderTest) -> None:
    schema = payments_schema()
    schema.columns[0].type = m.COLUMN_TYPE_STRING  # payment ids arrive as text in v1
    dataset = create_dataset(ingest, "payments", schema).name
    rows = payments(range(4)).set_column(0, "payment_id", pa.array(["1", "2", "x-3", "4"]))
    ingest_tables(ingest, dataset, [rows])

    breaking = payments_schema()
    breaking.columns[0].type = m.COLUMN_TYPE_INT
    with pytest.raises(grpc.RpcError) as needs_migration:
        ingest.stub.EvolveSchema(rr.EvolveSchemaRequest(dataset=dataset, schema=breaking), metadata=ALICE)
    assert status_of(needs_migration.value) == (grpc.StatusCode.FAILED_PRECONDITION, "MIGRATION_REQUIRED")
    assert "type STRING -> INT" in needs_migration.value.details()

    def cast(action: int) -> m.SchemaMigration:
        step = m.MigrationStep(cast=m.CastColumn(column="payment_id", to_type=m.COLUMN_TYPE_INT, on_failure=action))  # type: ignore[arg-type]
        return m.SchemaMigration(steps=[step], rewrite_latest_version=True)

    with pytest.raises(grpc.RpcError) as cast_fails:
        ingest.stub.EvolveSchema(
            rr.EvolveSchemaRequest(dataset=dataset, schema=breaking, migration=cast(m.CAST_FAILURE_ACTION_FAIL_MIGRATION)), metadata=ALICE
        )
    assert status_of(cast_fails.value) == (grpc.StatusCode.FAILED_PRECONDITION, "MIGRATION_CAST_FAILED")
    assert ingest.stub.GetDataset(rr.GetDatasetRequest(name=dataset), metadata=ALICE).dataset.schema_version.endswith("/1.0")

    response = ingest.stub.EvolveSchema(
        rr.EvolveSchemaRequest(dataset=dataset, schema=breaking, migration=cast(m.CAST_FAILURE_ACTION_QUARANTINE), request_id="evolve-2"),
        metadata=ALICE,
    )
    version = response.schema_version
    assert (version.name, version.change_kind) == (f"{dataset}/schemaVersions/2.0", m.SCHEMA_CHANGE_KIND_BREAKING)
    migration = response.migration_ingestion
    assert migration.source_kind == m.SOURCE_KIND_SCHEMA_MIGRATION and migration.write_mode == m.WRITE_MODE_OVERWRITE
    assert (migration.report.rows_accepted, migration.report.rows_quarantined) == (3, 1)
    assert version.migrated_dataset_version == migration.dataset_version == f"{dataset}/versions/2"
    v2 = versions_of(ingest, dataset)[0]
    assert v2.schema_version == version.name and list(v2.lineage.derived_from_versions) == [f"{dataset}/versions/1"]
    migrated = read_version(ingest, v2.name)
    assert migrated.schema.field("payment_id").type == pa.int64() and migrated.column("payment_id").to_pylist() == [1, 2, 4]
    [failed_cast] = quarantined(ingest, dataset)
    assert [(m.ValidationRule.Name(v.rule), v.column) for v in failed_cast.violations] == [("VALIDATION_RULE_TYPE", "payment_id")]
    # Appends continue under 2.0; a retried EvolveSchema answers the same without a second rewrite.
    ingest_tables(ingest, dataset, [payments(range(10, 12))])
    again = ingest.stub.EvolveSchema(
        rr.EvolveSchemaRequest(dataset=dataset, schema=breaking, migration=cast(m.CAST_FAILURE_ACTION_QUARANTINE), request_id="evolve-2"),
        metadata=ALICE,
    )
    assert again.schema_version == response.schema_version
    assert [v.row_count for v in versions_of(ingest, dataset)] == [5, 3, 4]


def test_a_dataset_of_another_region_is_refused_unless_policy_allows_it_and_either_way_audited(
    start_ingest: object,
) -> None:
    strict: IngestUnderTest = start_ingest()  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as refused:
        create_dataset(strict, "auh_payments", region="ae-auh")
    assert status_of(refused.value) == (grpc.StatusCode.PERMISSION_DENIED, "RESIDENCY_REGION_MISMATCH")
    [denied] = strict.audit.of(gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS)
    assert (denied.resource, denied.action, denied.decision) == ("datasets/auh_payments", "create", gateway_messages.DECISION_DENY)
    assert denied.caller == "spiffe://falaj.local/client/alice" and denied.attributes["resource_region"] == "ae-auh"
    strict.stop()

    # Policy lets this service hold ae-auh data: allowed, and still audited.
    allowing: IngestUnderTest = start_ingest(config=IngestConfig(allowed_foreign_regions=frozenset({"ae-auh"})))  # type: ignore[operator]
    dataset = create_dataset(allowing, "auh_payments", region="ae-auh").name
    ingest_tables(allowing, dataset, [payments(range(2))])
    allowed = allowing.audit.of(gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS)
    assert [(r.action, r.decision) for r in allowed] == [
        ("create", gateway_messages.DECISION_ALLOW),
        ("write", gateway_messages.DECISION_ALLOW),
    ]
    allowing.stop()

    # The policy is withdrawn: the data stays, but is not served here any more.
    again: IngestUnderTest = start_ingest()  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as read_refused:
        read_version(again, f"{dataset}/versions/1")
    assert status_of(read_refused.value) == (grpc.StatusCode.PERMISSION_DENIED, "RESIDENCY_REGION_MISMATCH")
    with pytest.raises(grpc.RpcError) as write_refused:
        ingest_tables(again, dataset, [payments(range(2, 4))])
    assert status_of(write_refused.value) == (grpc.StatusCode.PERMISSION_DENIED, "RESIDENCY_REGION_MISMATCH")
    assert [(r.action, r.decision) for r in again.audit.of(gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS)] == [
        ("read", gateway_messages.DECISION_DENY),
        ("write", gateway_messages.DECISION_DENY),
    ]
