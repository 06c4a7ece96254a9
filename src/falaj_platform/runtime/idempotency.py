"""Idempotent writes: a request id makes a retried write return the first answer.

Every service has a `request_log` table (see `db.request_log_columns`). A write that
carries a request id looks it up in the same transaction as the write itself:
- not seen: do the write, then `remember` the response;
- seen with the same request body: return the stored response, write nothing;
- seen with another body: refuse (a client bug or a replay), nothing is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.orm import Session

from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument

ResponseT = TypeVar("ResponseT", bound=Message)

MAX_REQUEST_ID_LENGTH = 128


def request_digest(request: Message) -> str:
    """SHA-256 of the request's deterministic serialization, without its request_id."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def replayed_response(session: Session, table: sa.Table, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT | None:
    """The stored response of an earlier identical write with this request id, or None to proceed."""
    request_id = getattr(request, "request_id", "")
    if not request_id:
        return None
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters", reason="REQUEST_ID_TOO_LONG")
    row = session.execute(
        sa.select(table.c.method, table.c.request_sha256, table.c.response).where(table.c.request_id == request_id)
    ).first()
    if row is None:
        return None
    if row.method != method or row.request_sha256 != request_digest(request):
        raise FailedPrecondition(
            f"request_id {request_id!r} was already used for a different request; use a new request id",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": request_id},
        )
    response = response_type()
    response.ParseFromString(row.response or b"")
    return response


def remember(session: Session, table: sa.Table, method: str, request: Message, response: Message) -> None:
    """Record the response of a write carrying a request id, in the write's own transaction."""
    request_id = getattr(request, "request_id", "")
    if not request_id:
        return
    session.execute(
        table.insert().values(
            request_id=request_id,
            method=method,
            request_sha256=request_digest(request),
            response=response.SerializeToString(deterministic=True),
            created_at=dt.datetime.now(dt.UTC),
        )
    )
