"""The Feast feature store the service owns, and the translation of definitions into it.

Layout (all under the service's data dir, `$FALAJ_HOME/features/feast/`):
- registry: Feast's SQL registry. On PostgreSQL it lives in the `feast_registry` schema of
  the service's own database; on SQLite in `registry.db` beside the service's database
  (Feast's table names collide with the catalog's, so they cannot share a namespace).
- offline store: Feast's file (Parquet) offline store; `offline/{dataset}/v{n}.parquet`
  is ingest version n of the dataset, copied once; each view's FileSource points at
  the version it currently reads.
- online store: SQLite (`online.db`) by default, Redis when configured.

The service's catalog (store.py) is the source of truth; Feast's registry is its
projection, kept in step by `sync`, which re-applies exactly the objects whose
definition changed (each Feast object carries the digest of what it was built from).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from feast import Entity as FeastEntity
from feast import FeatureService as FeastFeatureService
from feast import FeatureStore, Field, FileSource, RepoConfig, RequestSource
from feast import FeatureView as FeastFeatureView
from feast.infra.offline_stores.offline_utils import DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
from feast.infra.registry.sql import SqlRegistryConfig
from feast.on_demand_feature_view import OnDemandFeatureView as FeastOnDemandFeatureView
from feast.protos.feast.serving.ServingService_pb2 import GetOnlineFeaturesResponse
from feast.protos.feast.types.Value_pb2 import RepeatedValue
from feast.type_map import feast_value_type_to_python_type

from falaj.features.v1 import message_pb2 as messages
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument
from falaj_platform.services.features import values
from falaj_platform.services.features.config import REGISTRY_SCHEMA, FeaturesConfig
from falaj_platform.services.features.store import message_json

DIGEST_TAG = "falaj.digest"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Feast logs every registry refresh and materialization at INFO, and warns on every use of
# on-demand views (marked experimental); the service logs what it does itself.
logging.getLogger("feast").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature", category=RuntimeWarning)


@dataclass(frozen=True)
class DesiredState:
    """Everything Feast's registry should hold, as the catalog defines it."""

    entities: Mapping[str, messages.Entity]
    feature_views: Mapping[str, messages.FeatureView]
    on_demand_feature_views: Mapping[str, messages.OnDemandFeatureView]
    feature_services: Mapping[str, messages.FeatureService]
    # View id -> Parquet file its Feast source reads ('' before any data was pulled).
    offline_paths: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotFile:
    path: str
    row_count: int
    min_event_time: dt.datetime | None
    max_event_time: dt.datetime | None


def _normalize(table: pa.Table) -> pa.Table:
    columns = []
    for column in table.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.cast(kind.value_type)
        elif pa.types.is_timestamp(kind) and (kind.tz != "UTC" or kind.unit != "us"):
            column = column.cast(pa.timestamp("us", tz="UTC"))
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


@dataclass(frozen=True)
class MaterializedWindow:
    rows_written: int
    newest_event_time: dt.datetime | None


def _digest(*parts: object) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(json.dumps(part, sort_keys=True, default=str).encode())
        hasher.update(b"\0")
    return hasher.hexdigest()[:32]


def feast_entity_names(entity_id: str, entity: messages.Entity) -> list[tuple[str, messages.JoinKey]]:
    """Feast entities have one join key each: a Falaj entity with several becomes several."""
    if len(entity.join_keys) == 1:
        return [(entity_id, entity.join_keys[0])]
    return [(f"{entity_id}__{key.name}", key) for key in entity.join_keys]


