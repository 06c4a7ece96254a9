"""ImportSql and stored SQL sources against the real PostgreSQL and MariaDB: full, incremental, failures."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.services.ingest.config import IngestConfig
from tests.conftest import POSTGRES_URL, missing_service
from tests.ingest.conftest import ALICE, IngestUnderTest, column, create_dataset, read_version, status_of, versions_of

MARIADB_URL = os.environ.get("FALAJ_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def sales_schema() -> m.Schema:
    return m.Schema(
        columns=[
            column("sale_id", m.COLUMN_TYPE_INT),
            column("customer_id", m.COLUMN_TYPE_STRING),
            column("amount", m.COLUMN_TYPE_FLOAT, range=m.RangeConstraint(min=0)),
            column("channel", m.COLUMN_TYPE_CATEGORY, allowed_values=["pos", "online"]),
            column("sold_at", m.COLUMN_TYPE_TIMESTAMP),
        ],
        event_time_column="sold_at",
        unique_key_columns=["sale_id"],
        data_subject_column="customer_id",
    )


def _engine(url: str, what: str) -> sa.Engine:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        missing_service(f"{what} at {url} is not reachable: {error.orig}")
    return engine


@pytest.fixture(params=["postgresql", "mariadb"])
def sales_table(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, sa.Engine]]:
    """(SQLAlchemy URL, table name, engine): a fresh `sales` table in the real server, dropped afterwards."""
    if request.param == "postgresql":
        if not POSTGRES_URL:
            missing_service("FALAJ_TEST_POSTGRES_URL is not set")
        url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        timestamp = "TIMESTAMPTZ"
    else:
        url = MARIADB_URL
        timestamp = "DATETIME(6)"
    engine = _engine(url, request.param)
    table = f"sales_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                f"CREATE TABLE {table} (sale_no INTEGER PRIMARY KEY, customer VARCHAR(64) NOT NULL, amount DECIMAL(12, 2), "
                f"channel VARCHAR(16), sold_at {timestamp} NOT NULL, updated_at {timestamp} NOT NULL)"
            )
        )
    try:
        yield url, table, engine
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def _insert(engine: sa.Engine, table: str, rows: list[tuple[int, str, str, str, int]]) -> None:
    base = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)
    with engine.begin() as connection:
        for sale_no, customer, amount, channel, minute in rows:
            when = base + dt.timedelta(minutes=minute)
            if engine.dialect.name != "postgresql":
                when = when.replace(tzinfo=None)
            connection.execute(
                sa.text(f"INSERT INTO {table} VALUES (:n, :c, :a, :ch, :t, :t)"),
                {"n": sale_no, "c": customer, "a": amount, "ch": channel, "t": when},
            )


MAPPING = {"sale_no": "sale_id", "customer": "customer_id", "sold_at": "sold_at"}


def test_full_then_incremental_imports_by_watermark(ingest: IngestUnderTest, sales_table: tuple[str, str, sa.Engine]) -> None:
    url, table, engine = sales_table
    policy = m.CleansingPolicy(trim_strings=True, extra_columns=m.EXTRA_COLUMN_POLICY_IGNORE)
    dataset = create_dataset(ingest, "sales", sales_schema(), cleansing=policy).name
    _insert(engine, table, [(1, "c-1", "10.50", "pos", 0), (2, "c-2", "-3.00", "online", 1), (3, "c-3", "7.25", "online", 2)])

    full = rr.ImportSqlRequest(
        dataset=dataset,
        sql=m.SqlImportSpec(sqlalchemy_url=url, table=table, mode=m.SQL_IMPORT_MODE_FULL, column_mapping=MAPPING, fetch_size=2),
    )
    done = ingest.stub.ImportSql(full, metadata=ALICE, timeout=60).ingestion
    assert (done.report.rows_in, done.report.rows_accepted, done.report.rows_quarantined) == (3, 2, 1)
    assert done.source_kind == m.SOURCE_KIND_SQL and table in done.source_description and "(full)" in done.source_description
    assert list(done.report.ignored_columns) == ["updated_at"] and done.report.batches_received == 2  # pages of fetch_size rows
    rows = read_version(ingest, done.dataset_version).to_pylist()
    assert [(r["sale_id"], r["customer_id"], r["amount"], r["channel"]) for r in rows] == [
        (1, "c-1", 10.5, "pos"),
        (3, "c-3", 7.25, "online"),
    ]
    assert rows[0]["sold_at"] == dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)

    incremental = m.SqlImportSpec(
        sqlalchemy_url=url,
        query=f"SELECT sale_no, customer, amount, channel, sold_at, updated_at FROM {table} WHERE channel IS NOT NULL",
        mode=m.SQL_IMPORT_MODE_INCREMENTAL,
        watermark_column="updated_at",
        column_mapping=MAPPING,
    )
    first = ingest.stub.ImportSql(
        rr.ImportSqlRequest(dataset=dataset, sql=incremental, write_mode=m.WRITE_MODE_OVERWRITE), metadata=ALICE, timeout=60
    ).ingestion
    assert first.watermark_start == "" and first.report.rows_accepted == 2
    assert first.watermark_end.startswith("2025-03-01") and ("08:02" in first.watermark_end)
    _insert(engine, table, [(4, "c-4", "40.00", "pos", 3), (5, "c-5", "50.00", "online", 4)])
    incremental.start_watermark = first.watermark_end
    second = ingest.stub.ImportSql(rr.ImportSqlRequest(dataset=dataset, sql=incremental), metadata=ALICE, timeout=60).ingestion
    assert (second.watermark_start, second.report.rows_in, second.report.rows_accepted) == (first.watermark_end, 2, 2)
    assert "08:04" in second.watermark_end
    latest = read_version(ingest, second.dataset_version)
    assert sorted(latest.column("sale_id").to_pylist()) == [1, 3, 4, 5]
    assert [v.row_count for v in versions_of(ingest, dataset)] == [4, 2, 2]


def test_a_stored_sql_source_keeps_its_watermark_between_runs(start_ingest: object, sales_table: tuple[str, str, sa.Engine]) -> None:
    url, table, engine = sales_table
    ingest: IngestUnderTest = start_ingest(config=IngestConfig(connection_profiles={"sales-db": url}, worker_poll_seconds=0.2))  # type: ignore[operator]
    dataset = create_dataset(ingest, "sales", sales_schema(), cleansing=m.CleansingPolicy(extra_columns=m.EXTRA_COLUMN_POLICY_IGNORE)).name
    _insert(engine, table, [(1, "c-1", "1.00", "pos", 0), (2, "c-2", "2.00", "pos", 1)])
    spec = m.SqlImportSpec(
        connection_profile="sales-db", table=table, mode=m.SQL_IMPORT_MODE_INCREMENTAL, watermark_column="sale_no", column_mapping=MAPPING
    )
    with pytest.raises(grpc.RpcError) as with_url:
        ingest.stub.CreateSource(
            rr.CreateSourceRequest(
                parent=dataset,
                source_id="pos",
                source=m.Source(sql=m.SqlImportSpec(sqlalchemy_url=url, table=table, mode=m.SQL_IMPORT_MODE_FULL)),
            ),
            metadata=ALICE,
        )
    assert status_of(with_url.value) == (grpc.StatusCode.INVALID_ARGUMENT, "CONNECTION_PROFILE_REQUIRED")
    checked = ingest.stub.CreateSource(
        rr.CreateSourceRequest(parent=dataset, source_id="pos", source=m.Source(sql=spec), validate_only=True), metadata=ALICE
    )
    assert checked.source.name == f"{dataset}/sources/pos"
    source = ingest.stub.CreateSource(
        rr.CreateSourceRequest(parent=dataset, source_id="pos", source=m.Source(sql=spec)), metadata=ALICE
    ).source
    assert source.state == m.SOURCE_STATE_ACTIVE

    first = ingest.stub.RunSource(rr.RunSourceRequest(name=source.name), metadata=ALICE, timeout=60).ingestion
    assert (first.report.rows_accepted, first.watermark_end, first.source) == (2, "2", source.name)
    assert ingest.stub.GetSource(rr.GetSourceRequest(name=source.name), metadata=ALICE).source.status.watermark == "2"
    _insert(engine, table, [(3, "c-3", "3.00", "online", 2)])
    second = ingest.stub.RunSource(rr.RunSourceRequest(name=source.name), metadata=ALICE, timeout=60).ingestion
    assert (second.watermark_start, second.report.rows_in, second.watermark_end) == ("2", 1, "3")
    nothing_new = ingest.stub.RunSource(rr.RunSourceRequest(name=source.name), metadata=ALICE, timeout=60).ingestion
    assert (nothing_new.report.rows_in, nothing_new.dataset_version) == (0, "")
    refresh = ingest.stub.RunSource(
        rr.RunSourceRequest(name=source.name, full_refresh=True, request_id="refresh-1"), metadata=ALICE, timeout=60
    ).ingestion
    assert refresh.report.rows_in == 3 and refresh.report.rows_quarantined == 3  # the unique key already holds them
    status = ingest.stub.GetSource(rr.GetSourceRequest(name=source.name), metadata=ALICE).source.status
    assert (status.watermark, status.last_ingestion, status.last_error) == ("3", refresh.name, "")


def test_failing_sql_sources_give_clear_statuses_and_no_version(ingest: IngestUnderTest, sales_table: tuple[str, str, sa.Engine]) -> None:
    url, table, _ = sales_table
    dataset = create_dataset(ingest, "sales", sales_schema()).name
    wrong_port = sa.engine.make_url(url).set(port=1, password="s3cret").render_as_string(hide_password=False)
    cases = [
        (
            m.SqlImportSpec(sqlalchemy_url=wrong_port, table=table, mode=m.SQL_IMPORT_MODE_FULL),
            grpc.StatusCode.UNAVAILABLE,
            "SQL_SOURCE_UNREACHABLE",
        ),
        (
            m.SqlImportSpec(sqlalchemy_url="not a url", table=table, mode=m.SQL_IMPORT_MODE_FULL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SQL_URL",
        ),
        (
            m.SqlImportSpec(sqlalchemy_url="oracle+nodriver://x@y/z", table=table, mode=m.SQL_IMPORT_MODE_FULL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SQL_URL",
        ),
        (
            m.SqlImportSpec(sqlalchemy_url=url, table=f"{table}_missing", mode=m.SQL_IMPORT_MODE_FULL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SQL_QUERY_FAILED",
        ),
        (
            m.SqlImportSpec(sqlalchemy_url=url, query=f"DELETE FROM {table}", mode=m.SQL_IMPORT_MODE_FULL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SQL_QUERY_NOT_SELECT",
        ),
        (
            m.SqlImportSpec(sqlalchemy_url=url, table=table, mode=m.SQL_IMPORT_MODE_INCREMENTAL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "WATERMARK_COLUMN_REQUIRED",
        ),
    ]
    for spec, code, reason in cases:
        with pytest.raises(grpc.RpcError) as refused:
            ingest.stub.ImportSql(rr.ImportSqlRequest(dataset=dataset, sql=spec), metadata=ALICE, timeout=60)
        assert status_of(refused.value) == (code, reason), reason
        assert "s3cret" not in refused.value.details()
    assert versions_of(ingest, dataset) == []
    failed = ingest.stub.ListIngestions(rr.ListIngestionsRequest(parent=dataset, state=m.INGESTION_STATE_FAILED), metadata=ALICE).ingestions
    assert failed and all("s3cret" not in i.error_message + i.source_description for i in failed)
