"""Resource names of the training service, alias rules, and opaque page tokens."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.runtime.validate import int64

ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
FEATURE_REFERENCE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*:[A-Za-z_][A-Za-z0-9_.-]*$")
DATASET_VERSION_PATTERN = re.compile(r"^datasets/[A-Za-z0-9_.-]+/versions/[A-Za-z0-9_.-]+$")
FEATURE_SERVICE_PATTERN = re.compile(r"^featureServices/[A-Za-z0-9_.-]+$")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def check_id(value: str, what: str, field: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            f"{what} id {value!r} must be 1-63 lower-case letters, digits, '-' or '_', starting with a letter",
            reason="INVALID_ID",
            metadata={"field": field},
        )
    return value


def check_alias(alias: str, field: str = "alias") -> str:
    if not ALIAS_PATTERN.match(alias):
        raise InvalidArgument(
            f"alias {alias!r} must be 1-63 lower-case letters, digits, '-' or '_', starting with a letter",
            reason="INVALID_ALIAS",
            metadata={"field": field},
        )
    return alias


def job_id_of(name: str, field: str = "name") -> str:
    prefix, _, job_id = name.partition("/")
    if prefix != "trainingJobs" or not job_id or "/" in job_id:
        raise InvalidArgument(f"{field} {name!r} is not a training job name (trainingJobs/{{training_job}})", metadata={"field": field})
    return job_id


def job_name(job_id: str) -> str:
    return f"trainingJobs/{job_id}"


def model_id_of(name: str, field: str = "name") -> str:
    prefix, _, model = name.partition("/")
    if prefix != "models" or not model or "/" in model:
        raise InvalidArgument(f"{field} {name!r} is not a registered model name (models/{{model}})", metadata={"field": field})
    return model


def model_name(model: str) -> str:
    return f"models/{model}"


def version_parts(name: str, field: str = "name") -> tuple[str, str]:
    """(model, version) of `models/{model}/versions/{version}`; version is a number or an alias."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions" or not parts[1] or not parts[3]:
        raise InvalidArgument(
            f"{field} {name!r} is not a model version name (models/{{model}}/versions/{{version}})", metadata={"field": field}
        )
    if is_number(parts[3]):
        int64(int(parts[3]), f"the version number of {field}")
    return parts[1], parts[3]


def is_number(version: str) -> bool:
    """Whether a version reference is a number (ASCII digits) rather than an alias."""
    return version.isascii() and version.isdigit()


def version_number_of(name: str, field: str = "name") -> tuple[str, int]:
    """(model, number) of a version named by number (not alias)."""
    model, version = version_parts(name, field)
    if not is_number(version):
        raise InvalidArgument(f"{field} {name!r} must name a version by number", metadata={"field": field})
    return model, int(version)


def version_name(model: str, number: int) -> str:
    return f"models/{model}/versions/{number}"


def promotion_parts(name: str, field: str = "name") -> tuple[str, str]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "promotionRequests" or not parts[1] or not parts[3]:
        raise InvalidArgument(
            f"{field} {name!r} is not a promotion request name (models/{{model}}/promotionRequests/{{promotion_request}})",
            metadata={"field": field},
        )
    return parts[1], parts[3]


def promotion_name(model: str, request_id: str) -> str:
    return f"models/{model}/promotionRequests/{request_id}"


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", metadata={"field": "page_size"})
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(kind: str, position: Any, query: Any) -> str:
    """An opaque token: where the next page starts, and the query it belongs to."""
    raw = json.dumps({"k": kind, "p": position, "q": query}, sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, kind: str, query: Any) -> Any:
    """The position in `token`, or None for the first page; refuses a token of another query."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raw = None
    if not isinstance(raw, dict) or raw.get("k") != kind:
        raise InvalidArgument(
            "page_token is not valid; start again without one", reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"}
        )
    if raw.get("q") != json.loads(json.dumps(query, sort_keys=True)):
        raise InvalidArgument(
            "page_token belongs to a different query; keep the filters of the first page",
            reason="INVALID_PAGE_TOKEN",
            metadata={"field": "page_token"},
        )
    return raw.get("p")
