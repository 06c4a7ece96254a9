"""Feature definitions: entities, feature views, on-demand views and feature services.

Each write checks the definition against the ingest dataset it reads (columns, types,
residency), stores it in the catalog, and re-projects the catalog into Feast's registry
in the same transaction, so a definition Feast refuses is not stored either. Residency:
a view must have its dataset's region, and a dataset of a region other than the
service's needs a policy allowance; every refusal or allowed foreign use is audited.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from croniter import croniter
from google.protobuf.message import Message

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.audit import SecurityEvent
from falaj_platform.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FalajError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.services.features import names, values
from falaj_platform.services.features.config import FeaturesConfig
from falaj_platform.services.features.feast_repo import DesiredState, FeastRepo, load_transformation
from falaj_platform.services.features.paging import paginate
from falaj_platform.services.features.sources import DatasetInfo, DatasetSource
from falaj_platform.services.features.store import FeaturesStore, ViewState, request_log

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
KEY_TYPES = frozenset({values.VT.VALUE_TYPE_INT32, values.VT.VALUE_TYPE_INT64, values.VT.VALUE_TYPE_STRING, values.VT.VALUE_TYPE_BYTES})
TIMESTAMP_COLUMN = 5  # falaj.ingest.v1.COLUMN_TYPE_TIMESTAMP

SERVICE = "/falaj.features.v1.FeaturesService/"


class Auditor(Protocol):
    """What the catalog needs of `runtime.audit.AuditReporter`."""

    def report(
        self,
        event_type: Any,
        *,
        resource: str,
        action: str,
        allowed: bool = True,
        detail: str = "",
        attributes: Mapping[str, str] | None = None,
        report_id: str = "",
        caller: str | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class Kind:
    """One kind of definition and how the catalog stores it."""

    field: str  # request/response field, e.g. "feature_view"
    title: str  # message name, e.g. "FeatureView"
    collection: str  # resource collection, e.g. "featureViews"
    definition_kind: int
    # Fields an update may change (empty mask = all of them).
    updatable: tuple[str, ...]
    output_fields: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.field.replace("_", " ")


ENTITY = Kind("entity", "Entity", names.ENTITIES, messages.DEFINITION_KIND_ENTITY, ("description", "owner", "tags", "join_keys"))
FEATURE_VIEW = Kind(
    "feature_view",
    "FeatureView",
    names.FEATURE_VIEWS,
    messages.DEFINITION_KIND_FEATURE_VIEW,
    ("entities", "source", "features", "ttl", "online", "materialization", "description", "owner", "tags"),
    ("freshness",),
)
ON_DEMAND_FEATURE_VIEW = Kind(
    "on_demand_feature_view",
    "OnDemandFeatureView",
    names.ON_DEMAND_FEATURE_VIEWS,
    messages.DEFINITION_KIND_ON_DEMAND_FEATURE_VIEW,
    ("source_feature_views", "request_fields", "features", "transformation", "write_to_online_store", "description", "owner", "tags"),
    ("residency",),
)
FEATURE_SERVICE = Kind(
    "feature_service",
    "FeatureService",
    names.FEATURE_SERVICES,
    messages.DEFINITION_KIND_FEATURE_SERVICE,
    ("projections", "description", "owner", "tags"),
    ("residency",),
)
KINDS = (ENTITY, FEATURE_VIEW, ON_DEMAND_FEATURE_VIEW, FEATURE_SERVICE)
_STAMP_FIELDS = ("name", "etag", "create_stamp", "update_stamp")


def definition_fields(kind: Kind) -> list[str]:
    """The fields that make up a definition (not its name, stamps, etag or output fields)."""
    skipped = {*_STAMP_FIELDS, *kind.output_fields}
    return [f.name for f in getattr(messages, kind.title).DESCRIPTOR.fields if f.name not in skipped]


def etag_of(kind: Kind, definition: Message) -> str:
    copy = type(definition)()
    for field in definition_fields(kind):
        _copy_field(definition, copy, field)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:32]


def _copy_field(source: Message, target: Message, field: str) -> None:
    descriptor = source.DESCRIPTOR.fields_by_name[field]
    target.ClearField(field)
    if descriptor.is_repeated:
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            getattr(target, field).update(getattr(source, field))
        else:
            getattr(target, field).extend(getattr(source, field))
    elif descriptor.message_type is not None:
        if source.HasField(field):
            getattr(target, field).CopyFrom(getattr(source, field))
    else:
        setattr(target, field, getattr(source, field))


def changed_fields(kind: Kind, before: Message, after: Message) -> list[str]:
    changed = []
    for field in definition_fields(kind):
        if field in kind.output_fields:
            continue
        left, right = type(before)(), type(after)()
        _copy_field(before, left, field)
        _copy_field(after, right, field)
        if left.SerializeToString(deterministic=True) != right.SerializeToString(deterministic=True):
            changed.append(field)
    return changed


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _id_of(reference: str) -> str:
    return reference.rpartition("/")[2]


class Catalog:
    """Definitions: validated, stored, projected into Feast."""

    def __init__(
        self,
        store: FeaturesStore,
        repo: FeastRepo,
        source: DatasetSource,
        audit: Auditor,
        config: FeaturesConfig,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.store = store
        self.repo = repo
        self.source = source
        self.audit = audit
        self.config = config
        self.on_change = on_change

    # -- storage by kind ------------------------------------------------------------------
    def _get(self, session: Any, kind: Kind, resource_id: str) -> Any:
        return getattr(self.store, f"get_{kind.field}")(session, resource_id)

    def _list(self, session: Any, kind: Kind) -> list[Any]:
        plural = "entities" if kind is ENTITY else f"{kind.field}s"
        return list(getattr(self.store, f"list_{plural}")(session))

    def _require(self, session: Any, kind: Kind, resource_id: str) -> Any:
        found = self._get(session, kind, resource_id)
        if found is None:
            reference = names.name(kind.collection, resource_id)
            raise NotFound(
                f"{kind.label} {reference} does not exist", reason=f"{kind.title.upper()}_NOT_FOUND", metadata={"name": reference}
            )
        return found

    # -- Feast projection ---------------------------------------------------------------
    def desired_state(self, session: Any) -> DesiredState:
        """The catalog as Feast should see it; dangling definitions (left by forced deletes) are left out."""
        entities = {_id_of(e.name): e for e in self.store.list_entities(session)}
        views = {}
        for view in self.store.list_feature_views(session):
            if all(_id_of(e) in entities for e in view.entities):
                views[_id_of(view.name)] = view
        on_demand = {}
        for odfv in self.store.list_on_demand_feature_views(session):
            if all(_id_of(v) in views for v in odfv.source_feature_views):
                on_demand[_id_of(odfv.name)] = odfv
        services = {}
        for service in self.store.list_feature_services(session):
            known = [
                (p.feature_view.startswith(names.FEATURE_VIEWS + "/") and _id_of(p.feature_view) in views)
                or _id_of(p.feature_view) in on_demand
                for p in service.projections
            ]
            if all(known):
                services[_id_of(service.name)] = service
        offline_paths = {}
        for view_id in views:
            state = self.store.get_view_state(session, view_id)
            if state.offline_dataset_version:
                offline_paths[view_id] = str(self.repo.snapshot_path(state.offline_dataset_version))
        return DesiredState(entities, views, on_demand, services, offline_paths)

    def sync_feast(self, session: Any) -> None:
        try:
            self.repo.sync(self.desired_state(session))
        except FalajError:
            raise
        except Exception as error:  # Feast refuses with plain exceptions
            log.warning("feast apply failed", exc_info=error)
            raise InvalidArgument(f"Feast refused the definitions: {error}", reason="FEAST_APPLY_FAILED") from None

    def reconcile(self) -> None:
        """Re-project the committed catalog into Feast (at boot, and after a failed write)."""
        with self.store.transaction() as session:
            self.repo.sync(self.desired_state(session))

    # -- residency ------------------------------------------------------------------------
    def _check_residency(self, resource: str, action: str, requested_region: str, dataset: DatasetInfo) -> str:
        region = requested_region or dataset.residency_region
        if region != dataset.residency_region:
            self._deny(
                resource,
                action,
                f"{resource} would hold data of {dataset.name} (region {dataset.residency_region}) as region {region}",
                "RESIDENCY_MISMATCH",
                dataset,
            )
        if dataset.residency_region != self.config.region:
            if dataset.residency_region not in self.config.allowed_foreign_regions:
                self._deny(
                    resource,
                    action,
                    f"{dataset.name} is data of region {dataset.residency_region}; this service runs in {self.config.region} "
                    "and no policy lets it hold that region's data",
                    "CROSS_REGION_DENIED",
                    dataset,
                )
            self._report(resource, action, True, f"allowed foreign-region data {dataset.name} ({dataset.residency_region})", dataset)
        return region

    def _report(self, resource: str, action: str, allowed: bool, detail: str, dataset: DatasetInfo) -> None:
        try:
            self.audit.report(
                SecurityEvent.CROSS_REGION_ACCESS,
                resource=resource,
                action=action,
                allowed=allowed,
                detail=detail,
                attributes={"dataset": dataset.name, "dataset_region": dataset.residency_region, "service_region": self.config.region},
            )
        except Unavailable:
            if allowed:
                raise  # an allowed cross-region use that cannot be recorded does not happen
            log.error("could not audit a refused cross-region access to %s", dataset.name)

    def _deny(self, resource: str, action: str, detail: str, reason: str, dataset: DatasetInfo) -> None:
        self._report(resource, action, False, detail, dataset)
        raise PermissionDenied(detail, reason=reason, metadata={"dataset": dataset.name, "region": dataset.residency_region})

    # -- validation per kind -------------------------------------------------------------
    def _normalize(self, session: Any, kind: Kind, resource_id: str, definition: Any, action: str) -> Any:
        normalized = type(definition)()
        normalized.CopyFrom(definition)
        for field in (*_STAMP_FIELDS, *kind.output_fields):
            normalized.ClearField(field)
        normalized.name = names.name(kind.collection, resource_id)
        if not normalized.owner:
            normalized.owner = current_caller()
        checks: dict[str, Callable[[Any, Any, str], None]] = {
            "entity": self._check_entity,
            "feature_view": self._check_feature_view,
            "on_demand_feature_view": self._check_on_demand_feature_view,
            "feature_service": self._check_feature_service,
        }
        checks[kind.field](session, normalized, action)
        return normalized

    def _check_entity(self, session: Any, entity: messages.Entity, action: str) -> None:
        if not entity.join_keys:
            raise InvalidArgument(f"{entity.name}: an entity needs at least one join key", reason="NO_JOIN_KEYS")
        seen: set[str] = set()
        for key in entity.join_keys:
            if not IDENTIFIER.match(key.name):
                raise InvalidArgument(f"{entity.name}: join key {key.name!r} is not a valid column name", reason="INVALID_JOIN_KEY")
            if key.name in seen:
                raise InvalidArgument(f"{entity.name}: join key {key.name!r} is listed twice", reason="DUPLICATE_JOIN_KEY")
            seen.add(key.name)
            if key.value_type not in KEY_TYPES:
                raise InvalidArgument(
                    f"{entity.name}: join key {key.name!r} must be INT32, INT64, STRING or BYTES", reason="INVALID_JOIN_KEY_TYPE"
                )

    def _check_features(self, owner: str, features: Iterable[messages.Feature], reserved: set[str]) -> None:
        seen: set[str] = set()
        for feature in features:
            if not IDENTIFIER.match(feature.name) or "__" in feature.name:
                raise InvalidArgument(
                    f"{owner}: feature name {feature.name!r} must be letters, digits and '_' (no '__')", reason="INVALID_FEATURE_NAME"
                )
            if feature.name in seen or feature.name in reserved:
                raise InvalidArgument(
                    f"{owner}: feature {feature.name!r} is defined twice or clashes with a join key", reason="DUPLICATE_FEATURE"
                )
            seen.add(feature.name)
            values.check_value_type(feature.value_type, f"{owner}: feature {feature.name}")
        if not seen:
            raise InvalidArgument(f"{owner}: at least one feature is required", reason="NO_FEATURES")

    def _check_feature_view(self, session: Any, view: messages.FeatureView, action: str) -> None:
        if not view.entities:
            raise InvalidArgument(f"{view.name}: a feature view needs at least one entity", reason="NO_ENTITIES")
        join_keys: dict[str, int] = {}
        for reference in view.entities:
            entity = self._require(session, ENTITY, names.parse(reference, names.ENTITIES, "entities"))
            for key in entity.join_keys:
                join_keys[key.name] = key.value_type
        dataset = self.source.get_dataset(f"datasets/{names.parse_dataset(view.source.dataset)}")
        view.residency.region = self._check_residency(view.name, action, view.residency.region, dataset)
        if view.source.pinned_version:
            pinned_dataset, _ = names.parse_dataset_version(view.source.pinned_version, "source.pinned_version")
            if f"datasets/{pinned_dataset}" != dataset.name:
                raise InvalidArgument(
                    f"{view.name}: source.pinned_version is not a version of {dataset.name}", reason="PINNED_VERSION_MISMATCH"
                )

        def column(name: str, what: str) -> int:
            if name not in dataset.columns:
                raise InvalidArgument(
                    f"{view.name}: {what} needs column {name!r}, which {dataset.name} does not have",
                    reason="UNKNOWN_COLUMN",
                    metadata={"column": name, "dataset": dataset.name},
                )
            return dataset.columns[name]

        view.source.timestamp_column = view.source.timestamp_column or dataset.event_time_column
        if not view.source.timestamp_column:
            raise InvalidArgument(
                f"{view.name}: {dataset.name} declares no event-time column; name one in source.timestamp_column",
                reason="NO_TIMESTAMP_COLUMN",
            )
        for what, name in (("the event time", view.source.timestamp_column), ("the created time", view.source.created_timestamp_column)):
            if name and column(name, what) != TIMESTAMP_COLUMN:
                raise InvalidArgument(f"{view.name}: {what} column {name!r} is not a TIMESTAMP column", reason="NOT_A_TIMESTAMP_COLUMN")
        for name in view.source.field_mapping:
            column(name, "source.field_mapping")
        dataset_column = {target: name for name, target in view.source.field_mapping.items()}
        self._check_features(view.name, view.features, set(join_keys))
        typed = [(key, value_type, f"join key {key!r}") for key, value_type in join_keys.items()]
        typed += [(f.column or f.name, f.value_type, f"feature {f.name!r}") for f in view.features]
        for name, value_type, what in typed:
            source_column = dataset_column.get(name, name)
            column_type = column(source_column, what)
            if not values.column_backs(column_type, value_type):
                raise InvalidArgument(
                    f"{view.name}: {what} is {values.type_name(value_type)} but column {source_column!r} of {dataset.name} is "
                    f"{values.column_type_name(column_type)}",
                    reason="COLUMN_TYPE_MISMATCH",
                    metadata={"column": source_column},
                )
        if view.ttl.seconds < 0 or view.ttl.nanos:
            raise InvalidArgument(f"{view.name}: ttl must be whole non-negative seconds", reason="INVALID_TTL")
        if view.materialization.schedule and not croniter.is_valid(view.materialization.schedule):
            raise InvalidArgument(
                f"{view.name}: materialization.schedule {view.materialization.schedule!r} is not a cron expression",
                reason="INVALID_SCHEDULE",
            )

    def _views_region(self, session: Any, owner: str, references: Iterable[str]) -> str:
        regions = set()
        for reference in references:
            if reference.startswith(names.ON_DEMAND_FEATURE_VIEWS + "/"):
                regions.add(
                    self._require(session, ON_DEMAND_FEATURE_VIEW, names.parse(reference, names.ON_DEMAND_FEATURE_VIEWS)).residency.region
                )
            else:
                regions.add(
                    self._require(session, FEATURE_VIEW, names.parse(reference, names.FEATURE_VIEWS, "feature_view")).residency.region
                )
        if len(regions) > 1:
            raise InvalidArgument(f"{owner}: its views belong to several regions ({', '.join(sorted(regions))})", reason="MIXED_RESIDENCY")
        return regions.pop() if regions else self.config.region

    def _check_on_demand_feature_view(self, session: Any, view: messages.OnDemandFeatureView, action: str) -> None:
        if not view.source_feature_views:
            raise InvalidArgument(f"{view.name}: at least one source feature view is required", reason="NO_SOURCES")
        if any(not r.startswith(names.FEATURE_VIEWS + "/") for r in view.source_feature_views):
            raise InvalidArgument(f"{view.name}: sources must be featureViews/{{id}}", reason="INVALID_SOURCE")
        view.residency.region = self._views_region(session, view.name, view.source_feature_views)
        for field in view.request_fields:
            if not IDENTIFIER.match(field.name):
                raise InvalidArgument(f"{view.name}: request field {field.name!r} is not a valid name", reason="INVALID_REQUEST_FIELD")
            values.check_value_type(field.value_type, f"{view.name}: request field {field.name}")
        self._check_features(view.name, view.features, set())
        transformation = view.transformation
        if transformation.mode == messages.TRANSFORMATION_MODE_UNSPECIFIED or not transformation.function_name:
            raise InvalidArgument(
                f"{view.name}: transformation.mode and transformation.function_name are required", reason="INVALID_TRANSFORMATION"
            )
        load_transformation(transformation, view.name)

    def _check_feature_service(self, session: Any, service: messages.FeatureService, action: str) -> None:
        if not service.projections:
            raise InvalidArgument(f"{service.name}: at least one projection is required", reason="NO_PROJECTIONS")
        for projection in service.projections:
            if projection.feature_view.startswith(names.ON_DEMAND_FEATURE_VIEWS + "/"):
                view: Any = self._require(
                    session, ON_DEMAND_FEATURE_VIEW, names.parse(projection.feature_view, names.ON_DEMAND_FEATURE_VIEWS)
                )
            else:
                view = self._require(session, FEATURE_VIEW, names.parse(projection.feature_view, names.FEATURE_VIEWS, "feature_view"))
            known = {f.name for f in view.features}
            for feature in projection.features:
                if feature not in known:
                    reference = f"{_id_of(projection.feature_view)}:{feature}"
                    raise NotFound(
                        f"{service.name}: feature {reference} does not exist", reason="FEATURE_NOT_FOUND", metadata={"feature": reference}
                    )
            if projection.name_alias and not IDENTIFIER.match(projection.name_alias):
                raise InvalidArgument(f"{service.name}: name_alias {projection.name_alias!r} is not a valid name", reason="INVALID_ALIAS")
        service.residency.region = self._views_region(session, service.name, [p.feature_view for p in service.projections])

    # -- dependents ---------------------------------------------------------------------
    def _dependents(self, session: Any, kind: Kind, resource_id: str) -> list[str]:
        reference = names.name(kind.collection, resource_id)
        if kind is ENTITY:
            return [names.name(names.FEATURE_VIEWS, v) for v in self.store.views_keyed_by(session, resource_id)]
        found = []
        if kind is FEATURE_VIEW:
            found += [v.name for v in self.store.list_on_demand_feature_views(session) if reference in v.source_feature_views]
        if kind in (FEATURE_VIEW, ON_DEMAND_FEATURE_VIEW):
            found += [s.name for s in self.store.list_feature_services(session) if any(p.feature_view == reference for p in s.projections)]
        return found

    # -- generic operations -------------------------------------------------------------
    def _stamp(self, definition: Any, kind: Kind, created: Any | None) -> None:
        now, caller = _now(), current_caller()
        if created is None:
            definition.create_stamp.actor = caller
            definition.create_stamp.time.FromDatetime(now)
        else:
            definition.create_stamp.CopyFrom(created.create_stamp)
        definition.update_stamp.actor = caller
        definition.update_stamp.time.FromDatetime(now)
        definition.etag = etag_of(kind, definition)

    def _write(self, session: Any, kind: Kind, resource_id: str, definition: Any, existing: Any | None) -> None:
        if existing is None:
            getattr(self.store, f"insert_{kind.field}")(session, resource_id, definition)
        else:
            getattr(self.store, f"update_{kind.field}")(session, resource_id, definition)
            if kind is FEATURE_VIEW and existing.source.dataset != definition.source.dataset:
                # Another dataset: what was pulled and materialized from the old one no longer applies.
                self.store.put_view_state(session, ViewState(resource_id))

    def _delete(self, session: Any, kind: Kind, resource_id: str) -> None:
        getattr(self.store, f"delete_{kind.field}")(session, resource_id)

    def create(self, kind: Kind, request: Any) -> Any:
        method = f"{SERVICE}Create{kind.title}"
        response_type = getattr(requests, f"Create{kind.title}Response")
        resource_id = names.check_id(getattr(request, f"{kind.field}_id"), f"{kind.field}_id")
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, response_type)
            if replayed is not None:
                return replayed
            if self._get(session, kind, resource_id) is not None:
                reference = names.name(kind.collection, resource_id)
                raise AlreadyExists(
                    f"{kind.label} {reference} already exists", reason=f"{kind.title.upper()}_EXISTS", metadata={"name": reference}
                )
            definition = self._normalize(session, kind, resource_id, getattr(request, kind.field), f"Create{kind.title}")
            self._stamp(definition, kind, None)
            response = response_type(**{kind.field: definition})
            if request.validate_only:
                return response
            self._write(session, kind, resource_id, definition, None)
            self.sync_feast(session)
            remember(session, request_log, method, request, response)
        self.on_change()
        return response

    def get(self, kind: Kind, name: str) -> Any:
        with self.store.transaction() as session:
            return self._require(session, kind, names.parse(name, kind.collection))

    def list_definitions(self, kind: Kind, request: Any, keep: Callable[[Any], bool] = lambda _: True) -> tuple[list[Any], str]:
        tags = dict(request.tags)
        with self.store.transaction() as session:
            found = [d for d in self._list(session, kind) if all(d.tags.get(k) == v for k, v in tags.items()) and keep(d)]
        filters = {field.name: str(value) for field, value in request.ListFields() if field.name not in ("page_size", "page_token")}
        return paginate(found, request.page_size, request.page_token, filters)

    def update(self, kind: Kind, request: Any) -> Any:
        method = f"{SERVICE}Update{kind.title}"
        response_type = getattr(requests, f"Update{kind.title}Response")
        changes = getattr(request, kind.field)
        resource_id = names.parse(changes.name, kind.collection, f"{kind.field}.name")
        paths = list(request.update_mask.paths) or list(kind.updatable)
        for path in paths:
            if path not in kind.updatable:
                raise InvalidArgument(
                    f"update_mask path {path!r} cannot be changed; changeable: {', '.join(kind.updatable)}", reason="INVALID_UPDATE_MASK"
                )
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, response_type)
            if replayed is not None:
                return replayed
            existing = self._require(session, kind, resource_id)
            if changes.etag and changes.etag != existing.etag:
                raise Aborted(f"{existing.name} changed since it was read (etag {changes.etag}); read it again", reason="ETAG_MISMATCH")
            if kind is ENTITY and "join_keys" in paths and self.store.views_keyed_by(session, resource_id):
                before = [(k.name, k.value_type) for k in existing.join_keys]
                if before != [(k.name, k.value_type) for k in changes.join_keys]:
                    raise FailedPrecondition(
                        f"{existing.name} is used by feature views; its join keys cannot change", reason="ENTITY_IN_USE"
                    )
            merged = type(existing)()
            merged.CopyFrom(existing)
            for path in paths:
                _copy_field(changes, merged, path)
            if kind is FEATURE_VIEW:
                merged.residency.CopyFrom(existing.residency)
            definition = self._normalize(session, kind, resource_id, merged, f"Update{kind.title}")
            self._stamp(definition, kind, existing)
            self._write(session, kind, resource_id, definition, existing)
            self.sync_feast(session)
            response = response_type(**{kind.field: definition})
            remember(session, request_log, method, request, response)
        self.on_change()
        return response

    def delete(self, kind: Kind, request: Any) -> Any:
        method = f"{SERVICE}Delete{kind.title}"
        response_type = getattr(requests, f"Delete{kind.title}Response")
        resource_id = names.parse(request.name, kind.collection)
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, response_type)
            if replayed is not None:
                return replayed
            existing = self._require(session, kind, resource_id)
            if request.etag and request.etag != existing.etag:
                raise Aborted(f"{existing.name} changed since it was read (etag {request.etag}); read it again", reason="ETAG_MISMATCH")
            dependents = self._dependents(session, kind, resource_id)
            if dependents and not request.force:
                raise FailedPrecondition(
                    f"{existing.name} is used by {', '.join(dependents)}; delete those first or force",
                    reason=f"{kind.title.upper()}_IN_USE",
                    metadata={"used_by": ",".join(dependents)},
                )
            self._delete(session, kind, resource_id)
            self.sync_feast(session)
            response = response_type(name=existing.name)
            remember(session, request_log, method, request, response)
        self.on_change()
        return response

    # -- declarative apply ---------------------------------------------------------------
    def apply(self, request: requests.ApplyFeatureDefinitionsRequest) -> requests.ApplyFeatureDefinitionsResponse:
        method = f"{SERVICE}ApplyFeatureDefinitions"
        definitions = request.definitions
        groups = (
            (ENTITY, list(definitions.entities)),
            (FEATURE_VIEW, list(definitions.feature_views)),
            (ON_DEMAND_FEATURE_VIEW, list(definitions.on_demand_feature_views)),
            (FEATURE_SERVICE, list(definitions.feature_services)),
        )
        caller = current_caller()
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, requests.ApplyFeatureDefinitionsResponse)
            if replayed is not None:
                return replayed
            response = requests.ApplyFeatureDefinitionsResponse()
            declared: set[tuple[str, str]] = set()
            # In dependency order, so a view can name an entity defined in the same file.
            for kind, declared_definitions in groups:
                for definition in declared_definitions:
                    resource_id = names.check_id(names.parse(definition.name, kind.collection, f"{kind.field}.name"), f"{kind.field} id")
                    if (kind.collection, resource_id) in declared:
                        raise InvalidArgument(f"{definition.name} is defined twice", reason="DUPLICATE_DEFINITION")
                    declared.add((kind.collection, resource_id))
                    existing = self._get(session, kind, resource_id)
                    normalized = self._normalize(session, kind, resource_id, definition, "ApplyFeatureDefinitions")
                    if existing is not None:
                        normalized.owner = definition.owner or existing.owner
                    change = response.changes.add(kind=kind.definition_kind, name=normalized.name)
                    if existing is None:
                        change.action = messages.APPLY_ACTION_CREATE
                    else:
                        fields = changed_fields(kind, existing, normalized)
                        change.action = messages.APPLY_ACTION_UPDATE if fields else messages.APPLY_ACTION_UNCHANGED
                        change.changed_fields.extend(fields)
                        if kind is FEATURE_VIEW and "residency" in fields:
                            raise InvalidArgument(f"{normalized.name}: residency cannot change", reason="RESIDENCY_IMMUTABLE")
                    if change.action != messages.APPLY_ACTION_UNCHANGED:
                        self._stamp(normalized, kind, existing)
                        self._write(session, kind, resource_id, normalized, existing)
            if request.prune:
                # Dependents first, so a pruned view's services go before it.
                for kind, _ in reversed(groups):
                    for existing in self._list(session, kind):
                        resource_id = _id_of(existing.name)
                        if (kind.collection, resource_id) in declared or existing.owner != caller:
                            continue
                        response.changes.add(kind=kind.definition_kind, name=existing.name, action=messages.APPLY_ACTION_DELETE)
                        self._delete(session, kind, resource_id)
            if request.validate_only:
                session.rollback()
                return response
            self.sync_feast(session)
            remember(session, request_log, method, request, response)
        self.on_change()
        return response
