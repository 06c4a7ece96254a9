"""Consent per subject and purpose, and EraseSubject across every version with a receipt and an audit event."""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from google.protobuf import timestamp_pb2

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.services.ingest.erasure import receipt_digest
from tests.ingest.conftest import (
    ALICE,
    DAY2,
    IngestUnderTest,
    create_dataset,
    ingest_tables,
    payments,
    quarantined,
    read_version,
    status_of,
    versions_of,
)


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def test_consent_is_recorded_withdrawn_and_answered_as_of_a_time(ingest: IngestUnderTest) -> None:
    granted_at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    record = ingest.stub.RecordConsent(
        rr.RecordConsentRequest(
            subject_id="c-1", purpose=m.CONSENT_PURPOSE_TRAINING, grant_time=_ts(granted_at), evidence="form-88", request_id="consent-1"
        ),
        metadata=ALICE,
    ).consent
    assert (record.state, record.evidence, record.create_stamp.actor) == (
        m.CONSENT_STATE_GRANTED,
        "form-88",
        "spiffe://falaj.local/client/alice",
    )
    expiring = ingest.stub.RecordConsent(
        rr.RecordConsentRequest(
            subject_id="c-2",
            purpose=m.CONSENT_PURPOSE_TRAINING,
            grant_time=_ts(granted_at),
            expire_time=_ts(dt.datetime(2025, 2, 1, tzinfo=dt.UTC)),
        ),
        metadata=ALICE,
    ).consent
    assert expiring.state == m.CONSENT_STATE_EXPIRED
    withdrawn_at = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    withdrawn = ingest.stub.WithdrawConsent(
        rr.WithdrawConsentRequest(subject_id="c-1", purpose=m.CONSENT_PURPOSE_TRAINING, withdraw_time=_ts(withdrawn_at)), metadata=ALICE
    ).consent
    assert withdrawn.state == m.CONSENT_STATE_WITHDRAWN and withdrawn.name == record.name

    def check(as_of: dt.datetime) -> list[int]:
        response = ingest.stub.CheckConsent(
            rr.CheckConsentRequest(subject_ids=["c-1", "c-2", "c-9"], purpose=m.CONSENT_PURPOSE_TRAINING, as_of_time=_ts(as_of)),
            metadata=ALICE,
        )
        return [c.state for c in response.consents]

    assert check(dt.datetime(2025, 1, 15, tzinfo=dt.UTC)) == [
        m.CONSENT_STATE_GRANTED,
        m.CONSENT_STATE_GRANTED,
        m.CONSENT_STATE_NOT_RECORDED,
    ]
    assert check(dt.datetime(2025, 7, 1, tzinfo=dt.UTC)) == [
        m.CONSENT_STATE_WITHDRAWN,
        m.CONSENT_STATE_EXPIRED,
        m.CONSENT_STATE_NOT_RECORDED,
    ]
    analytics = ingest.stub.CheckConsent(rr.CheckConsentRequest(subject_ids=["c-1"], purpose=m.CONSENT_PURPOSE_ANALYTICS), metadata=ALICE)
    assert analytics.consents[0].state == m.CONSENT_STATE_NOT_RECORDED
    withdrawals = ingest.stub.ListConsents(rr.ListConsentsRequest(state=m.CONSENT_STATE_WITHDRAWN), metadata=ALICE).consents
    assert [c.subject_id for c in withdrawals] == ["c-1"]
    with pytest.raises(grpc.RpcError) as never_given:
        ingest.stub.WithdrawConsent(rr.WithdrawConsentRequest(subject_id="c-9", purpose=m.CONSENT_PURPOSE_ANALYTICS), metadata=ALICE)
    assert status_of(never_given.value) == (grpc.StatusCode.FAILED_PRECONDITION, "CONSENT_NOT_RECORDED")
    with pytest.raises(grpc.RpcError) as no_purpose:
        ingest.stub.RecordConsent(rr.RecordConsentRequest(subject_id="c-3"), metadata=ALICE)
    assert status_of(no_purpose.value) == (grpc.StatusCode.INVALID_ARGUMENT, "PURPOSE_REQUIRED")


