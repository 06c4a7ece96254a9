"""Declarative definition files (`falaj features apply FILE`), parsed on the client side.

A YAML or JSON file lists entities, feature views, on-demand feature views and feature
services; `build_apply_request` turns it into one `ApplyFeatureDefinitionsRequest`.
The file uses short forms where they read better, for example:

    entities:
      - name: customer
        join_keys: [{name: customer_id, value_type: INT64}]
    feature_views:
      - name: customer_spend
        entities: [customer]
        source: {dataset: transactions}          # datasets/transactions
        features:
          - {name: amount, value_type: DOUBLE}
          - {name: spend_category, column: category, value_type: STRING}
        ttl: 1d                                  # 90s, 15m, 6h, 1d, 2w, 1h30m; 0 = forever
        online: true
        residency: ae-dxb
        materialization: {schedule: "0 * * * *", on_new_dataset_version: true}
    on_demand_feature_views:
      - name: spend_in_aed
        source_feature_views: [customer_spend]
        request_fields: [{name: rate, value_type: DOUBLE}]
        features: [{name: amount_aed, value_type: DOUBLE}]
        transformation: {mode: PYTHON, function_name: convert, function_file: convert.py}
    feature_services:
      - name: churn_model
        projections: [{feature_view: customer_spend, features: [amount]}]

Names may be bare ids or full resource names; value types are ValueType names with or
without the `VALUE_TYPE_` prefix; `function_file` is read relative to the file.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests


class DefinitionFileError(ValueError):
    """A definition file that cannot be turned into definitions; the message says where."""


SECTIONS = {
    "entities": "entities",
    "feature_views": "featureViews",
    "on_demand_feature_views": "onDemandFeatureViews",
    "feature_services": "featureServices",
}
_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_UNITS = (7 * 86400, 86400, 3600, 60, 1)
_TYPE_ALIASES = {"INT": "INT64", "FLOAT64": "DOUBLE", "FLOAT32": "FLOAT", "STR": "STRING", "BOOLEAN": "BOOL"}


def _resource(value: Any, collection: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DefinitionFileError(f"{where}: a name is required")
    return value if "/" in value else f"{collection}/{value}"


def _value_type(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DefinitionFileError(f"{where}: value_type must be a type name such as INT64 or STRING")
    name = value.strip().upper().removeprefix("VALUE_TYPE_")
    name = _TYPE_ALIASES.get(name, name)
    if f"VALUE_TYPE_{name}" not in messages.ValueType.keys() or name == "UNSPECIFIED":
        known = ", ".join(k.removeprefix("VALUE_TYPE_") for k in messages.ValueType.keys() if k != "VALUE_TYPE_UNSPECIFIED")
        raise DefinitionFileError(f"{where}: unknown value_type {value!r}; one of {known}")
    return f"VALUE_TYPE_{name}"


def _duration(value: Any, where: str) -> str:
    if isinstance(value, bool):
        raise DefinitionFileError(f"{where}: ttl must be a duration such as 6h")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip():
        match = _DURATION.match(value.strip())
        if match is None or not any(match.groups()):
            raise DefinitionFileError(f"{where}: {value!r} is not a duration such as 90s, 15m, 6h, 1d or 1h30m")
        seconds = sum(int(part) * unit for part, unit in zip(match.groups(), _UNITS, strict=True) if part)
    else:
        raise DefinitionFileError(f"{where}: ttl must be a duration such as 6h")
    if seconds < 0:
        raise DefinitionFileError(f"{where}: ttl must not be negative")
    return f"{seconds}s"


def _typed(items: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise DefinitionFileError(f"{where}: expected a list")
    typed = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DefinitionFileError(f"{where}[{index}]: expected a mapping with name and value_type")
        typed.append({**item, "value_type": _value_type(item.get("value_type"), f"{where}[{index}]")})
    return typed


def _names(items: Any, collection: str, where: str) -> list[str]:
    if not isinstance(items, list):
        raise DefinitionFileError(f"{where}: expected a list of names")
    return [_resource(item, collection, f"{where}[{index}]") for index, item in enumerate(items)]


def _normalize(section: str, item: dict[str, Any], where: str, base_dir: Path) -> dict[str, Any]:
    item = dict(item)
    item["name"] = _resource(item.get("name"), SECTIONS[section], where)
    if isinstance(item.get("residency"), str):
        item["residency"] = {"region": item["residency"]}
    if "features" in item:
        item["features"] = _typed(item["features"], f"{where}.features")
    if section == "entities" and "join_keys" in item:
        item["join_keys"] = _typed(item["join_keys"], f"{where}.join_keys")
    if section == "feature_views":
        if "entities" in item:
            item["entities"] = _names(item["entities"], "entities", f"{where}.entities")
        source = item.get("source")
        if isinstance(source, str):
            source = {"dataset": source}
        if isinstance(source, dict):
            source = dict(source)
            source["dataset"] = _resource(source.get("dataset"), "datasets", f"{where}.source.dataset")
            item["source"] = source
        if "ttl" in item:
            item["ttl"] = _duration(item["ttl"], f"{where}.ttl")
    if section == "on_demand_feature_views":
        if "source_feature_views" in item:
            item["source_feature_views"] = _names(item["source_feature_views"], "featureViews", f"{where}.source_feature_views")
        if "request_fields" in item:
            item["request_fields"] = _typed(item["request_fields"], f"{where}.request_fields")
        transformation = item.get("transformation")
        if isinstance(transformation, dict):
            transformation = dict(transformation)
            mode = str(transformation.get("mode", "PYTHON")).upper().removeprefix("TRANSFORMATION_MODE_")
            transformation["mode"] = f"TRANSFORMATION_MODE_{mode}"
            file = transformation.pop("function_file", None)
            if file is not None:
                path = base_dir / str(file)
                try:
                    transformation["function_source"] = path.read_text()
                except OSError as error:
                    raise DefinitionFileError(f"{where}.transformation.function_file: cannot read {path}: {error.strerror}") from None
            item["transformation"] = transformation
    if section == "feature_services" and "projections" in item:
        projections = []
        for index, projection in enumerate(item["projections"] or []):
            if not isinstance(projection, dict):
                raise DefinitionFileError(f"{where}.projections[{index}]: expected a mapping")
            reference = projection.get("feature_view")
            collection = (
                "onDemandFeatureViews" if isinstance(reference, str) and reference.startswith("onDemandFeatureViews/") else "featureViews"
            )
            projections.append(
                {**projection, "feature_view": _resource(reference, collection, f"{where}.projections[{index}].feature_view")}
            )
        item["projections"] = projections
    return item


def parse_definitions(text: str, *, base_dir: Path | str = ".", source_name: str = "definitions") -> messages.FeatureDefinitions:
    """Definitions from YAML or JSON text (JSON is YAML, so one parser reads both)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DefinitionFileError(f"{source_name}: not valid YAML or JSON: {error}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise DefinitionFileError(f"{source_name}: the top level must be a mapping of {', '.join(SECTIONS)}")
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise DefinitionFileError(f"{source_name}: unknown section {unknown[0]!r}; expected {', '.join(SECTIONS)}")
    normalized: dict[str, list[dict[str, Any]]] = {}
    for section in SECTIONS:
        items = document.get(section) or []
        if not isinstance(items, list):
            raise DefinitionFileError(f"{source_name}: {section} must be a list")
        normalized[section] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise DefinitionFileError(f"{source_name}: {section}[{index}] must be a mapping")
            normalized[section].append(_normalize(section, item, f"{source_name}: {section}[{index}]", Path(base_dir)))
    try:
        return json_format.ParseDict(json.loads(json.dumps(normalized, default=str)), messages.FeatureDefinitions())
    except json_format.ParseError as error:
        raise DefinitionFileError(f"{source_name}: {error}") from None


def load_definitions(path: Path | str) -> messages.FeatureDefinitions:
    """Definitions from a YAML or JSON file."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise DefinitionFileError(f"cannot read {file}: {error.strerror}") from None
    return parse_definitions(text, base_dir=file.parent, source_name=str(file))


def build_apply_request(
    path: Path | str, *, prune: bool = False, validate_only: bool = False, request_id: str | None = None
) -> requests.ApplyFeatureDefinitionsRequest:
    """The ApplyFeatureDefinitions request for a definition file; retries reuse `request_id`."""
    return requests.ApplyFeatureDefinitionsRequest(
        definitions=load_definitions(path),
        prune=prune,
        validate_only=validate_only,
        request_id=request_id or f"apply-{uuid.uuid4().hex}",
    )


def describe_changes(response: requests.ApplyFeatureDefinitionsResponse) -> list[str]:
    """One line per change, for the CLI to print."""
    lines = []
    for change in response.changes:
        action = messages.ApplyAction.Name(change.action).removeprefix("APPLY_ACTION_").lower()
        fields = f" ({', '.join(change.changed_fields)})" if change.changed_fields else ""
        lines.append(f"{action:9} {change.name}{fields}")
    return lines
