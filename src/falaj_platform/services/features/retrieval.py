"""Reads: online feature values (Falaj's API and Feast's serving contract) and
point-in-time-correct historical retrieval streamed as Arrow batches.

Online reads go to Feast's online store through Feast; this module resolves and checks
the request first (unknown view or feature -> NOT_FOUND naming it, entity key of the
wrong type -> INVALID_ARGUMENT) and then gives every value a status the way Feast's
contract defines them: PRESENT, NULL_VALUE (stored null), NOT_FOUND (nothing stored),
OUTSIDE_MAX_AGE (stored but older than the view's TTL; returned null).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pandas as pd
import pyarrow as pa
from feast.infra.offline_stores.offline_utils import DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
from feast.protos.feast.serving import ServingService_pb2 as feast_serving
from feast.protos.feast.types.Value_pb2 import RepeatedValue

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, InvalidArgument, NotFound
from falaj_platform.services.features import names, values
from falaj_platform.services.features.config import FeaturesConfig
from falaj_platform.services.features.feast_repo import FeastRepo
from falaj_platform.services.features.materialization import OfflineData
from falaj_platform.services.features.sources import DatasetSource
from falaj_platform.services.features.store import FeaturesStore

CONSENT_PURPOSES = ("training", "analytics")

PRESENT = feast_serving.FieldStatus.PRESENT
NULL_VALUE = feast_serving.FieldStatus.NULL_VALUE
NOT_FOUND = feast_serving.FieldStatus.NOT_FOUND
OUTSIDE_MAX_AGE = feast_serving.FieldStatus.OUTSIDE_MAX_AGE


@dataclass(frozen=True)
class ServedView:
    """What a read needs to know about one (on-demand) feature view."""

    view_id: str
    features: Mapping[str, int]  # name -> ValueType, in definition order
    ttl_seconds: int
    join_keys: Mapping[str, int]
    online: bool
    on_demand: bool = False
    request_fields: Mapping[str, int] = field(default_factory=dict)
    source_views: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputFeature:
    view_id: str
    feature: str
    output_name: str
    value_type: int
    ttl_seconds: int
    on_demand: bool = False

    @property
    def reference(self) -> str:
        return f"{self.view_id}:{self.feature}"


@dataclass(frozen=True)
class Resolution:
    """A feature selection, checked and resolved against the catalog."""

    outputs: tuple[OutputFeature, ...]
    feature_service: str  # id, or '' for explicit references
    join_keys: Mapping[str, int]
    request_fields: Mapping[str, int]
    views: tuple[str, ...]  # regular views read, for offline data

    @property
    def feast_selection(self) -> Sequence[str] | str:
        return self.feature_service or [o.reference for o in self.outputs]


@dataclass(frozen=True)
class _Catalog:
    views: Mapping[str, ServedView]
    # Service id -> [(view id, features (all when empty), alias)].
    services: Mapping[str, tuple[tuple[str, tuple[str, ...], str], ...]]
    built: float


class Reader:
    """Online and historical reads over the Feast store."""

    def __init__(self, store: FeaturesStore, repo: FeastRepo, source: DatasetSource, offline: OfflineData, config: FeaturesConfig):
        self.store = store
        self.repo = repo
        self.source = source
        self.offline = offline
        self.config = config
        self._catalog: _Catalog | None = None
        self._resolutions: dict[tuple[object, ...], Resolution] = {}
        self._lock = threading.Lock()

    # -- the served catalog (cached; rebuilt on local writes and when stale) ---------------
    def invalidate(self) -> None:
        with self._lock:
            self._catalog = None
            self._resolutions = {}

    def _served(self) -> _Catalog:
        catalog = self._catalog
        if catalog is not None and time.monotonic() - catalog.built < self.config.registry_cache_seconds:
            return catalog
        with self.store.transaction() as session:
            entities = {e.name: e for e in self.store.list_entities(session)}
            views: dict[str, ServedView] = {}
            for view in self.store.list_feature_views(session):
                keys: dict[str, int] = {}
                for entity_name in view.entities:
                    entity = entities.get(entity_name)
                    if entity is not None:
                        keys.update({k.name: k.value_type for k in entity.join_keys})
                view_id = names.parse(view.name, names.FEATURE_VIEWS)
                views[view_id] = ServedView(
                    view_id, {f.name: f.value_type for f in view.features}, view.ttl.seconds, keys, view.online, False, {}
                )
            for odfv in self.store.list_on_demand_feature_views(session):
                view_id = names.parse(odfv.name, names.ON_DEMAND_FEATURE_VIEWS)
                sources = tuple(names.parse(s, names.FEATURE_VIEWS) for s in odfv.source_feature_views)
                keys = {}
                for source_id in sources:
                    if source_id in views:
                        keys.update(views[source_id].join_keys)
                views[view_id] = ServedView(
                    view_id,
                    {f.name: f.value_type for f in odfv.features},
                    0,
                    keys,
                    True,
                    True,
                    {r.name: r.value_type for r in odfv.request_fields},
                    sources,
                )
            services = {
                names.parse(s.name, names.FEATURE_SERVICES): tuple(
                    (p.feature_view.rpartition("/")[2], tuple(p.features), p.name_alias) for p in s.projections
                )
                for s in self.store.list_feature_services(session)
            }
        catalog = _Catalog(views, services, time.monotonic())
        with self._lock:
            self._catalog = catalog
            self._resolutions = {}
        return catalog

    def resolve(self, references: Sequence[str], feature_service: str, full_feature_names: bool) -> Resolution:
        """Check a selection ("view:feature" references or a feature service id) against the catalog."""
        key = (tuple(references), feature_service, full_feature_names)
        catalog = self._served()  # rebuilt (and resolutions dropped) when stale
        found = self._resolutions.get(key)
        if found is not None:
            return found
        selected: list[tuple[str, str, str]] = []  # (view id, feature, prefix)
        if feature_service:
            projections = catalog.services.get(feature_service)
            if projections is None:
                reference = names.name(names.FEATURE_SERVICES, feature_service)
                raise NotFound(
                    f"feature service {reference} does not exist", reason="FEATURE_SERVICE_NOT_FOUND", metadata={"name": reference}
                )
            for view_id, features, alias in projections:
                view = catalog.views.get(view_id)
                if view is None:
                    raise NotFound(
                        f"feature service {feature_service} uses feature view {view_id}, which no longer exists",
                        reason="FEATURE_VIEW_NOT_FOUND",
                    )
                selected += [(view_id, feature, alias or view_id) for feature in (features or tuple(view.features))]
        else:
            if not references:
                raise InvalidArgument("no features selected: give feature references or a feature service", reason="NO_FEATURES")
            for reference in references:
                view_id, separator, feature = reference.partition(":")
                if not separator or not view_id or not feature:
                    raise InvalidArgument(
                        f"feature reference {reference!r} is not of the form view:feature", reason="INVALID_FEATURE_REFERENCE"
                    )
                selected.append((view_id, feature, view_id))
        outputs: list[OutputFeature] = []
        join_keys: dict[str, int] = {}
        request_fields: dict[str, int] = {}
        regular: list[str] = []
        for view_id, feature, prefix in selected:
            view = catalog.views.get(view_id)
            if view is None:
                raise NotFound(
                    f"feature view {view_id} does not exist", reason="FEATURE_VIEW_NOT_FOUND", metadata={"feature_view": view_id}
                )
            if feature not in view.features:
                reference = f"{view_id}:{feature}"
                raise NotFound(f"feature {reference} does not exist", reason="FEATURE_NOT_FOUND", metadata={"feature": reference})
            output_name = f"{prefix}__{feature}" if full_feature_names else feature
            outputs.append(OutputFeature(view_id, feature, output_name, view.features[feature], view.ttl_seconds, view.on_demand))
            join_keys.update(view.join_keys)
            request_fields.update(view.request_fields)
            for source_view in (*view.source_views, *(() if view.on_demand else (view_id,))):
                if source_view not in regular:
                    regular.append(source_view)
        seen: dict[str, str] = {}
        for output in outputs:
            if output.output_name in seen and seen[output.output_name] != output.reference:
                raise InvalidArgument(
                    f"feature name {output.output_name!r} is ambiguous ({seen[output.output_name]}, {output.reference}); ask for full feature names",
                    reason="AMBIGUOUS_FEATURE_NAME",
                )
            seen[output.output_name] = output.reference
        resolution = Resolution(tuple(outputs), feature_service, join_keys, request_fields, tuple(regular))
        with self._lock:
            self._resolutions[key] = resolution
        return resolution

    # -- online -------------------------------------------------------------------------------
    def _check_online(
        self, resolution: Resolution, entities: Mapping[str, RepeatedValue], request_context: Mapping[str, RepeatedValue]
    ) -> int:
        catalog = self._served()
        for view_id in resolution.views:
            view = catalog.views.get(view_id)
            if view is not None and not view.online:
                raise FailedPrecondition(
                    f"feature view {view_id} is not served online", reason="VIEW_NOT_ONLINE", metadata={"feature_view": view_id}
                )
        rows = -1
        for name, value_type in resolution.join_keys.items():
            column = entities.get(name)
            if column is None:
                raise InvalidArgument(
                    f"entity key {name!r} is required by the selected features", reason="MISSING_ENTITY_KEY", metadata={"join_key": name}
                )
            values.check_feast_keys(name, value_type, column.val)
            rows = len(column.val) if rows < 0 else rows
            if len(column.val) != rows:
                raise InvalidArgument("every entity key column must have the same number of values", reason="RAGGED_ENTITY_ROWS")
        for name in entities:
            if name not in resolution.join_keys:
                raise InvalidArgument(
                    f"{name!r} is not a join key of the selected features", reason="UNKNOWN_ENTITY_KEY", metadata={"join_key": name}
                )
        for name in resolution.request_fields:
            if name not in request_context:
                raise InvalidArgument(f"request value {name!r} is required by an on-demand view", reason="MISSING_REQUEST_VALUE")
        if rows <= 0:
            raise InvalidArgument("at least one entity row is required", reason="NO_ENTITY_ROWS")
        return rows

    def read_online(
        self,
        resolution: Resolution,
        entities: Mapping[str, RepeatedValue],
        request_context: Mapping[str, RepeatedValue],
        full_feature_names: bool,
    ) -> feast_serving.GetOnlineFeaturesResponse:
        """Feast's online answer with statuses made exact (NULL_VALUE, OUTSIDE_MAX_AGE)."""
        self._check_online(resolution, entities, request_context)
        response = self.repo.online(resolution.feast_selection, entities, request_context, full_feature_names)
        stored = {o.output_name: o.ttl_seconds for o in resolution.outputs if not o.on_demand}
        computed = {o.output_name for o in resolution.outputs if o.on_demand}
        now = time.time()
        for name, vector in zip(response.metadata.feature_names.val, response.results, strict=True):
            ttl = stored.get(name)
            if ttl is None:
                if name in computed:  # computed now: no event time, only nulls to mark
                    for row, value in enumerate(vector.values):
                        if vector.statuses[row] == PRESENT and values.is_null(value):
                            vector.statuses[row] = NULL_VALUE
                continue
            statuses, column, stamps = vector.statuses, vector.values, vector.event_timestamps
            for row, status in enumerate(statuses):
                if status != PRESENT:
                    continue
                seconds = stamps[row].seconds
                if seconds == 0 and stamps[row].nanos == 0:
                    # Feast's Redis store answers a missing key as PRESENT with no event time.
                    statuses[row] = NOT_FOUND
                    column[row].Clear()
                elif ttl and seconds + ttl < now:
                    statuses[row] = OUTSIDE_MAX_AGE
                    column[row].Clear()
                elif values.is_null(column[row]):
                    statuses[row] = NULL_VALUE
        return response

    def online_feast(self, request: feast_serving.GetOnlineFeaturesRequest) -> feast_serving.GetOnlineFeaturesResponse:
        """Feast's `ServingService.GetOnlineFeatures`."""
        if request.HasField("feature_service"):
            resolution = self.resolve((), request.feature_service, request.full_feature_names)
        else:
            resolution = self.resolve(tuple(request.features.val), "", request.full_feature_names)
        return self.read_online(resolution, request.entities, request.request_context, request.full_feature_names)

    def online_falaj(self, request: requests.GetOnlineFeaturesRequest) -> requests.GetOnlineFeaturesResponse:
        """`falaj.features.v1.FeaturesService.GetOnlineFeatures`: columns in selection order."""
        resolution = self._resolve_selection(request.features, request.full_feature_names)
        entities = {name: RepeatedValue(val=[values.to_feast_value(v) for v in column.values]) for name, column in request.entities.items()}
        context = {
            name: RepeatedValue(val=[values.to_feast_value(v) for v in column.values]) for name, column in request.request_context.items()
        }
        response = self.read_online(resolution, entities, context, request.full_feature_names)
        position = {name: index for index, name in enumerate(response.metadata.feature_names.val)}
        answer = requests.GetOnlineFeaturesResponse()
        for output in resolution.outputs:
            vector = response.results[position[output.output_name]]
            answer.feature_names.append(output.output_name)
            column = answer.columns.add()
            column.values.extend(values.to_falaj_value(v) for v in vector.values)
            # Falaj's FieldStatus numbers Feast's statuses the same way.
            column.statuses.extend(cast(Any, vector.statuses))
            column.event_timestamps.extend(vector.event_timestamps)
        return answer

    def _resolve_selection(self, selection: messages.FeatureSelection, full_feature_names: bool) -> Resolution:
        which = selection.WhichOneof("selection")
        if which == "feature_service":
            return self.resolve(
                (), names.parse(selection.feature_service, names.FEATURE_SERVICES, "features.feature_service"), full_feature_names
            )
        return self.resolve(tuple(selection.features.references), "", full_feature_names)

    # -- historical ---------------------------------------------------------------------------
    def historical(self, request: requests.GetHistoricalFeaturesRequest) -> Iterator[requests.GetHistoricalFeaturesResponse]:
        """Point-in-time join of entity rows, streamed as Arrow batches, then a manifest."""
        resolution = self._resolve_selection(request.features, request.full_feature_names)
        purpose = request.consent_purpose.strip().lower()
        if purpose and purpose not in CONSENT_PURPOSES:
            raise InvalidArgument(f"consent_purpose must be one of {', '.join(CONSENT_PURPOSES)}", reason="INVALID_CONSENT_PURPOSE")
        if request.max_rows_per_batch < 0:
            raise InvalidArgument("max_rows_per_batch must not be negative", reason="INVALID_BATCH_SIZE")
        batch_rows = request.max_rows_per_batch or self.config.default_batch_rows
        manifest = messages.RetrievalManifest(retrieval_id=uuid.uuid4().hex, feature_references=[o.reference for o in resolution.outputs])
        if resolution.feature_service:
            manifest.feature_service = names.name(names.FEATURE_SERVICES, resolution.feature_service)
        rows, timestamp_column, subject_column = self._entity_rows(request, manifest, purpose)
        if purpose and subject_column:
            rows = self._with_consent(rows, subject_column, purpose, request, manifest)
        # Each view reads the ingest version it should (pulled now if newer), recorded for lineage.
        catalog = self._served()
        for view_id in resolution.views:
            _, version, _ = self.offline.ensure(view_id)
            snapshot = manifest.feature_views.add(feature_view=names.name(names.FEATURE_VIEWS, view_id), dataset_version=version.name)
            snapshot.dataset_content_hash = version.content_hash
            snapshot.ttl.seconds = catalog.views[view_id].ttl_seconds
        digest = hashlib.sha256()
        missing = {o.reference: 0 for o in resolution.outputs}
        first = True
        for chunk in _chunks(rows, self.config.historical_chunk_rows):
            if first:
                self._check_entity_schema(chunk.schema, resolution, timestamp_column)
                first = False
            joined = self._join(resolution, chunk, timestamp_column, request.full_feature_names)
            for output in resolution.outputs:
                missing[output.reference] += joined.column(output.output_name).null_count
            for batch in joined.to_batches(max_chunksize=batch_rows):
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, batch.schema) as writer:
                    writer.write_batch(batch)
                payload = sink.getvalue().to_pybytes()
                digest.update(payload)
                manifest.row_count += batch.num_rows
                yield requests.GetHistoricalFeaturesResponse(batch=common_pb2.ArrowBatch(arrow_ipc=payload, row_count=batch.num_rows))
        manifest.missing_value_counts.update(missing)
        manifest.content_hash = digest.hexdigest()
        manifest.complete_time.FromDatetime(dt.datetime.now(dt.UTC))
        yield requests.GetHistoricalFeaturesResponse(manifest=manifest)

    def _with_consent(
        self,
        rows: Iterator[pa.RecordBatch],
        subject_column: str,
        purpose: str,
        request: requests.GetHistoricalFeaturesRequest,
        manifest: messages.RetrievalManifest,
    ) -> Iterator[pa.RecordBatch]:
        """Leave out rows whose data subject has not consented to `purpose` (asked of ingest)."""
        keep_subject = subject_column in request.entity_dataset.carry_columns
        decided: dict[str, bool] = {}
        for batch in rows:
            subjects = batch.column(subject_column).cast(pa.string())
            unknown = [s for s in set(subjects.to_pylist()) if s is not None and s not in decided]
            if unknown:
                granted = self.source.consented_subjects(unknown, purpose)
                decided.update({s: s in granted for s in unknown})
            mask = pa.array([subject is not None and decided[subject] for subject in subjects.to_pylist()], pa.bool_())
            kept = batch.filter(mask)
            manifest.rows_excluded_without_consent += batch.num_rows - kept.num_rows
            if not keep_subject:
                kept = kept.drop_columns([subject_column])
            yield kept

    def _entity_rows(
        self, request: requests.GetHistoricalFeaturesRequest, manifest: messages.RetrievalManifest, purpose: str = ""
    ) -> tuple[Iterator[pa.RecordBatch], str, str]:
        """Entity rows, their timestamp column, and the data-subject column read for consent ('' if none)."""
        which = request.WhichOneof("entity_rows")
        if which == "inline_entity_rows" and purpose:
            raise InvalidArgument(
                "consent_purpose needs entity rows from an ingest dataset (entity_dataset), whose data-subject column names the subjects",
                reason="CONSENT_NEEDS_DATASET",
            )
        if which == "inline_entity_rows":
            try:
                with pa.ipc.open_stream(request.inline_entity_rows.arrow_ipc) as reader:
                    table = reader.read_all()
            except (pa.ArrowInvalid, OSError) as error:
                raise InvalidArgument(f"inline_entity_rows is not an Arrow IPC stream: {error}", reason="INVALID_ARROW") from None
            if request.inline_entity_rows.row_count and request.inline_entity_rows.row_count != table.num_rows:
                raise InvalidArgument(
                    f"inline_entity_rows has {table.num_rows} rows, not the {request.inline_entity_rows.row_count} announced",
                    reason="ROW_COUNT_MISMATCH",
                )
            timestamp_column = request.event_timestamp_column or DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
            return iter(table.to_batches()), timestamp_column, ""
        if which == "entity_dataset":
            source = request.entity_dataset
            version = self.source.get_version(source.dataset_version)
            dataset = self.source.get_dataset(version.dataset)
            timestamp_column = source.event_timestamp_column or dataset.event_time_column
            if not timestamp_column:
                raise InvalidArgument(
                    f"{version.dataset} has no event-time column; set entity_dataset.event_timestamp_column", reason="NO_TIMESTAMP_COLUMN"
                )
            manifest.entity_dataset_version = version.name
            resolution = self._resolve_selection(request.features, request.full_feature_names)
            columns = [
                *resolution.join_keys,
                timestamp_column,
                *[c for c in source.carry_columns if c not in resolution.join_keys and c != timestamp_column],
            ]
            # A dataset without a data-subject column holds no personal data: nothing to filter.
            subject_column = dataset.data_subject_column if purpose else ""
            if subject_column and subject_column not in columns:
                columns.append(subject_column)
            start = source.start_time.ToDatetime(dt.UTC) if source.HasField("start_time") else None
            end = source.end_time.ToDatetime(dt.UTC) if source.HasField("end_time") else None
            rows = self.source.read_version(version.name, columns, start, end, expected_content_hash=version.content_hash)
            return rows, timestamp_column, subject_column
        raise InvalidArgument("entity rows are required: inline_entity_rows or entity_dataset", reason="NO_ENTITY_ROWS")

    @staticmethod
    def _check_entity_schema(schema: pa.Schema, resolution: Resolution, timestamp_column: str) -> None:
        if timestamp_column not in schema.names or not pa.types.is_timestamp(schema.field(timestamp_column).type):
            raise InvalidArgument(f"entity rows need a timestamp column {timestamp_column!r}", reason="NO_TIMESTAMP_COLUMN")
        for name, value_type in resolution.join_keys.items():
            if name not in schema.names:
                raise InvalidArgument(
                    f"entity rows need the join key column {name!r}", reason="MISSING_ENTITY_KEY", metadata={"join_key": name}
                )
            if not values.arrow_backs(schema.field(name).type, value_type):
                raise InvalidArgument(
                    f"entity key {name!r} takes {values.type_name(value_type)} values; the column is {schema.field(name).type}",
                    reason="ENTITY_KEY_TYPE_MISMATCH",
                    metadata={"join_key": name},
                )
        clashes = [o.output_name for o in resolution.outputs if o.output_name in schema.names]
        if clashes:
            raise InvalidArgument(
                f"entity rows already have a column named {clashes[0]!r}; ask for full feature names", reason="COLUMN_CLASH"
            )

    def _join(self, resolution: Resolution, chunk: pa.Table, timestamp_column: str, full_feature_names: bool) -> pa.Table:
        keys = list(resolution.join_keys)
        entity_frame = pd.DataFrame({key: chunk.column(key).to_pandas() for key in keys})
        entity_frame[DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL] = chunk.column(timestamp_column).cast(pa.timestamp("us", tz="UTC")).to_pandas()
        if entity_frame[keys + [DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL]].isna().any().any():
            raise InvalidArgument("entity rows must not have null keys or timestamps", reason="NULL_ENTITY_ROW")
        try:
            joined = self.repo.historical(resolution.feast_selection, entity_frame, full_feature_names)
        except FalajError:
            raise
        except Exception as error:  # noqa: BLE001 - Feast's failures are reported, not hidden
            raise FailedPrecondition(f"the point-in-time join failed: {error}", reason="HISTORICAL_JOIN_FAILED") from None
        columns = [chunk.column(name) for name in chunk.column_names]
        fields = list(chunk.schema)
        for output in resolution.outputs:
            target = values.arrow_type(output.value_type)
            series = joined[output.output_name]
            if pa.types.is_timestamp(target):
                array = pa.array(pd.to_datetime(series, utc=True), type=target, from_pandas=True)
            else:
                array = pa.array(series.astype(object).where(series.notna(), None), type=target, from_pandas=True)
            columns.append(array)
            fields.append(pa.field(output.output_name, target))
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch.num_rows, rows - count)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield pa.Table.from_batches(held)
                held, count = [], 0
    if held:
        yield pa.Table.from_batches(held)
