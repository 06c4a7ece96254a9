"""Definitions: create, list, get, update, delete; declarative apply from a definition file;
residency and bad-input refusals."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.audit import SecurityEvent
from falaj_platform.services.features.definitions import DefinitionFileError, build_apply_request, describe_changes, parse_definitions
from tests.conftest import caller
from tests.features.conftest import ALICE, NOW, Features, add_transactions, define_customer_view, status_code, unique

APPLY = messages.ApplyAction
DANA = caller("dana")


def test_definitions_are_created_read_listed_updated_and_deleted(features: Features) -> None:
    dataset = add_transactions(features.source, [(1, 1.0, "a", False, NOW)])
    entity_id, view_id = define_customer_view(features, dataset)
    stub = features.stub

    view = stub.GetFeatureView(requests.GetFeatureViewRequest(name=f"featureViews/{view_id}"), metadata=ALICE, timeout=10).feature_view
    assert view.residency.region == "ae-dxb"  # taken from the dataset
    assert view.source.timestamp_column == "event_time"  # the dataset's event-time column
    assert view.owner == "spiffe://falaj.local/client/alice" and view.create_stamp.actor == view.owner
    assert [f.name for f in view.features] == ["amount", "category", "flagged"] and view.etag

    listed = stub.ListFeatureViews(requests.ListFeatureViewsRequest(entity=f"entities/{entity_id}"), metadata=ALICE, timeout=10)
    assert [v.name for v in listed.feature_views] == [f"featureViews/{view_id}"]
    assert stub.ListFeatureViews(requests.ListFeatureViewsRequest(dataset="datasets/none"), metadata=ALICE, timeout=10).feature_views == []

    changed = messages.FeatureView(name=view.name, description="spend per customer", etag=view.etag)
    changed.ttl.seconds = 3600
    updated = stub.UpdateFeatureView(
        requests.UpdateFeatureViewRequest(feature_view=changed, update_mask=field_mask_pb2.FieldMask(paths=["description", "ttl"])),
        metadata=ALICE,
        timeout=30,
    ).feature_view
    assert (updated.description, updated.ttl.seconds, len(updated.features)) == ("spend per customer", 3600, 3)
    assert updated.etag != view.etag
    stale = messages.FeatureView(name=view.name, description="x", etag=view.etag)
    code, _ = status_code(
        lambda: stub.UpdateFeatureView(
            requests.UpdateFeatureViewRequest(feature_view=stale, update_mask=field_mask_pb2.FieldMask(paths=["description"])),
            metadata=ALICE,
            timeout=10,
        )
    )
    assert code == grpc.StatusCode.ABORTED

    code, details = status_code(
        lambda: stub.DeleteEntity(requests.DeleteEntityRequest(name=f"entities/{entity_id}"), metadata=ALICE, timeout=10)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and view_id in details
    stub.DeleteFeatureView(requests.DeleteFeatureViewRequest(name=f"featureViews/{view_id}"), metadata=ALICE, timeout=30)
    stub.DeleteEntity(requests.DeleteEntityRequest(name=f"entities/{entity_id}"), metadata=ALICE, timeout=30)
    code, details = status_code(
        lambda: stub.GetFeatureView(requests.GetFeatureViewRequest(name=f"featureViews/{view_id}"), metadata=ALICE, timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND and view_id in details
    assert view_id not in [v.name for v in features.service.repo.store.list_feature_views()]  # gone from Feast's registry too


def test_create_is_idempotent_per_request_id(features: Features) -> None:
    request = requests.CreateEntityRequest(
        entity_id=unique("merchant"),
        entity=messages.Entity(join_keys=[messages.JoinKey(name="merchant_id", value_type=messages.VALUE_TYPE_STRING)]),
        request_id=unique("req"),
    )
    first = features.stub.CreateEntity(request, metadata=ALICE, timeout=10)
    again = features.stub.CreateEntity(request, metadata=ALICE, timeout=10)
    assert again.entity == first.entity
    code, _ = status_code(
        lambda: features.stub.CreateEntity(
            requests.CreateEntityRequest(entity_id=request.entity_id, entity=request.entity), metadata=ALICE, timeout=10
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS


def write_definitions(folder: Path, dataset: str, *, ttl: str = "1d") -> Path:
    (folder / "convert.py").write_text(
        "def convert(inputs):\n    return {'amount_aed': [(a or 0.0) * r for a, r in zip(inputs['amount'], inputs['rate'])]}\n"
    )
    path = folder / "features.yaml"
    path.write_text(
        f"""
entities:
  - name: buyer
    join_keys: [{{name: customer_id, value_type: INT64}}]
feature_views:
  - name: buyer_spend
    entities: [buyer]
    source: {{dataset: {dataset.removeprefix("datasets/")}}}
    features:
      - {{name: amount, value_type: double}}
      - {{name: spend_category, column: category, value_type: STRING}}
    ttl: {ttl}
    online: true
    materialization: {{schedule: "0 * * * *", on_new_dataset_version: true}}
on_demand_feature_views:
  - name: buyer_spend_aed
    source_feature_views: [buyer_spend]
    request_fields: [{{name: rate, value_type: DOUBLE}}]
    features: [{{name: amount_aed, value_type: DOUBLE}}]
    transformation: {{mode: PYTHON, function_name: convert, function_file: convert.py}}
feature_services:
  - name: buyer_model
    projections:
      - {{feature_view: buyer_spend, features: [amount]}}
      - {{feature_view: onDemandFeatureViews/buyer_spend_aed}}
