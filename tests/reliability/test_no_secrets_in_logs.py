"""No PII values, credentials or key material in any log of a real local stack.

`falaj stack up` runs every component as a process with INFO logs; a small flow pushes
recognisable canary values through the gateway (a dataset whose columns carry PII tags,
a quarantined row, consent, erasure, a SQL import whose URL holds a password, lookups
that name the values), then every log file under FALAJ_HOME is searched for them and for
the private keys, the audit signing key and the training service's key-encryption key.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from pathlib import Path

import grpc
import pyarrow as pa

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as im
from falaj.ingest.v1 import request_response_pb2 as ir
from falaj.ingest.v1 import service_pb2_grpc as isvc
from tests.reliability.conftest import LocalStack

EMAIL = "pii.canary.7731@example.ae"
PHONE = "+971 50 777 7731"
SUBJECT = "cust-canary-7731"
QUARANTINED_EMAIL = "pii.quarantined.7731@example.ae"
SQL_PASSWORD = "S3cret-canary-7731"
CANARIES = [EMAIL, PHONE, SUBJECT, QUARANTINED_EMAIL, SQL_PASSWORD]


def _schema() -> im.Schema:
    return im.Schema(
        columns=[
            im.Column(name="customer_id", type=im.COLUMN_TYPE_STRING, pii_categories=[im.PII_CATEGORY_DIRECT_IDENTIFIER]),
            im.Column(
                name="email",
                type=im.COLUMN_TYPE_STRING,
                nullable=True,
                pii_categories=[im.PII_CATEGORY_CONTACT],
                constraints=im.ColumnConstraints(regex=r"[^@\s]+@[^@\s]+"),
            ),
            im.Column(name="phone", type=im.COLUMN_TYPE_STRING, nullable=True, pii_categories=[im.PII_CATEGORY_CONTACT]),
            im.Column(name="amount", type=im.COLUMN_TYPE_FLOAT, constraints=im.ColumnConstraints(range=im.RangeConstraint(min=0))),
            im.Column(name="paid_at", type=im.COLUMN_TYPE_TIMESTAMP),
        ],
        event_time_column="paid_at",
        data_subject_column="customer_id",
    )


def _rows() -> bytes:
    now = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    table = pa.table(
        {
            "customer_id": [SUBJECT, "cust-2", "cust-3"],
            "email": [EMAIL, "someone@example.ae", QUARANTINED_EMAIL],
            "phone": [PHONE, None, PHONE],
            "amount": [12.5, 7.0, -5.0],  # the last row breaks the range rule: quarantined with its values
            "paid_at": pa.array([now, now, now], pa.timestamp("us", tz="UTC")),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _flow(stack: LocalStack) -> None:
    stub = isvc.IngestServiceStub(stack.channel("admin"))
    dataset = im.Dataset(schema=_schema(), residency=common.Residency(region="ae-dxb"), description="payments with PII")
    stub.CreateDataset(ir.CreateDatasetRequest(dataset_id="customers", dataset=dataset, request_id="pii-dataset"), timeout=60)
    stream = [
        ir.IngestBatchesRequest(header=ir.IngestStreamHeader(dataset="datasets/customers", request_id="pii-ingest")),
        ir.IngestBatchesRequest(batch=common.ArrowBatch(arrow_ipc=_rows(), batch_id="pii-1", row_count=3)),
    ]
    ingestion = stub.IngestBatches(iter(stream), timeout=120).ingestion
    assert ingestion.report.rows_quarantined == 1, ingestion
    read = stub.ReadDatasetVersion(ir.ReadDatasetVersionRequest(name=ingestion.dataset_version), timeout=60)
    emails = [e for r in read for e in pa.ipc.open_stream(r.batch.arrow_ipc).read_all().column("email").to_pylist()]
    assert EMAIL in emails  # the values really went through the platform
    quarantined = stub.ListQuarantinedRows(ir.ListQuarantinedRowsRequest(parent="datasets/customers"), timeout=60).quarantined_rows
    assert QUARANTINED_EMAIL in str(quarantined)  # kept as received, for re-submission
    stub.RecordConsent(
        ir.RecordConsentRequest(subject_id=SUBJECT, purpose=im.CONSENT_PURPOSE_TRAINING, evidence=f"form signed by {EMAIL}"), timeout=60
    )
    stub.CheckConsent(ir.CheckConsentRequest(subject_ids=[SUBJECT], purpose=im.CONSENT_PURPOSE_TRAINING), timeout=60)
    stub.EraseSubject(ir.EraseSubjectRequest(subject_id=SUBJECT, legal_basis="PDPL art. 15 request", request_id="pii-erase"), timeout=120)
    refused = [
        lambda: stub.GetDataset(ir.GetDatasetRequest(name=f"datasets/{EMAIL}"), timeout=30),
        lambda: stub.ListConsents(ir.ListConsentsRequest(subject_id=PHONE), timeout=30),
        lambda: stub.ImportSql(
            ir.ImportSqlRequest(
                dataset="datasets/customers",
                sql=im.SqlImportSpec(
                    sqlalchemy_url=f"postgresql://falaj:{SQL_PASSWORD}@127.0.0.1:1/payments", table="payments", mode=im.SQL_IMPORT_MODE_FULL
                ),
            ),
            timeout=60,
        ),
    ]
    for call in refused:
        try:
            call()
        except grpc.RpcError as error:
            assert SQL_PASSWORD not in (error.details() or "")  # type: ignore[attr-defined]


def _key_material(home: Path) -> dict[str, str]:
    """What must never be logged: private key bodies (every line), the KEK as text, base64 and hex."""
    secrets: dict[str, str] = {"PEM private key header": "PRIVATE KEY"}
    for pem in sorted((home / "pki").rglob("*key*.pem")):
        for line in pem.read_text().splitlines():
            if len(line) >= 40 and not line.startswith("-----"):
                secrets[f"{pem.relative_to(home)} line"] = line
    kek_file = home / "training" / "keys" / "kek.key"
    assert kek_file.exists(), "the training service creates its KEK at start"
    kek = kek_file.read_text().strip()
    raw = base64.b64decode(kek)
    secrets |= {"KEK (base64)": kek, "KEK (hex)": raw.hex(), "KEK (urlsafe base64)": base64.urlsafe_b64encode(raw).decode()}
    return secrets


def test_logs_of_a_real_stack_hold_no_pii_credentials_or_keys(local_stack: LocalStack) -> None:
    _flow(local_stack)
    home = local_stack.home
    logs = {path: path.read_text(errors="replace") for path in sorted(home.rglob("*.log")) if path.is_file()}
    assert any(path.parent.name == "logs" for path in logs), f"no logs under {home / 'logs'}"
    ingest_log = logs[home / "logs" / "ingest.log"]
    assert '"method": "/falaj.ingest.v1.IngestService/IngestBatches"' in ingest_log  # logs were written while the flow ran
    findings = []
    for path, text in logs.items():
        for value in CANARIES:
            if value in text:
                findings.append(f"{path.relative_to(home)}: PII/credential {value!r}")
        for what, secret in _key_material(home).items():
            if secret in text:
                findings.append(f"{path.relative_to(home)}: {what}")
        if re.search(re.escape(EMAIL.split("@")[0]), text):
            findings.append(f"{path.relative_to(home)}: the local part of {EMAIL!r}")
    assert not findings, findings