def test_erasing_a_subject_rewrites_every_version_keeps_lineage_and_reports_an_audit_event(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    other = create_dataset(ingest, "refunds").name
    subject = "c-7"

    def customer(i: int) -> str:
        return subject if i % 3 == 0 else f"c-{100 + i}"

    v1 = ingest_tables(ingest, dataset, [payments(range(0, 9), customer=customer)])
    v2 = ingest_tables(ingest, dataset, [payments(range(9, 15), customer=customer, day=DAY2)])  # shares v1's files
    bad = payments(range(15, 17), customer=subject, amount=-100.0)
    ingest_tables(ingest, dataset, [bad])  # quarantined rows of the subject
    ingest_tables(ingest, other, [payments(range(3), customer="c-200")])
    before = {v.name: v for v in versions_of(ingest, dataset)}
    assert len(quarantined(ingest, dataset)) == 2

    preview = ingest.stub.EraseSubject(
        rr.EraseSubjectRequest(subject_id=subject, legal_basis="PDPL art. 15 request #42", validate_only=True), metadata=ALICE
    ).receipt
    assert preview.rows_erased == 3 + 5 + 2 and not preview.name
    assert versions_of(ingest, dataset) == list(before.values())  # a preview changes nothing

    request = rr.EraseSubjectRequest(subject_id=subject, legal_basis="PDPL art. 15 request #42", request_id="erase-42")
    receipt = ingest.stub.EraseSubject(request, metadata=ALICE).receipt

    assert receipt.state == m.ERASURE_STATE_COMPLETED and receipt.name.startswith("erasureReceipts/")
    assert receipt.rows_erased == 10 and receipt.receipt_digest == receipt_digest(receipt)
    [erased] = receipt.datasets  # the other dataset holds nothing of the subject
    assert erased.dataset == dataset and erased.quarantined_rows_erased == 2
    assert list(erased.entity_key_columns) == ["customer_id"] and list(erased.erased_entity_keys_json) == [json.dumps([subject])]
    assert {(v.dataset_version, v.rows_removed) for v in erased.versions} == {(v1.dataset_version, 3), (v2.dataset_version, 5)}
    [event] = ingest.audit.of(gateway_messages.SECURITY_EVENT_TYPE_DATA_ERASED)
    assert (event.resource, event.action, event.caller) == (receipt.name, "erase", "spiffe://falaj.local/client/alice")
    assert receipt.audit_event_id == str(event.sequence)
    assert subject not in json.dumps(dict(event.attributes)) + event.decision_detail  # no personal data in the audit log

    for name, previous in before.items():
        after = ingest.stub.GetDatasetVersion(rr.GetDatasetVersionRequest(name=name), metadata=ALICE).dataset_version
        table = read_version(ingest, name)
        assert subject not in table.column("customer_id").to_pylist()
        assert after.row_count == table.num_rows == previous.row_count - (3 if name == v1.dataset_version else 5)
        assert after.content_hash != previous.content_hash and after.lineage.original_content_hash == previous.content_hash
        [rewrite] = after.lineage.rewrites
        assert (rewrite.erasure_receipt, rewrite.previous_content_hash, rewrite.new_content_hash) == (
            receipt.name,
            previous.content_hash,
            after.content_hash,
        )
        profile = ingest.stub.GetDatasetProfile(
            rr.GetDatasetProfileRequest(dataset_version=name, columns=["customer_id"]), metadata=ALICE
        ).profile
        assert profile.row_count == after.row_count and profile.columns[0].count == after.row_count
    assert quarantined(ingest, dataset) == []
    # Old files are gone from disk; only files the versions list remain.
    on_disk = {p.relative_to(ingest.data_dir).as_posix() for p in ingest.data_dir.rglob("*.parquet")}
    assert on_disk == ingest.api.store.referenced_paths()

    with pytest.raises(grpc.RpcError) as stale:
        ingest.stub.ReadDatasetVersion(
            rr.ReadDatasetVersionRequest(name=v1.dataset_version, expected_content_hash=before[v1.dataset_version].content_hash),
            metadata=ALICE,
        ).next()
    assert status_of(stale.value) == (grpc.StatusCode.FAILED_PRECONDITION, "CONTENT_HASH_CHANGED")
    # Retrying the request returns the receipt; later stages list receipts to apply.
    assert ingest.stub.EraseSubject(request, metadata=ALICE).receipt == receipt
    listed = ingest.stub.ListErasureReceipts(rr.ListErasureReceiptsRequest(state=m.ERASURE_STATE_COMPLETED), metadata=ALICE).receipts
    assert [r.name for r in listed] == [receipt.name]
    assert ingest.stub.GetErasureReceipt(rr.GetErasureReceiptRequest(name=receipt.name), metadata=ALICE).receipt == receipt


def test_an_erasure_interrupted_by_the_audit_log_resumes_with_its_request_id(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    ingest_tables(ingest, dataset, [payments(range(4), customer=lambda i: "c-1" if i < 2 else "c-2")])
    ingest.audit.unavailable = True
    request = rr.EraseSubjectRequest(subject_id="c-1", legal_basis="request #7", request_id="erase-7")
    with pytest.raises(grpc.RpcError) as down:
        ingest.stub.EraseSubject(request, metadata=ALICE)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    [failed] = ingest.stub.ListErasureReceipts(rr.ListErasureReceiptsRequest(), metadata=ALICE).receipts
    assert failed.state == m.ERASURE_STATE_FAILED and "retry with the same request id" in failed.error_message
    assert read_version(ingest, f"{dataset}/versions/latest").column("customer_id").to_pylist() == ["c-2", "c-2"]  # erased already

    ingest.audit.unavailable = False
    receipt = ingest.stub.EraseSubject(request, metadata=ALICE).receipt
    assert (receipt.name, receipt.state, receipt.rows_erased) == (failed.name, m.ERASURE_STATE_COMPLETED, 2)
    assert len(ingest.audit.of(gateway_messages.SECURITY_EVENT_TYPE_DATA_ERASED)) == 1
    with pytest.raises(grpc.RpcError) as reused:
        ingest.stub.EraseSubject(rr.EraseSubjectRequest(subject_id="c-2", legal_basis="request #7", request_id="erase-7"), metadata=ALICE)
    assert status_of(reused.value) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
