"""Consent per data subject and purpose (UAE PDPL): recorded, withdrawable, queryable by later stages."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session

from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.runtime.validate import timestamp_to_datetime
from falaj_platform.services.ingest import paging
from falaj_platform.services.ingest.commits import now_utc
from falaj_platform.services.ingest.store import IngestStore, enum_value, utc

SERVICE = "/falaj.ingest.v1.IngestService/"
MAX_SUBJECTS = 10_000


def _time(stamp: Any, field: str, default: dt.datetime | None) -> dt.datetime | None:
    """The Timestamp `stamp` (request field `field`) as UTC, or `default` when it is zero (unset)."""
    if stamp.seconds or stamp.nanos:
        return timestamp_to_datetime(stamp, field)
    return default


def _check_subject(subject_id: str, purpose: int) -> None:
    if not subject_id.strip():
        raise InvalidArgument("subject_id is required", reason="SUBJECT_ID_REQUIRED")
    if purpose not in (m.CONSENT_PURPOSE_TRAINING, m.CONSENT_PURPOSE_ANALYTICS):
        raise InvalidArgument("purpose is required (TRAINING or ANALYTICS)", reason="PURPOSE_REQUIRED")


class Consents:
    def __init__(self, store: IngestStore):
        self.store = store

    def record(self, request: rr.RecordConsentRequest, caller: str) -> rr.RecordConsentResponse:
        _check_subject(request.subject_id, request.purpose)
        now = now_utc()
        granted = _time(request.grant_time, "grant_time", now)
        expires = _time(request.expire_time, "expire_time", None)
        if expires is not None and granted is not None and expires <= granted:
            raise InvalidArgument("expire_time must be after grant_time", reason="INVALID_EXPIRY")

        def write(session: Session) -> rr.RecordConsentResponse:
            record = self.store.upsert_consent(
                session,
                request.subject_id,
                request.purpose,
                granted=True,
                when=granted or now,
                expire_time=expires,
                evidence=request.evidence,
                actor=caller,
                now=now,
            )
            return rr.RecordConsentResponse(consent=record)

        return self.store.idempotent(SERVICE + "RecordConsent", request, rr.RecordConsentResponse, write)

    def withdraw(self, request: rr.WithdrawConsentRequest, caller: str) -> rr.WithdrawConsentResponse:
        _check_subject(request.subject_id, request.purpose)
        now = now_utc()
        when = _time(request.withdraw_time, "withdraw_time", now) or now

        def write(session: Session) -> rr.WithdrawConsentResponse:
            record = self.store.upsert_consent(
                session,
                request.subject_id,
                request.purpose,
                granted=False,
                when=when,
                expire_time=None,
                evidence=request.evidence,
                actor=caller,
                now=now,
            )
            return rr.WithdrawConsentResponse(consent=record)

        return self.store.idempotent(SERVICE + "WithdrawConsent", request, rr.WithdrawConsentResponse, write)

    def list_consents(self, request: rr.ListConsentsRequest) -> rr.ListConsentsResponse:
        found = self.store.list_consents(
            request.subject_id, request.purpose, _time(request.changed_after, "changed_after", None), now_utc()
        )
        if request.state:
            found = [r for r in found if r.state == request.state]
        filters = {"s": request.subject_id, "p": request.purpose, "st": request.state, "c": request.changed_after.ToJsonString()}
        page, token = paging.paginate(found, paging.page_size(request.page_size, 100), request.page_token, filters)
        return rr.ListConsentsResponse(consents=page, next_page_token=token)

    def check(self, request: rr.CheckConsentRequest) -> rr.CheckConsentResponse:
        if len(request.subject_ids) > MAX_SUBJECTS:
            raise InvalidArgument(f"at most {MAX_SUBJECTS} subjects per call", reason="TOO_MANY_SUBJECTS")
        _check_subject("-", request.purpose)
        as_of = _time(request.as_of_time, "as_of_time", now_utc()) or now_utc()
        rows = self.store.consents_of(list(dict.fromkeys(request.subject_ids)), request.purpose)
        response = rr.CheckConsentResponse()
        for subject_id in request.subject_ids:
            row = rows.get(subject_id)
            answer = response.consents.add(subject_id=subject_id, purpose=request.purpose, state=m.CONSENT_STATE_NOT_RECORDED)
            if row is None:
                continue
            answer.consent = f"consents/{row.id}"
            granted, withdrawn, expires = utc(row.grant_time), utc(row.withdraw_time), utc(row.expire_time)
            state = enum_value(m.ConsentState, row.state)
            if granted is not None and as_of < granted:
                answer.state = m.CONSENT_STATE_NOT_RECORDED
            elif state == m.CONSENT_STATE_WITHDRAWN and withdrawn is not None and as_of >= withdrawn:
                answer.state = m.CONSENT_STATE_WITHDRAWN
            elif expires is not None and as_of >= expires:
                answer.state = m.CONSENT_STATE_EXPIRED
            else:
                answer.state = m.CONSENT_STATE_GRANTED
        return response
