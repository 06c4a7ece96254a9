"""The dataset catalog: declared datasets, their schema versions, and schema evolution.

Compatible changes make a minor schema version at once. Breaking changes need an
explicit migration and make a new major version; when the migration asks for it, the
latest data is rewritten under the new schema as a new version (rows that do not cast
go to quarantine or fail the migration, as each cast step says).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import Aborted, FailedPrecondition, InvalidArgument
from falaj_platform.services.ingest import names, paging
from falaj_platform.services.ingest.commits import Batch, Committer, IngestInput, Options, Origin, ParseFailure, now_utc
from falaj_platform.services.ingest.residency import ResidencyGuard
from falaj_platform.services.ingest.schema import (
    TEXT_TYPES,
    arrow_schema,
    arrow_type,
    check_cleansing,
    check_migration,
    check_schema,
    diff_schemas,
    parse_text_value,
    type_name,
)
from falaj_platform.services.ingest.storage import VersionStorage
from falaj_platform.services.ingest.store import IngestStore
from falaj_platform.services.ingest.validation import InputShape, cast_with_failures, coerce_text, rows_as_json

SERVICE = "/falaj.ingest.v1.IngestService/"
MUTABLE_DATASET_FIELDS = ("display_name", "description", "owner", "cleansing", "labels")


def apply_migration(
    table: pa.Table, migration: m.SchemaMigration, new_schema: m.Schema, batch_id: str
) -> tuple[pa.Table, list[ParseFailure]]:
    """The latest data under the new schema; rows whose cast fails with QUARANTINE come back as failures."""
    columns: dict[str, pa.ChunkedArray] = {name: table.column(name) for name in table.column_names}
    quarantine: dict[int, tuple[str, str]] = {}
    n = table.num_rows
    new_columns = {c.name: c for c in new_schema.columns}
    for step in migration.steps:
        kind = step.WhichOneof("step")
        if kind == "cast":
            name, to_type = step.cast.column, step.cast.to_type
            values = columns[name]
            if pa.types.is_dictionary(values.type):
                values = values.cast(values.type.value_type)
            if pa.types.is_string(values.type) and to_type not in TEXT_TYPES:
                cast, failed = coerce_text(values, to_type, "UTC", "")
            elif to_type == m.COLUMN_TYPE_CATEGORY:
                cast, failed = cast_with_failures(values, pa.string())
            else:
                cast, failed = cast_with_failures(values, arrow_type(to_type))
            if failed is not None and failed.any():
                action = step.cast.on_failure or m.CAST_FAILURE_ACTION_FAIL_MIGRATION
                bad = np.nonzero(failed)[0]
                if action == m.CAST_FAILURE_ACTION_FAIL_MIGRATION:
                    example = values.take(pa.array(bad[:3])).to_pylist()
                    raise FailedPrecondition(
                        f"{len(bad)} value(s) of {name!r} do not cast to {type_name(to_type)} (e.g. {example}); nothing was changed. "
                        "Fix the data or choose QUARANTINE or SET_NULL for this cast",
                        reason="MIGRATION_CAST_FAILED",
                    )
                if action == m.CAST_FAILURE_ACTION_QUARANTINE:
                    shown = values.take(pa.array(bad)).to_pylist()
                    for row, value in zip(bad.tolist(), shown, strict=True):
                        quarantine.setdefault(row, (name, f"value {value!r} does not cast to {type_name(to_type)}"))
            columns[name] = cast
        elif kind == "rename":
            columns = {(step.rename.new_name if k == step.rename.column else k): v for k, v in columns.items()}
        elif kind == "drop":
            columns.pop(step.drop.column, None)
        elif kind == "add":
            column = new_columns[step.add.column]
            if step.add.fill_null:
                columns[step.add.column] = pa.chunked_array(
                    [pa.nulls(n, arrow_type(column.type) if column.type not in TEXT_TYPES else pa.string())]
                )
            else:
                scalar = parse_text_value(step.add.fill_value, column.type)
                assert scalar is not None  # checked by check_migration
                columns[step.add.column] = pa.chunked_array([pa.repeat(scalar, n)])
    migrated = pa.table(columns) if columns else pa.table({})
    failures: list[ParseFailure] = []
    if quarantine:
        rows = sorted(quarantine)
        originals = rows_as_json(table, rows)
        failures = [
            ParseFailure(batch_id, row, json.loads(original), quarantine[row][1], rule=m.VALIDATION_RULE_TYPE, column=quarantine[row][0])
            for row, original in zip(rows, originals, strict=True)
        ]
        keep = np.ones(n, dtype=bool)
        keep[rows] = False
        migrated = migrated.filter(pa.array(keep))
    return migrated, failures


class Catalog:
    """Datasets and schema versions."""

    def __init__(self, store: IngestStore, storage: VersionStorage, committer: Committer, guard: ResidencyGuard):
        self.store = store
        self.storage = storage
        self.committer = committer
        self.guard = guard

    # -- datasets --------------------------------------------------------------------------------
    def create_dataset(self, request: rr.CreateDatasetRequest, caller: str) -> rr.CreateDatasetResponse:
        dataset_id = names.check_id(request.dataset_id, "dataset_id")
        dataset = m.Dataset()
        dataset.CopyFrom(request.dataset)
        if not dataset.HasField("schema"):
            raise InvalidArgument("dataset.schema is required", reason="SCHEMA_REQUIRED")
        if not dataset.residency.region:
            raise InvalidArgument("dataset.residency.region is required (e.g. ae-dxb)", reason="RESIDENCY_REQUIRED")
        check_schema(dataset.schema)
        check_cleansing(dataset.cleansing, dataset.schema)
        dataset.owner = dataset.owner or caller
        dataset.name = names.dataset_name(dataset_id)
        self.guard(dataset, "create", caller)
        for output_only in ("schema_version", "latest_version", "create_stamp", "update_stamp", "etag"):
            dataset.ClearField(output_only)
        if request.validate_only:
            dataset.schema_version = names.schema_version_name(dataset_id, 1, 0)
            return rr.CreateDatasetResponse(dataset=dataset)
        return self.store.idempotent(
            SERVICE + "CreateDataset",
            request,
            rr.CreateDatasetResponse,
            lambda session: rr.CreateDatasetResponse(dataset=self.store.insert_dataset(session, dataset_id, dataset, caller, now_utc())),
        )

    def get_dataset(self, name: str) -> m.Dataset:
        return self.store.get_dataset(names.parse_dataset(name))

    def list_datasets(self, request: rr.ListDatasetsRequest) -> rr.ListDatasetsResponse:
        size = paging.page_size(request.page_size, 50)
        found = self.store.list_datasets(request.owner, request.residency_region)
        wanted = dict(request.labels)
        if wanted:
            found = [d for d in found if all(d.labels.get(k) == v for k, v in wanted.items())]
        filters = {"owner": request.owner, "region": request.residency_region, "labels": wanted}
        page, token = paging.paginate(found, size, request.page_token, filters)
        return rr.ListDatasetsResponse(datasets=page, next_page_token=token)

    def update_dataset(self, request: rr.UpdateDatasetRequest, caller: str) -> rr.UpdateDatasetResponse:
        dataset_id = names.parse_dataset(request.dataset.name, "dataset.name")
        paths = list(request.update_mask.paths) or list(MUTABLE_DATASET_FIELDS)
        for path in paths:
            if path in ("schema", "schema_version") or path.startswith("schema."):
                raise InvalidArgument("the schema changes only through EvolveSchema", reason="SCHEMA_NOT_UPDATABLE")
            if path == "residency" or path.startswith("residency."):
                raise InvalidArgument(
                    "residency cannot change: moving data to another region is a governed act", reason="RESIDENCY_IMMUTABLE"
                )
            if path.split(".", 1)[0] not in MUTABLE_DATASET_FIELDS:
                raise InvalidArgument(
                    f"field {path!r} cannot be updated (mutable: {', '.join(MUTABLE_DATASET_FIELDS)})", reason="FIELD_NOT_MUTABLE"
                )

        def write(session: Any) -> rr.UpdateDatasetResponse:
            current = self.store.lock_dataset(session, dataset_id)
            if request.dataset.etag and request.dataset.etag != current.etag:
                raise Aborted(f"dataset {current.name} changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
            updated = m.Dataset()
            updated.CopyFrom(current)
            for path in paths:
                root = path.split(".", 1)[0]
                if root == "labels":
                    updated.labels.clear()
                    updated.labels.update(request.dataset.labels)
                elif root == "cleansing":
                    updated.cleansing.CopyFrom(request.dataset.cleansing)
                else:
                    setattr(updated, root, getattr(request.dataset, root))
            if not updated.owner:
                raise InvalidArgument("owner cannot be empty", reason="OWNER_REQUIRED")
            check_cleansing(updated.cleansing, updated.schema)
            return rr.UpdateDatasetResponse(dataset=self.store.update_dataset(session, dataset_id, updated, caller, now_utc()))

        return self.store.idempotent(SERVICE + "UpdateDataset", request, rr.UpdateDatasetResponse, write)

    def delete_dataset(
        self, request: rr.DeleteDatasetRequest, caller: str, stop_sources: Callable[[str], None]
    ) -> rr.DeleteDatasetResponse:
        dataset_id = names.parse_dataset(request.name)
        self.store.get_dataset(dataset_id)
        if request.force:
            stop_sources(dataset_id)
        with self.committer.dataset_lock(dataset_id):
            response = self.store.idempotent(
                SERVICE + "DeleteDataset",
                request,
                rr.DeleteDatasetResponse,
                lambda session: rr.DeleteDatasetResponse(
                    versions_deleted=self.store.delete_dataset(session, dataset_id, request.etag, request.force)
                ),
            )
            self.storage.delete_dataset(dataset_id)
        return response

    # -- schema versions -------------------------------------------------------------------------------
    def evolve_schema(self, request: rr.EvolveSchemaRequest, caller: str) -> rr.EvolveSchemaResponse:
        dataset_id = names.parse_dataset(request.dataset, "dataset")
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "evolve_schema", caller)
        replay = self.store.replay(SERVICE + "EvolveSchema", request, rr.EvolveSchemaResponse)
        if replay is not None:
            return replay
        if request.expected_schema_version and request.expected_schema_version != dataset.schema_version:
            raise Aborted(
                f"the proposal is based on {request.expected_schema_version} but the dataset is at {dataset.schema_version}",
                reason="SCHEMA_VERSION_CHANGED",
            )
        if not request.HasField("schema"):
            raise InvalidArgument("schema is required", reason="SCHEMA_REQUIRED")
        check_schema(request.schema)
        migration = request.migration if request.HasField("migration") else None
        evolution = diff_schemas(dataset.schema, request.schema, migration)
        if not evolution.changes and dataset.schema == request.schema:
            raise InvalidArgument("the proposed schema equals the current one", reason="SCHEMA_UNCHANGED")
        current = dataset.schema_version.rsplit("/", 1)[-1]
        major, minor = (int(x) for x in current.split("."))
        if evolution.breaking:
            if migration is None:
                listed = "; ".join(f"{c.column or '(roles)'}: {c.detail}" for c in evolution.changes if c.breaking)
                raise FailedPrecondition(f"breaking change(s) need a migration: {listed}", reason="MIGRATION_REQUIRED")
            check_migration(dataset.schema, request.schema, migration)
            major, minor = major + 1, 0
        else:
            minor += 1
        check_cleansing(dataset.cleansing, request.schema)
        version = m.SchemaVersion(
            name=names.schema_version_name(dataset_id, major, minor),
            major=major,
            minor=minor,
            schema=request.schema,
            change_kind=evolution.kind,  # type: ignore[arg-type]
            changes=evolution.changes,
        )
        if evolution.breaking and migration is not None:
            version.migration.CopyFrom(migration)
        version.create_stamp.actor = caller
        version.create_stamp.time.FromDatetime(now_utc())
        if request.validate_only:
            return rr.EvolveSchemaResponse(schema_version=version)
        rewrite = evolution.breaking and migration is not None and migration.rewrite_latest_version
        migrated: tuple[pa.Table, list[ParseFailure], str] | None = None
        if rewrite:
            with self.store.transaction() as session:
                latest = self.store.version_record(session, dataset_id, None)
            if latest is not None:
                assert migration is not None
                old_table = self.storage.read_table(latest.files, arrow_schema(dataset.schema))
                label = names.version_name(dataset_id, latest.number)
                table, failures = apply_migration(old_table, migration, request.schema, label)
                migrated = (table, failures, label)

        def write(session: Any) -> rr.EvolveSchemaResponse:
            locked = self.store.lock_dataset(session, dataset_id)
            if locked.schema_version != dataset.schema_version:
                raise Aborted(f"the schema of {dataset.name} changed meanwhile; read it again", reason="SCHEMA_VERSION_CHANGED")
            self.store.insert_schema_version(session, dataset_id, version, caller, now_utc())
            return rr.EvolveSchemaResponse(schema_version=self.store.get_schema_version_in(session, dataset_id, major, minor))

        with self.committer.dataset_lock(dataset_id):
            response = self.store.idempotent(SERVICE + "EvolveSchema", request, rr.EvolveSchemaResponse, write)
        if migrated is not None and not response.HasField("migration_ingestion"):
            table, failures, label = migrated
            ingestion = self.committer.run(
                dataset_id,
                lambda: IngestInput(batches=[Batch(label, table)], shape=InputShape(), parse_failures=failures, derived_from=[label]),
                Origin(m.SOURCE_KIND_SCHEMA_MIGRATION, f"migration of {label} to schema {major}.{minor}"),
                Options(m.WRITE_MODE_OVERWRITE),
                lambda i: i,
                m.Ingestion,
                caller,
            )
            if ingestion.dataset_version:
                number = int(ingestion.dataset_version.rsplit("/", 1)[-1])
                with self.store.transaction() as session:
                    self.store.set_migrated_version(session, dataset_id, major, minor, number)
            response = rr.EvolveSchemaResponse(
                schema_version=self.store.get_schema_version(dataset_id, major, minor), migration_ingestion=ingestion
            )
            self.store.update_remembered(request.request_id, response)
        return response

    def get_schema_version(self, name: str) -> m.SchemaVersion:
        dataset_id, major, minor = names.parse_schema_version(name)
        return self.store.get_schema_version(dataset_id, major, minor)

    def list_schema_versions(self, request: rr.ListSchemaVersionsRequest) -> rr.ListSchemaVersionsResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        found = self.store.list_schema_versions(dataset_id)
        page, token = paging.paginate(found, paging.page_size(request.page_size, 50), request.page_token, {"parent": dataset_id})
        return rr.ListSchemaVersionsResponse(schema_versions=page, next_page_token=token)
