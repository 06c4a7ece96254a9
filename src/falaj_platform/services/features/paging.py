"""Opaque page tokens (AIP-158): an offset bound to the filter it was issued for."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import TypeVar

from falaj_platform.runtime.errors import InvalidArgument

T = TypeVar("T")


def _fingerprint(filters: object) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def page_size(requested: int, default: int = 50, maximum: int = 1000) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    return min(requested or default, maximum)


def paginate(items: Sequence[T], requested_size: int, token: str, filters: object) -> tuple[list[T], str]:
    """One page of `items` and the token of the next ('' when last)."""
    size = page_size(requested_size)
    start = 0
    if token:
        try:
            payload = json.loads(base64.urlsafe_b64decode(token.encode()))
            start, fingerprint = int(payload["o"]), str(payload["f"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument("page_token is not valid; start again without it", reason="INVALID_PAGE_TOKEN") from None
        if fingerprint != _fingerprint(filters) or start < 0:
            raise InvalidArgument("page_token was issued for other filters; start again without it", reason="INVALID_PAGE_TOKEN")
    following = start + size
    next_token = base64.urlsafe_b64encode(json.dumps({"o": following, "f": _fingerprint(filters)}).encode()).decode()
    return list(items[start:following]), (next_token if following < len(items) else "")