"""
    )
    return path


def test_definition_file_is_applied_then_unchanged_then_updated_then_pruned(features: Features, tmp_path: Path) -> None:
    # Its own caller: prune deletes only the caller's definitions that the file leaves out.
    dataset = add_transactions(features.source, [(1, 1.0, "a", False, NOW)])
    path = write_definitions(tmp_path, dataset)
    plan = features.stub.ApplyFeatureDefinitions(build_apply_request(path, validate_only=True), metadata=DANA, timeout=60)
    assert [c.action for c in plan.changes] == [APPLY.APPLY_ACTION_CREATE] * 4
    code, _ = status_code(lambda: features.stub.GetEntity(requests.GetEntityRequest(name="entities/buyer"), metadata=DANA, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND  # validate_only changed nothing

    applied = features.stub.ApplyFeatureDefinitions(build_apply_request(path), metadata=DANA, timeout=60)
    assert describe_changes(applied) == [
        "create    entities/buyer",
        "create    featureViews/buyer_spend",
        "create    onDemandFeatureViews/buyer_spend_aed",
        "create    featureServices/buyer_model",
    ]
    view = features.stub.GetFeatureView(
        requests.GetFeatureViewRequest(name="featureViews/buyer_spend"), metadata=DANA, timeout=10
    ).feature_view
    assert view.ttl.seconds == 86400 and view.features[1].column == "category" and view.materialization.on_new_dataset_version
    again = features.stub.ApplyFeatureDefinitions(build_apply_request(path), metadata=DANA, timeout=60)
    assert [c.action for c in again.changes] == [APPLY.APPLY_ACTION_UNCHANGED] * 4

    write_definitions(tmp_path, dataset, ttl="6h")
    updated = features.stub.ApplyFeatureDefinitions(build_apply_request(path), metadata=DANA, timeout=60)
    assert [(c.name, c.action, list(c.changed_fields)) for c in updated.changes if c.action != APPLY.APPLY_ACTION_UNCHANGED] == [
        ("featureViews/buyer_spend", APPLY.APPLY_ACTION_UPDATE, ["ttl"])
    ]

    (tmp_path / "only_entity.json").write_text(
        '{"entities": [{"name": "buyer", "join_keys": [{"name": "customer_id", "value_type": "INT64"}]}]}'
    )
    pruned = features.stub.ApplyFeatureDefinitions(
        build_apply_request(tmp_path / "only_entity.json", prune=True), metadata=DANA, timeout=60
    )
    assert sorted(c.name for c in pruned.changes if c.action == APPLY.APPLY_ACTION_DELETE) == [
        "featureServices/buyer_model",
        "featureViews/buyer_spend",
        "onDemandFeatureViews/buyer_spend_aed",
    ]
    listed = features.stub.ListFeatureServices(requests.ListFeatureServicesRequest(), metadata=DANA, timeout=10)
    assert "featureServices/buyer_model" not in [s.name for s in listed.feature_services]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("entities: [{name: x, join_keys: [{name: k, value_type: DECIMAL}]}]", "unknown value_type"),
        ("feature_views: [{name: v, ttl: soon}]", "not a duration"),
        ("features: []", "unknown section"),
        ("- just a list", "top level must be a mapping"),
    ],
)
def test_definition_file_mistakes_are_reported_with_their_place(text: str, message: str) -> None:
    with pytest.raises(DefinitionFileError, match=message):
        parse_definitions(text)


def test_view_over_a_dataset_of_another_region_is_refused_and_audited(features: Features) -> None:
    dataset = add_transactions(features.source, [(1, 1.0, "a", False, NOW)], region="ae-auh")
    before = len(features.audit.events)
    code, details = status_code(lambda: define_customer_view(features, dataset))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "ae-auh" in details
    event = features.audit.events[before]
    assert (event.event_type, event.allowed, event.attributes["dataset"]) == (SecurityEvent.CROSS_REGION_ACCESS, False, dataset)


def test_bad_definitions_get_clear_statuses(features: Features) -> None:
    dataset = add_transactions(features.source, [(1, 1.0, "a", False, NOW)])
    entity_id, _ = define_customer_view(features, dataset)

    def create(view: messages.FeatureView, view_id: str = "v_bad") -> tuple[grpc.StatusCode, str]:
        return status_code(
            lambda: features.stub.CreateFeatureView(
                requests.CreateFeatureViewRequest(feature_view_id=view_id, feature_view=view), metadata=ALICE, timeout=10
            )
        )

    def view(**changes: object) -> messages.FeatureView:
        base = messages.FeatureView(
            entities=[f"entities/{entity_id}"],
            source=messages.DatasetSource(dataset=dataset),
            features=[messages.Feature(name="amount", value_type=messages.VALUE_TYPE_DOUBLE)],
            online=True,
        )
        for key, value in changes.items():
            if key == "features":
                del base.features[:]
                base.features.extend(value)  # type: ignore[arg-type]
            elif key == "dataset":
                base.source.dataset = str(value)
            elif key == "entities":
                del base.entities[:]
                base.entities.extend(value)  # type: ignore[arg-type]
        return base

    assert create(view(), view_id="Bad-Id")[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = create(view(features=[messages.Feature(name="nope", value_type=messages.VALUE_TYPE_DOUBLE)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details
    code, details = create(view(features=[messages.Feature(name="amount", value_type=messages.VALUE_TYPE_STRING)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FLOAT" in details
    code, details = create(view(dataset="datasets/missing"))
    assert code == grpc.StatusCode.NOT_FOUND and "datasets/missing" in details
    code, details = create(view(entities=["entities/ghost"]))
    assert code == grpc.StatusCode.NOT_FOUND and "entities/ghost" in details
    code, _ = create(view(features=[messages.Feature(name="amount")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