def load_transformation(transformation: messages.Transformation, where: str) -> types.FunctionType:
    """The Python function of an on-demand view, compiled from its source."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(transformation.function_source, f"<{where}>", "exec"), namespace)  # applying definitions is a privileged act
    except Exception as error:  # noqa: BLE001 - any failure of user code is an invalid definition
        raise InvalidArgument(f"{where}: the transformation source does not compile: {error}", reason="INVALID_TRANSFORMATION") from None
    function = namespace.get(transformation.function_name)
    if not isinstance(function, types.FunctionType):
        raise InvalidArgument(
            f"{where}: the transformation source defines no function {transformation.function_name!r}", reason="INVALID_TRANSFORMATION"
        )
    return function


class FeastRepo:
    """One Feast FeatureStore, built from the service's config, shared by every call."""

    def __init__(self, config: FeaturesConfig):
        self.config = config
        config.offline_dir.mkdir(parents=True, exist_ok=True)
        registry_url, engine_args = config.registry_url()
        if sa.engine.make_url(registry_url).get_backend_name() == "postgresql":
            engine = sa.create_engine(registry_url)
            try:
                with engine.begin() as connection:
                    connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{REGISTRY_SCHEMA}"'))
            finally:
                engine.dispose()
        if config.uses_redis:
            online: dict[str, Any] = {"type": "redis", "connection_string": config.redis_connection_string()}
        else:
            online = {"type": "sqlite", "path": str(config.feast_dir / "online.db")}
        self.repo_config = RepoConfig(
            project=config.feast_project,
            provider="local",
            registry=SqlRegistryConfig(
                registry_type="sql",
                path=registry_url,
                sqlalchemy_config_kwargs={"echo": False, **engine_args},
                cache_ttl_seconds=config.registry_cache_seconds,
                serve_features_while_materializing=True,
            ),
            offline_store={"type": "file"},
            online_store=online,
            entity_key_serialization_version=3,
            repo_path=config.feast_dir,
        )
        self.store = FeatureStore(config=self.repo_config)
        # Registry writes and online-table rebuilds are serialized; reads are not.
        self.write_lock = threading.RLock()

    @property
    def project(self) -> str:
        return self.config.feast_project

    def placeholder_path(self, dataset: str) -> str:
        return str(self.config.offline_dir / dataset.removeprefix("datasets/") / "no-version-yet.parquet")

    def snapshot_path(self, dataset_version: str) -> Path:
        parts = dataset_version.split("/")
        return self.config.offline_dir / parts[1] / f"v{parts[3]}.parquet"

    def write_snapshot(self, dataset_version: str, batches: Iterable[pa.RecordBatch], event_time_column: str) -> SnapshotFile:
        """Copy an ingest version into the offline store, streaming (bounded memory).

        Category columns arrive dictionary-encoded and become plain strings, timestamps
        become UTC microseconds: the types Feast's file store reads back unchanged.
        """
        path = self.snapshot_path(dataset_version)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        writer: pq.ParquetWriter | None = None
        rows, low, high = 0, None, None
        try:
            for batch in batches:
                table = _normalize(pa.Table.from_batches([batch]))
                if writer is None:
                    writer = pq.ParquetWriter(partial, table.schema)
                writer.write_table(table.cast(writer.schema))
                rows += table.num_rows
                if event_time_column in table.column_names and table.num_rows:
                    bounds = pc.min_max(table.column(event_time_column))
                    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
                    low = lo if low is None or (lo is not None and lo < low) else low
                    high = hi if high is None or (hi is not None and hi > high) else high
            if writer is None:
                raise FailedPrecondition(f"dataset version {dataset_version} returned no schema", reason="EMPTY_DATASET_VERSION")
        finally:
            if writer is not None:
                writer.close()
        partial.replace(path)
        return SnapshotFile(str(path), rows, low, high)

    # -- definitions -> Feast objects -------------------------------------------------
    def _entities(self, desired: DesiredState) -> dict[str, FeastEntity]:
        built = {}
        for entity_id, entity in desired.entities.items():
            for feast_name, key in feast_entity_names(entity_id, entity):
                built[feast_name] = FeastEntity(
                    name=feast_name,
                    join_keys=[key.name],
                    value_type=values.feast_value_type(key.value_type),
                    description=entity.description,
                    owner=entity.owner,
                    tags={**dict(entity.tags), DIGEST_TAG: _digest(message_json(entity), feast_name)},
                )
        return built

    def _feature_view(self, view_id: str, view: messages.FeatureView, desired: DesiredState, entities: dict[str, FeastEntity]) -> Any:
        source = view.source
        timestamp_column = source.timestamp_column  # filled from the dataset when the view was defined
        renames = {column: name for column, name in source.field_mapping.items() if column != timestamp_column}
        renames.update({feature.column: feature.name for feature in view.features if feature.column and feature.column != feature.name})
        path = desired.offline_paths.get(view_id) or self.placeholder_path(source.dataset)
        view_entities: list[FeastEntity] = []
        key_fields: list[Field] = []
        for entity_name in view.entities:
            entity_id = entity_name.rpartition("/")[2]
            entity = desired.entities[entity_id]
            for feast_name, key in feast_entity_names(entity_id, entity):
                view_entities.append(entities[feast_name])
                key_fields.append(Field(name=key.name, dtype=values.feast_dtype(key.value_type)))
        digest = _digest(message_json(view), path, timestamp_column, [e.tags[DIGEST_TAG] for e in view_entities])
        return FeastFeatureView(
            name=view_id,
            entities=view_entities,
            ttl=dt.timedelta(seconds=view.ttl.seconds),
            schema=[*key_fields, *(Field(name=f.name, dtype=values.feast_dtype(f.value_type)) for f in view.features)],
            source=FileSource(
                name=f"{view_id}__source",
                path=path,
                timestamp_field=timestamp_column,
                created_timestamp_column=source.created_timestamp_column,
                field_mapping=renames,
            ),
            online=view.online,
            description=view.description,
            owner=view.owner,
            tags={**dict(view.tags), DIGEST_TAG: digest},
        )

    def _on_demand_view(self, view_id: str, view: messages.OnDemandFeatureView, feature_views: dict[str, Any]) -> Any:
        sources: list[Any] = [feature_views[name.rpartition("/")[2]] for name in view.source_feature_views]
        if view.request_fields:
            sources.append(
                RequestSource(
                    name=f"{view_id}__request",
                    schema=[Field(name=f.name, dtype=values.feast_dtype(f.value_type)) for f in view.request_fields],
                )
            )
        function = load_transformation(view.transformation, f"onDemandFeatureViews/{view_id}")
        mode = "python" if view.transformation.mode == messages.TRANSFORMATION_MODE_PYTHON else "pandas"
        digest = _digest(message_json(view), [sources[i].tags.get(DIGEST_TAG, "") for i in range(len(view.source_feature_views))])
        return FeastOnDemandFeatureView(
            name=view_id,
            sources=sources,
            schema=[Field(name=f.name, dtype=values.feast_dtype(f.value_type)) for f in view.features],
            udf=function,
            udf_string=view.transformation.function_source,
            mode=mode,
            write_to_online_store=view.write_to_online_store,
            description=view.description,
            owner=view.owner,
            tags={**dict(view.tags), DIGEST_TAG: digest},
        )

    def _feature_service(self, service_id: str, service: messages.FeatureService, views: dict[str, Any]) -> FeastFeatureService:
        projections = []
        digests = []
        for projection in service.projections:
            view = views[projection.feature_view.rpartition("/")[2]]
            selected = view[list(projection.features)] if projection.features else view
            if projection.name_alias:
                selected = selected.with_name(projection.name_alias)
            projections.append(selected)
            digests.append(view.tags.get(DIGEST_TAG, ""))
        return FeastFeatureService(
            name=service_id,
            features=projections,
            description=service.description,
            owner=service.owner,
            tags={**dict(service.tags), DIGEST_TAG: _digest(message_json(service), digests)},
        )

    def build(self, desired: DesiredState) -> list[Any]:
        """Feast objects for the desired state (entities, views, on-demand views, services)."""
        entities = self._entities(desired)
        views = {view_id: self._feature_view(view_id, view, desired, entities) for view_id, view in desired.feature_views.items()}
        on_demand = {view_id: self._on_demand_view(view_id, view, views) for view_id, view in desired.on_demand_feature_views.items()}
        services = [
            self._feature_service(service_id, service, {**views, **on_demand}) for service_id, service in desired.feature_services.items()
        ]
        return [*entities.values(), *views.values(), *on_demand.values(), *services]

    def _registered(self) -> list[Any]:
        registry, project = self.store.registry, self.project
        return [
            *registry.list_entities(project, allow_cache=False),
            *registry.list_feature_views(project, allow_cache=False),
            *registry.list_on_demand_feature_views(project, allow_cache=False),
            *registry.list_feature_services(project, allow_cache=False),
        ]

    def sync(self, desired: DesiredState) -> int:
        """Make Feast's registry (and online tables) match `desired`; returns objects changed."""
        with self.write_lock:
            wanted = {(type(obj).__name__, obj.name): obj for obj in self.build(desired)}
            present = {(type(obj).__name__, obj.name): obj for obj in self._registered() if not obj.name.startswith("__")}
            changed = [
                obj for key, obj in wanted.items() if key not in present or present[key].tags.get(DIGEST_TAG) != obj.tags.get(DIGEST_TAG)
            ]
            removed = [obj for key, obj in present.items() if key not in wanted]
            if changed or removed:
                self.store.apply(changed, objects_to_delete=removed, partial=False)
                self.store.refresh_registry()
            return len(changed) + len(removed)

    # -- materialization ----------------------------------------------------------------
    def _view(self, view_id: str) -> FeastFeatureView:
        return self.store.get_feature_view(view_id, allow_registry_cache=False)

    def clear_online(self, view_id: str) -> None:
        """Remove every online value of a view (before a full materialization)."""
        with self.write_lock:
            view = self._view(view_id)
            provider = self.store._get_provider()
            provider.update_infra(
                self.project, tables_to_delete=[view], tables_to_keep=[], entities_to_delete=[], entities_to_keep=[], partial=True
            )
            provider.update_infra(
                self.project, tables_to_delete=[], tables_to_keep=[view], entities_to_delete=[], entities_to_keep=[], partial=True
            )

    def materialize(self, view_id: str, start: dt.datetime, end: dt.datetime, *, replace: bool = False) -> MaterializedWindow:
        """Write the latest value per entity with event time in [start, end] to the online store;
        with `replace`, those values become all the view holds online (a full materialization).

        Feast's own steps (the offline store's `pull_latest_from_table_or_query`, then the
        provider's online write), called directly so the rows written are known exactly.
        On SQLite a replacement removes the old values in the write's own transaction, so a
        failed or killed write leaves the old values, never an empty or half-written view;
        Redis has no such transaction: the view is cleared, then written.
        """
        with self.write_lock:
            if replace and self.config.uses_redis:
                self.clear_online(view_id)
                replace = False
            return self._materialize(view_id, start, end, replace)

    def _materialize(self, view_id: str, start: dt.datetime, end: dt.datetime, replace: bool) -> MaterializedWindow:
        view = self._view(view_id)
        provider = self.store._get_provider()
        source = view.batch_source
        if source is None:
            raise FailedPrecondition(f"feature view {view_id} has no offline source", reason="NO_OFFLINE_SOURCE")
        # The offline store is read with the dataset's column names; ingest_df renames.
        source_name = {target: column for column, target in (source.field_mapping or {}).items()}
        job = provider.offline_store.pull_latest_from_table_or_query(
            config=self.repo_config,
            data_source=source,
            join_key_columns=[source_name.get(c.name, c.name) for c in view.entity_columns],
            feature_name_columns=[source_name.get(f.name, f.name) for f in view.features],
            timestamp_field=source.timestamp_field,
            created_timestamp_column=source.created_timestamp_column or None,
            start_date=start,
            end_date=end,
        )
        frame = job.to_df()
        if replace:
            from feast.infra.online_stores.sqlite import _table_id

            # Python's sqlite3 opens a transaction at the DELETE; Feast's write (`with conn:`)
            # adds its rows to it and commits both, or rolls both back.
            online_store: Any = provider.online_store
            connection = online_store._get_conn(self.repo_config)
            try:
                connection.execute(f'DELETE FROM "{_table_id(self.project, view)}"')
                if frame.empty:
                    connection.commit()
            except BaseException:
                connection.rollback()
                raise
        if frame.empty:
            return MaterializedWindow(0, None)
        newest = pd.to_datetime(frame[source.timestamp_field], utc=True).max()
        try:
            provider.ingest_df(view, frame)
        except BaseException:
            if replace:
                connection.rollback()  # the DELETE, if Feast failed before its write
            raise
        self.store.registry.apply_materialization(view, self.project, start, end)
        return MaterializedWindow(len(frame), newest.to_pydatetime())

    # -- reads ----------------------------------------------------------------------------
    def online(
        self,
        features: Sequence[str] | str,
        entities: Mapping[str, RepeatedValue],
        request_context: Mapping[str, RepeatedValue] | None = None,
        full_feature_names: bool = False,
    ) -> GetOnlineFeaturesResponse:
        """Feast's online read, as Feast's serving contract answers it."""
        selected: Any = self.store.get_feature_service(features, allow_cache=True) if isinstance(features, str) else list(features)
        columns: dict[str, Any] = dict(entities)
        # Feast infers request values' types from Python values, not from Value protos.
        for name, column in (request_context or {}).items():
            columns[name] = [feast_value_type_to_python_type(value) for value in column.val]
        return self.store.get_online_features(selected, columns, full_feature_names=full_feature_names).proto

    def historical(self, features: Sequence[str] | str, entity_rows: pd.DataFrame, full_feature_names: bool) -> pd.DataFrame:
        """Point-in-time join of `entity_rows` (join keys + `event_timestamp`) with Feast.

        Feast's file offline store drops an entity row whose matches all fall outside the
        TTL window, and collapses rows with equal keys and time; so the distinct
        (keys, time) pairs go to Feast and its answer is joined back onto every row.
        """
        selected: Any = self.store.get_feature_service(features, allow_cache=True) if isinstance(features, str) else list(features)
        key_columns = [c for c in entity_rows.columns if c != DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL]
        distinct = entity_rows.drop_duplicates(ignore_index=True)
        joined = self.store.get_historical_features(entity_df=distinct, features=selected, full_feature_names=full_feature_names).to_df()
        joined[DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL] = pd.to_datetime(joined[DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL], utc=True)
        joined = joined.drop_duplicates(subset=[*key_columns, DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL], keep="last")
        frame = entity_rows.copy()
        frame[DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL] = pd.to_datetime(frame[DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL], utc=True)
        return frame.merge(joined, how="left", on=[*key_columns, DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL], sort=False)

    def delete_online_keys(self, view_id: str, keys: Iterable[Any]) -> int:
        """Remove the online values of some entity keys of a view; returns keys removed."""
        view = self._view(view_id)
        provider = self.store._get_provider()
        online_store: Any = provider.online_store
        entity_keys = list(keys)
        if not entity_keys:
            return 0
        found = online_store.online_read(self.repo_config, view, entity_keys, None)
        present = [key for key, (_, data) in zip(entity_keys, found, strict=True) if data]
        if not present:
            return 0
        from feast.infra.key_encoding_utils import serialize_entity_key

        if self.config.uses_redis:
            from feast.infra.online_stores.helpers import _mmh3, _redis_key

            client = online_store._get_client(self.repo_config.online_store)
            fields = [_mmh3(f"{view_id}:{f.name}") for f in view.features] + [f"_ts:{view_id}".encode()]
            with client.pipeline(transaction=False) as pipe:
                for key in present:
                    pipe.hdel(_redis_key(self.project, key, entity_key_serialization_version=3), *fields)
                pipe.execute()
        else:
            from feast.infra.online_stores.sqlite import _table_id

            connection = online_store._get_conn(self.repo_config)
            table = _table_id(self.project, view)
            # One connection serves every thread: committing here must not commit a
            # materialization's open transaction, so wait for it.
            with self.write_lock, connection:
                connection.executemany(
                    f'DELETE FROM "{table}" WHERE entity_key = ?',
                    [(serialize_entity_key(key, entity_key_serialization_version=3),) for key in present],
                )
        return len(present)

    def close(self) -> None:
        registry = self.store.registry
        for engine_name in ("write_engine", "read_engine"):
            engine = getattr(registry, engine_name, None)
            if engine is not None:
                engine.dispose()
