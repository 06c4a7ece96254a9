"""Retried writes with a request id: same body gets the first answer, another body is refused."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from falaj.ingest.v1 import request_response_pb2 as ingest
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.services.ingest.server import SPEC
from falaj_platform.services.ingest.store import request_log

METHOD = "/falaj.ingest.v1.IngestService/DeleteDataset"


def test_request_id_replays_the_first_answer_and_refuses_another_body(database_url: str, tmp_path: Any) -> None:
    database = Database(database_url, SPEC.migrations_dir, "falaj_ingest_schema_version")
    database.upgrade()
    first = ingest.DeleteDatasetRequest(name="datasets/sales", request_id="r-1")
    try:
        with database.session_scope() as session:
            assert replayed_response(session, request_log, METHOD, first, ingest.DeleteDatasetResponse) is None
            remember(session, request_log, METHOD, first, ingest.DeleteDatasetResponse())
        with database.session_scope() as session:
            again = replayed_response(session, request_log, METHOD, first, ingest.DeleteDatasetResponse)
        assert again == ingest.DeleteDatasetResponse()
        other = ingest.DeleteDatasetRequest(name="datasets/other", request_id="r-1")
        with pytest.raises(FailedPrecondition) as raised:
            with database.session_scope() as session:
                replayed_response(session, request_log, METHOD, other, ingest.DeleteDatasetResponse)
        assert raised.value.reason == "REQUEST_ID_REUSED"
        with pytest.raises(InvalidArgument):
            with database.session_scope() as session:
                replayed_response(
                    session, request_log, METHOD, ingest.DeleteDatasetRequest(request_id="x" * 200), ingest.DeleteDatasetResponse
                )
        with database.session_scope() as session:
            assert session.execute(sa.select(sa.func.count()).select_from(request_log)).scalar_one() == 1
    finally:
        database.dispose()
