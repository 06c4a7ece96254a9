"""Resource names of the ingest contract: parse what clients send, format what we answer."""

from __future__ import annotations

import re

from falaj_platform.runtime.errors import InvalidArgument

DATASET_ID = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
CHILD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(value: str, what: str) -> str:
    if not DATASET_ID.match(value):
        raise InvalidArgument(
            f"{what} {value!r} must be lower-case letters, digits, '_' or '-', start with a letter, at most 63 characters",
            reason="INVALID_ID",
        )
    return value


def dataset_name(dataset: str) -> str:
    return f"datasets/{dataset}"


def version_name(dataset: str, number: int) -> str:
    return f"datasets/{dataset}/versions/{number}"


def schema_version_name(dataset: str, major: int, minor: int) -> str:
    return f"datasets/{dataset}/schemaVersions/{major}.{minor}"


def ingestion_name(dataset: str, ingestion: str) -> str:
    return f"datasets/{dataset}/ingestions/{ingestion}"


def quarantined_row_name(dataset: str, row: str) -> str:
    return f"datasets/{dataset}/quarantinedRows/{row}"


def source_name(dataset: str, source: str) -> str:
    return f"datasets/{dataset}/sources/{source}"


def consent_name(consent: str) -> str:
    return f"consents/{consent}"


def receipt_name(receipt: str) -> str:
    return f"erasureReceipts/{receipt}"


def _invalid(value: str, pattern: str) -> InvalidArgument:
    return InvalidArgument(f"resource name {value!r} is not of the form {pattern}", reason="INVALID_NAME", metadata={"name": value})


def parse_dataset(value: str, field: str = "name") -> str:
    """The dataset id of `datasets/{dataset}`."""
    parts = value.split("/")
    if len(parts) != 2 or parts[0] != "datasets" or not DATASET_ID.match(parts[1]):
        if not value:
            raise InvalidArgument(f"{field} is required (datasets/{{dataset}})", reason="INVALID_NAME")
        raise _invalid(value, "datasets/{dataset}")
    return parts[1]


def parse_child(value: str, collection: str) -> tuple[str, str]:
    """(dataset, child id) of `datasets/{dataset}/{collection}/{id}`."""
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != "datasets" or parts[2] != collection or not DATASET_ID.match(parts[1]) or not parts[3]:
        raise _invalid(value, f"datasets/{{dataset}}/{collection}/{{id}}")
    return parts[1], parts[3]


def parse_version(value: str) -> tuple[str, int | None]:
    """(dataset, version number or None for `latest`) of `datasets/{dataset}/versions/{version}`."""
    dataset, version = parse_child(value, "versions")
    if version == "latest":
        return dataset, None
    if not version.isdigit() or int(version) < 1:
        raise _invalid(value, "datasets/{dataset}/versions/{number|latest}")
    return dataset, int(version)


def parse_schema_version(value: str) -> tuple[str, int, int]:
    dataset, version = parse_child(value, "schemaVersions")
    major, _, minor = version.partition(".")
    if not major.isdigit() or not minor.isdigit():
        raise _invalid(value, "datasets/{dataset}/schemaVersions/{major}.{minor}")
    return dataset, int(major), int(minor)


def parse_top(value: str, collection: str) -> str:
    """The id of `{collection}/{id}` (consents, erasureReceipts)."""
    parts = value.split("/")
    if len(parts) != 2 or parts[0] != collection or not parts[1]:
        raise _invalid(value, f"{collection}/{{id}}")
    return parts[1]
