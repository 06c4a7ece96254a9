"""Where imports may read from: never the platform's own databases or folders, remote URLs and
SQL hosts only where an operator allowed them, and every refusal a denial in the audit log."""

from __future__ import annotations

import http.server
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import grpc
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import StartupError
from falaj_platform.services.ingest.config import IngestConfig, load_ingest_config
from tests.conftest import POSTGRES_URL, missing_service
from tests.ingest.conftest import ALICE, IngestUnderTest, column, create_dataset, payments, status_of, versions_of

LINES = m.Schema(columns=[column("line", m.COLUMN_TYPE_STRING, nullable=True)])
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _sqlite_with_lines(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS policy_rules (v0 TEXT, v2 TEXT)")
        connection.execute("INSERT INTO policy_rules VALUES ('p, admin', '*')")
    connection.close()


def _import_sql(
    ingest: IngestUnderTest, dataset: str, url: str, query: str = "select v0 || ' ' || v2 as line from policy_rules"
) -> m.Ingestion:
    spec = m.SqlImportSpec(sqlalchemy_url=url, query=query, mode=m.SQL_IMPORT_MODE_FULL)
    return ingest.stub.ImportSql(rr.ImportSqlRequest(dataset=dataset, sql=spec), metadata=ALICE, timeout=60).ingestion


def _refused_sql(ingest: IngestUnderTest, dataset: str, url: str, query: str = "select 'x' as line") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        _import_sql(ingest, dataset, url, query)
    return status_of(refused.value)


def _denials(ingest: IngestUnderTest) -> list[gateway_messages.AuditRecord]:
    return [
        r
        for r in ingest.audit.records
        if r.decision == gateway_messages.DECISION_DENY and r.attributes.get("event_name") == "IMPORT_SOURCE_REFUSED"
    ]


def _postgres_url() -> sa.engine.URL:
    if not POSTGRES_URL:
        missing_service("FALAJ_TEST_POSTGRES_URL is not set")
    url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        missing_service(f"PostgreSQL at {POSTGRES_URL} is not reachable: {error.orig}")
    finally:
        engine.dispose()
    return url


# -- SQL sources --------------------------------------------------------------------------------------


def test_a_sqlite_url_under_falaj_home_is_refused_and_the_refusal_audited(ingest: IngestUnderTest, tmp_path: Path) -> None:
    dataset = create_dataset(ingest, "loot", LINES).name
    home = ingest.settings.home
    gateway_db = home / "gateway" / "gateway.db"
    _sqlite_with_lines(gateway_db)
    for url in (
        f"sqlite:///{gateway_db}",
        f"sqlite:///{home}/ingest/../gateway/gateway.db",
        f"sqlite:///file:{gateway_db}?mode=ro&uri=true",
        f"sqlite:///file://localhost{gateway_db}?uri=true",
    ):
        assert _refused_sql(ingest, dataset, url) == (DENIED, "PROTECTED_PATH"), url
    # Ingest's own store is one of the platform's databases.
    assert _refused_sql(ingest, dataset, ingest.settings.database_url) == (DENIED, "PLATFORM_DATABASE")
    assert versions_of(ingest, dataset) == []
    denials = _denials(ingest)
    assert [(r.resource, r.action, r.attributes["refusal_reason"]) for r in denials] == [(dataset, "import_sql", "PROTECTED_PATH")] * 4 + [
        (dataset, "import_sql", "PLATFORM_DATABASE")
    ]
    assert all(r.caller == ALICE[0][1] for r in denials)

    # A SQLite file outside the platform's folders is still a source.
    elsewhere = tmp_path / "exports" / "rules.db"
    _sqlite_with_lines(elsewhere)
    assert _import_sql(ingest, dataset, f"sqlite:///{elsewhere}").report.rows_accepted == 1


def test_a_symlink_or_hard_link_to_a_platform_database_is_refused(start_ingest: Callable[..., IngestUnderTest], tmp_path: Path) -> None:
    # About SQLite files: ingest's own store is one here on either test backend.
    ingest = start_ingest(FALAJ_INGEST_DATABASE_URL=f"sqlite:///{tmp_path / 'home' / 'ingest' / 'ingest.db'}")
    dataset = create_dataset(ingest, "loot", LINES).name
    gateway_db = ingest.settings.home / "gateway" / "gateway.db"
    _sqlite_with_lines(gateway_db)
    (tmp_path / "innocent.db").symlink_to(gateway_db)
    (tmp_path / "shortcut").symlink_to(ingest.settings.home, target_is_directory=True)
    assert _refused_sql(ingest, dataset, f"sqlite:///{tmp_path / 'innocent.db'}") == (DENIED, "PROTECTED_PATH")
    assert _refused_sql(ingest, dataset, f"sqlite:///{tmp_path / 'shortcut' / 'gateway' / 'gateway.db'}") == (DENIED, "PROTECTED_PATH")
    own_store = sa.engine.make_url(ingest.settings.database_url).database
    assert own_store
    os.link(own_store, tmp_path / "copy.db")  # a hard link resolves to no protected folder, but is the same file
    assert _refused_sql(ingest, dataset, f"sqlite:///{tmp_path / 'copy.db'}") == (DENIED, "PLATFORM_DATABASE")
    assert versions_of(ingest, dataset) == []
    assert len(_denials(ingest)) == 3


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_platforms_own_postgresql_databases_are_refused(start_ingest: Callable[..., IngestUnderTest], database_url: str) -> None:
    server = _postgres_url()
    own = sa.engine.make_url(database_url)
    gateway = own.set(database="falaj_gateway_of_this_test")  # refused by address: it need not exist
    ingest = start_ingest(
        config=IngestConfig(worker_poll_seconds=0.2, platform_databases={"gateway": gateway.render_as_string(hide_password=False)}),
        FALAJ_INGEST_DATABASE_URL=database_url,
    )
    dataset = create_dataset(ingest, "loot", LINES).name
    same_server_other_names = [
        own,
        own.set(host="localhost"),
        own.set(port=None),
        own.set(host="10.255.255.1", query={"host": own.host or "127.0.0.1"}),  # libpq connects to the query's host
        own.set(drivername="postgresql"),
        gateway,
        gateway.set(host="localhost", port=None),
    ]
    for url in same_server_other_names:
        rendered = url.render_as_string(hide_password=False)
        assert _refused_sql(ingest, dataset, rendered, "select relname as line from pg_class") == (DENIED, "PLATFORM_DATABASE"), rendered
    assert versions_of(ingest, dataset) == []
    assert len(_denials(ingest)) == len(same_server_other_names)

    # Another database on the same server is not the platform's.
    other = _import_sql(ingest, dataset, server.render_as_string(hide_password=False), "select 'hello' as line")
    assert other.report.rows_accepted == 1


def test_with_an_sql_host_allow_list_only_the_listed_hosts_are_read(start_ingest: Callable[..., IngestUnderTest], tmp_path: Path) -> None:
    server = _postgres_url()
    allowed = f"{server.host}:{server.port or 5432}"
    profiles = {"elsewhere": "postgresql://u@10.255.255.1/db"}
    ingest = start_ingest(config=IngestConfig(worker_poll_seconds=0.2, sql_allowed_hosts=(allowed,), connection_profiles=profiles))
    dataset = create_dataset(ingest, "sales", LINES).name

    done = _import_sql(ingest, dataset, server.render_as_string(hide_password=False), "select 'hello' as line")
    assert done.report.rows_accepted == 1

    for url in (
        server.set(host="10.255.255.1"),  # refused before any connection is tried
        server.set(port=(server.port or 5432) + 1),
        server.set(query={"host": "10.255.255.1"}),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            _import_sql(ingest, dataset, url.render_as_string(hide_password=False), "select 'x' as line")
        assert status_of(refused.value) == (DENIED, "SQL_HOST_NOT_ALLOWED"), url
        assert "FALAJ_INGEST_SQL_ALLOWED_HOSTS" in (refused.value.details() or "")
    # A stored source on a host outside the list cannot be created either.
    source = m.Source(sql=m.SqlImportSpec(connection_profile="elsewhere", query="select 1 as line", mode=m.SQL_IMPORT_MODE_FULL))
    with pytest.raises(grpc.RpcError) as refused:
        ingest.stub.CreateSource(rr.CreateSourceRequest(parent=dataset, source_id="far", source=source), metadata=ALICE, timeout=30)
    assert status_of(refused.value) == (DENIED, "SQL_HOST_NOT_ALLOWED")
    assert [r.action for r in _denials(ingest)] == ["import_sql"] * 3 + ["create_source"]

    # SQLite files are local files: outside the protected folders the host list does not apply.
    local = tmp_path / "local.db"
    _sqlite_with_lines(local)
    assert _import_sql(ingest, dataset, f"sqlite:///{local}").report.rows_accepted == 1


# -- remote file URLs ---------------------------------------------------------------------------------


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(base URL, paths requested): a local HTTP server standing in for an internal address."""
    requested: list[str] = []
    (tmp_path / "payments.csv").write_text("payment_id,customer_id\n1,c-1\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def send_head(self) -> Any:
            requested.append(self.path)
            return super().send_head()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


def test_an_http_url_is_refused_by_default_and_the_refusal_audited(ingest: IngestUnderTest, http_server: tuple[str, list[str]]) -> None:
    base, requested = http_server
    dataset = create_dataset(ingest, "payments").name
    urls = [
        f"{base}/payments.csv",
        "http://169.254.169.254/latest/meta-data/iam.csv",
        f"simplecache::{base}/payments.csv",
        "https://user:secret@127.0.0.1:1/x.csv?token=abc",
    ]
    for uri in urls:
        for queued in (False, True):
            request = rr.ImportFileRequest(dataset=dataset, file=m.FileImportSpec(uri=uri), return_immediately=queued)
            with pytest.raises(grpc.RpcError) as refused:
                ingest.stub.ImportFile(request, metadata=ALICE, timeout=30)
            assert status_of(refused.value) == (DENIED, "URL_NOT_ALLOWED"), uri
            details = refused.value.details() or ""
            assert "FALAJ_INGEST_ALLOWED_URL_PREFIXES" in details and "secret" not in details and "abc" not in details
    stored = m.Source(file=m.FileImportSpec(uri=f"{base}/payments.csv"))
    for validate_only in (True, False):
        with pytest.raises(grpc.RpcError) as refused:
            ingest.stub.CreateSource(
                rr.CreateSourceRequest(parent=dataset, source_id="web", source=stored, validate_only=validate_only),
                metadata=ALICE,
                timeout=30,
            )
        assert status_of(refused.value) == (DENIED, "URL_NOT_ALLOWED")
    assert requested == [], "the ingest host fetched a URL it refused"
    assert versions_of(ingest, dataset) == []
    denials = _denials(ingest)
    assert len(denials) == 2 * len(urls) + 2
    assert {r.action for r in denials} == {"import_file", "create_source"} and all(r.resource == dataset for r in denials)
    assert all("secret" not in r.decision_detail for r in denials)


def test_remote_urls_are_read_only_under_an_allowed_prefix(start_ingest: Callable[..., IngestUnderTest]) -> None:
    root = f"memory://falaj-allowed-{uuid.uuid4().hex[:8]}"
    ingest = start_ingest(config=IngestConfig(worker_poll_seconds=0.2, allowed_url_prefixes=(f"{root}/landing/",)))
    dataset = create_dataset(ingest, "payments").name
    for path in (f"{root}/landing/p.parquet", f"{root}/private/p.parquet", f"{root}/landing-other/p.parquet"):
        with fsspec.open(path, "wb") as handle:
            pq.write_table(payments(range(2)), handle)

    spec = m.FileImportSpec(uri=f"{root}/landing/p.parquet")
    done = ingest.stub.ImportFile(rr.ImportFileRequest(dataset=dataset, file=spec), metadata=ALICE, timeout=60).ingestion
    assert done.report.rows_accepted == 2

    for uri in (f"{root}/private/p.parquet", f"{root}/landing-other/p.parquet", f"{root}/landing/../private/p.parquet"):
        with pytest.raises(grpc.RpcError) as refused:
            ingest.stub.ImportFile(rr.ImportFileRequest(dataset=dataset, file=m.FileImportSpec(uri=uri)), metadata=ALICE, timeout=30)
        assert status_of(refused.value) == (DENIED, "URL_NOT_ALLOWED"), uri
    # Local paths are never "under" a remote prefix: they follow the protected-folder rule alone.
    key = ingest.settings.pki.key
    with pytest.raises(grpc.RpcError) as refused:
        ingest.stub.ImportFile(
            rr.ImportFileRequest(dataset=dataset, file=m.FileImportSpec(uri=f"file://{key}")), metadata=ALICE, timeout=30
        )
    assert status_of(refused.value) == (DENIED, "PROTECTED_PATH")
    assert [v.row_count for v in versions_of(ingest, dataset)] == [2]


# -- settings -----------------------------------------------------------------------------------------


def test_the_access_settings_come_from_the_environment_and_bad_entries_stop_the_service() -> None:
    env = {
        "FALAJ_HOME": "/srv/falaj",
        "FALAJ_GATEWAY_DATABASE_URL": "postgresql://gateway@db.internal:5432/falaj_gateway",
        "FALAJ_INGEST_ALLOWED_URL_PREFIXES": "https://data.example.com/exports/, s3://landing/",
        "FALAJ_INGEST_SQL_ALLOWED_HOSTS": "warehouse.example.com:5432, [::1]:5433,replica",
    }
    config = load_ingest_config(env)
    assert config.allowed_url_prefixes == ("https://data.example.com/exports/", "s3://landing/")
    assert config.sql_allowed_hosts == ("warehouse.example.com:5432", "[::1]:5433", "replica")
    assert config.platform_databases["gateway"] == "postgresql://gateway@db.internal:5432/falaj_gateway"
    assert config.platform_databases["training"] == f"sqlite:///{Path('/srv/falaj').resolve() / 'training' / 'training.db'}"
    assert load_ingest_config({}).allowed_url_prefixes == () and load_ingest_config({}).sql_allowed_hosts == ()

    for key, value in (
        ("FALAJ_INGEST_ALLOWED_URL_PREFIXES", "/data/exports"),
        ("FALAJ_INGEST_ALLOWED_URL_PREFIXES", "https://data.example.com/a/../"),
        ("FALAJ_INGEST_SQL_ALLOWED_HOSTS", "db:postgres"),
        ("FALAJ_INGEST_SQL_ALLOWED_HOSTS", "postgresql://db/x"),
    ):
        with pytest.raises(StartupError, match=key):
            load_ingest_config({key: value})
