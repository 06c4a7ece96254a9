"""Resource names of the features contract: parse what clients send, format what we answer."""

from __future__ import annotations

import re

from falaj_platform.runtime.errors import InvalidArgument

# Feature-store ids: lower-case letters, digits and `_`, starting with a letter.
RESOURCE_ID = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DATASET_ID = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

ENTITIES = "entities"
FEATURE_VIEWS = "featureViews"
ON_DEMAND_FEATURE_VIEWS = "onDemandFeatureViews"
FEATURE_SERVICES = "featureServices"
MATERIALIZATIONS = "materializations"
ERASURE_APPLICATIONS = "erasureApplications"


def check_id(value: str, what: str) -> str:
    if not RESOURCE_ID.match(value):
        raise InvalidArgument(
            f"{what} {value!r} must be lower-case letters, digits and '_', start with a letter, at most 63 characters",
            reason="INVALID_ID",
            metadata={"id": value},
        )
    return value


def parse(value: str, collection: str, field: str = "name") -> str:
    """The id of `{collection}/{id}`."""
    parts = value.split("/")
    if len(parts) != 2 or parts[0] != collection or not parts[1]:
        if not value:
            raise InvalidArgument(f"{field} is required ({collection}/{{id}})", reason="INVALID_NAME")
        raise InvalidArgument(f"{field} {value!r} is not of the form {collection}/{{id}}", reason="INVALID_NAME", metadata={"name": value})
    return parts[1]


def parse_dataset(value: str, field: str = "source.dataset") -> str:
    """The dataset id of `datasets/{dataset}`."""
    parts = value.split("/")
    if len(parts) != 2 or parts[0] != "datasets" or not DATASET_ID.match(parts[1]):
        raise InvalidArgument(f"{field} {value!r} is not of the form datasets/{{dataset}}", reason="INVALID_NAME", metadata={"name": value})
    return parts[1]


def parse_dataset_version(value: str, field: str = "dataset_version") -> tuple[str, str]:
    """(dataset id, version) of `datasets/{dataset}/versions/{version}`; version may be `latest`."""
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != "datasets" or parts[2] != "versions" or not DATASET_ID.match(parts[1]) or not parts[3]:
        raise InvalidArgument(
            f"{field} {value!r} is not of the form datasets/{{dataset}}/versions/{{version}}",
            reason="INVALID_NAME",
            metadata={"name": value},
        )
    return parts[1], parts[3]


def name(collection: str, resource_id: str) -> str:
    return f"{collection}/{resource_id}"
