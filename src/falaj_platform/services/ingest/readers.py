"""Readers of every source kind, each producing an `IngestInput` for the commit path.

Arrow IPC bytes from a gRPC stream, CSV and Parquet files from local paths or fsspec
URLs, and SQL databases by SQLAlchemy URL (full or incremental by watermark). Reader
failures become typed errors with a message a person can act on; credentials never
appear in them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy import exc as sa_exc

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from falaj_platform.services.ingest import access
from falaj_platform.services.ingest.commits import Batch, IngestInput, ParseFailure, stream_digest
from falaj_platform.services.ingest.validation import InputShape, as_text

_GLOB = re.compile(r"[*?\[]")
_SQL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
DEFAULT_FETCH_SIZE = 10_000


# -- Arrow IPC ------------------------------------------------------------------------------------


def decode_arrow_batch(batch: common.ArrowBatch) -> pa.Table:
    """The rows of one streamed batch; malformed bytes or a wrong row count are refused."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(batch.arrow_ipc))
        table = reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidArgument(
            f"batch {batch.batch_id!r} is not a valid Arrow IPC stream: {first_line}",
            reason="MALFORMED_ARROW_BATCH",
            metadata={"batch_id": batch.batch_id},
        ) from None
    if batch.row_count and table.num_rows != batch.row_count:
        raise InvalidArgument(
            f"batch {batch.batch_id!r} holds {table.num_rows} rows but says {batch.row_count}; it was cut or corrupted",
            reason="BATCH_ROW_COUNT_MISMATCH",
            metadata={"batch_id": batch.batch_id},
        )
    return table


def read_stream(header: Message, batches: Iterable[common.ArrowBatch], max_bytes: int) -> IngestInput:
    """An IngestBatches stream as one input; its request-log digest covers the header and every batch."""
    digest = stream_digest(header)
    decoded: list[Batch] = []
    seen: set[str] = set()
    received = skipped = total = 0
    for batch in batches:
        received += 1
        if not batch.batch_id:
            raise InvalidArgument(f"batch {received} has no batch_id; every batch needs one for retries", reason="BATCH_ID_REQUIRED")
        batch_digest = hashlib.sha256(batch.arrow_ipc).hexdigest()
        digest.update(len(batch.batch_id).to_bytes(4, "big") + batch.batch_id.encode() + bytes.fromhex(batch_digest))
        if batch.batch_id in seen:
            skipped += 1  # a repeated id within one stream counts once
            continue
        seen.add(batch.batch_id)
        total += len(batch.arrow_ipc)
        if total > max_bytes:
            raise ResourceExhausted(
                f"the stream carries more than {max_bytes} bytes; split it into several commits", reason="STREAM_TOO_LARGE"
            )
        decoded.append(Batch(batch.batch_id, decode_arrow_batch(batch), digest=batch_digest))
    return IngestInput(
        batches=decoded,
        skip_committed_batches=True,
        batches_received=received,
        batches_skipped_duplicate=skipped,
        stream_digest=digest.hexdigest(),
    )


def _rename(table: pa.Table, mapping: Mapping[str, str]) -> pa.Table:
    if not mapping:
        return table
    return table.rename_columns([mapping.get(name, name) for name in table.column_names])


# -- files ------------------------------------------------------------------------------------------


def _format_of(path: str, declared: int) -> int:
    if declared:
        return declared
    lowered = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".xz"):
        lowered = lowered.removesuffix(suffix)
    if lowered.endswith((".csv", ".tsv", ".txt")):
        return m.FILE_FORMAT_CSV
    if lowered.endswith((".parquet", ".pq")):
        return m.FILE_FORMAT_PARQUET
    raise InvalidArgument(f"cannot tell the format of {path!r} from its extension; set file.format", reason="UNKNOWN_FILE_FORMAT")


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _refuse_protected(fs: fsspec.AbstractFileSystem, paths: Sequence[str], protected_roots: Sequence[str]) -> None:
    """Local files inside the platform's own folders (keys, PKI, other stores) are never read."""
    if not protected_roots or not _is_local_fs(fs):
        return
    for path in paths:
        access.refuse_protected_path(path, protected_roots)


def open_filesystem(
    uri: str, storage_options: Mapping[str, Any], protected_roots: Sequence[str] = (), allowed_url_prefixes: Sequence[str] = ()
) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """(filesystem, matching paths, how to show the location) for a local path, fsspec URL or glob.

    A remote URL is opened only under one of `allowed_url_prefixes` (see `access`)."""
    if not uri:
        raise InvalidArgument("file.uri is required", reason="FILE_URI_REQUIRED")
    access.check_file_uri(uri, allowed_url_prefixes)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options))
    except (ValueError, ImportError, KeyError) as error:
        raise InvalidArgument(f"cannot open {access.mask_url(uri)!r}: {error}", reason="UNSUPPORTED_FILE_URL") from None
    if access.is_local(uri) and not _is_local_fs(fs):
        raise PermissionDenied(f"{access.mask_url(uri)!r} does not open a local file", reason="URL_NOT_ALLOWED")
    try:
        if _GLOB.search(path):
            paths = sorted(fs.glob(path))
            if not paths:
                raise InvalidArgument(f"no file matches {uri!r}", reason="FILE_NOT_FOUND")
        else:
            if not fs.exists(path):
                raise InvalidArgument(f"file {uri!r} does not exist", reason="FILE_NOT_FOUND")
            if fs.isdir(path):
                raise InvalidArgument(f"{uri!r} is a folder; give a file or a glob", reason="FILE_IS_A_FOLDER")
            paths = [path]
    except OSError as error:
        raise Unavailable(f"cannot reach {uri!r}: {error}", reason="FILE_SOURCE_UNREACHABLE") from None
    _refuse_protected(fs, paths, protected_roots)
    return fs, paths, uri


def _refuse_binary(fs: fsspec.AbstractFileSystem, path: str, encoding: str) -> None:
    """A CSV file is text: refuse binary content up front with a plain message."""
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            head = handle.read(64 * 1024)
    except (OSError, EOFError) as error:
        raise InvalidArgument(f"{path!r} is not a readable CSV file: {error}", reason="FILE_NOT_CSV", metadata={"file": path}) from None
    if b"\x00" in head:
        raise InvalidArgument(f"{path!r} is not a CSV file: it holds binary data", reason="FILE_NOT_CSV", metadata={"file": path})
    if encoding.lower().replace("-", "") in ("", "utf8"):
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.start < len(head) - 4:  # not just a character cut at the end of the sample
                raise InvalidArgument(
                    f"{path!r} is not UTF-8 text (byte {error.start}); set csv.encoding if it is another encoding",
                    reason="FILE_NOT_CSV",
                    metadata={"file": path},
                ) from None


def _read_csv(fs: fsspec.AbstractFileSystem, path: str, spec: m.FileImportSpec, schema: m.Schema) -> tuple[Batch, list[ParseFailure]]:
    options = spec.csv
    declared = [c.name for c in schema.columns]
    to_file_name = {dataset: file for file, dataset in spec.column_mapping.items()}
    header = not options.no_header_row
    failures: list[ParseFailure] = []
    first_data_line = 1 + options.skip_lines + (1 if header else 0)

    def invalid_row(row: Any) -> str:
        number = row.number if row.number is not None else -1
        failures.append(
            ParseFailure(
                batch_id=path,
                row_index=number - first_data_line if number >= 0 else -1,
                values={"_raw_line": row.text},
                reason=f"line {number} has {row.actual_columns} field(s), expected {row.expected_columns}",
            )
        )
        return "skip"

    read_options = pacsv.ReadOptions(
        use_threads=False,
        skip_rows=options.skip_lines,
        encoding=options.encoding or "utf8",
        column_names=declared if not header else None,
        block_size=16 * 1024 * 1024,
    )
    parse_options = pacsv.ParseOptions(
        delimiter=options.delimiter or ",",
        quote_char=options.quote_char or '"',
        invalid_row_handler=invalid_row,
    )
    convert_options = pacsv.ConvertOptions(
        column_types={to_file_name.get(name, name): pa.string() for name in declared},
        # An empty field is a missing value; a quoted empty string ("") is an empty string.
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    _refuse_binary(fs, path, options.encoding)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            table = pacsv.read_csv(handle, read_options=read_options, parse_options=parse_options, convert_options=convert_options)
    except (pa.ArrowInvalid, UnicodeDecodeError, EOFError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidArgument(
            f"{path!r} is not a readable CSV file: {first_line}", reason="FILE_NOT_CSV", metadata={"file": path}
        ) from None
    # Everything becomes text: the validator parses each value into its declared type.
    table = pa.table({name: table.column(name).cast(pa.string()) for name in table.column_names}) if table.num_columns else table
    table = _rename(table, spec.column_mapping)
    row_numbers = None
    if failures:
        skipped = np.array(sorted(f.row_index for f in failures if f.row_index >= 0), dtype=np.int64)
        row_numbers = np.delete(np.arange(table.num_rows + len(skipped)), skipped)
    return Batch(path, table, row_numbers), failures


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, spec: m.FileImportSpec) -> Batch:
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
    except (pa.ArrowInvalid, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidArgument(
            f"{path!r} is not a readable Parquet file: {first_line}", reason="FILE_NOT_PARQUET", metadata={"file": path}
        ) from None
    return Batch(path, _rename(table, spec.column_mapping))


def read_files(
    spec: m.FileImportSpec,
    schema: m.Schema,
    storage_options: Mapping[str, Any],
    protected_roots: Sequence[str] = (),
    allowed_url_prefixes: Sequence[str] = (),
) -> IngestInput:
    """Every file matching the spec, as one input (a glob commits all its files together)."""
    fs, paths, _ = open_filesystem(spec.uri, storage_options, protected_roots, allowed_url_prefixes)
    batches: list[Batch] = []
    failures: list[ParseFailure] = []
    text = False
    for path in paths:
        file_format = _format_of(path, spec.format)
        if file_format == m.FILE_FORMAT_CSV:
            batch, bad = _read_csv(fs, path, spec, schema)
            failures.extend(bad)
            text = True
        else:
            batch = _read_parquet(fs, path, spec)
        batches.append(batch)
    if text and any(not all(pa.types.is_string(f.type) for f in b.table.schema) for b in batches):
        # A glob mixing CSV and Parquet: read everything as text so the batches concatenate.
        batches = [
            Batch(
                b.batch_id,
                pa.table(
                    {
                        n: pa.array(b.table.column(n).to_pylist(), pa.string())
                        if not pa.types.is_string(b.table.column(n).type)
                        else b.table.column(n)
                        for n in b.table.column_names
                    }
                ),
                b.row_numbers,
            )
            for b in batches
        ]
    shape = InputShape(text=text, timestamp_format=spec.csv.timestamp_format if text else "")
    return IngestInput(batches=batches, shape=shape, parse_failures=failures, batches_received=len(batches))


def describe_file(spec: m.FileImportSpec) -> str:
    location = spec.uri
    if "://" in location and "@" in location.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = location.split("://", 1)
        location = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return f"file {location}"


# -- SQL ------------------------------------------------------------------------------------------


def sqlalchemy_url(raw: str) -> sa.engine.URL:
    """A parsed source URL with the driver the platform ships for its dialect."""
    try:
        url = sa.engine.make_url(raw)
    except sa_exc.ArgumentError:
        raise InvalidArgument("sql.sqlalchemy_url is not a valid SQLAlchemy URL", reason="INVALID_SQL_URL") from None
    drivers = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
    if url.drivername in drivers:
        url = url.set(drivername=drivers[url.drivername])
    return url


def masked(url: sa.engine.URL) -> str:
    return url.render_as_string(hide_password=True)


def describe_sql(url: sa.engine.URL | None, spec: m.SqlImportSpec) -> str:
    where = masked(url) if url is not None else f"profile {spec.connection_profile}"
    what = f"table {spec.table}" if spec.WhichOneof("selection") == "table" else "query"
    mode = "incremental" if spec.mode == m.SQL_IMPORT_MODE_INCREMENTAL else "full"
    return f"sql {where} {what} ({mode})"


def _watermark_value(text: str) -> Any:
    stripped = text.strip()
    if re.fullmatch(r"[+-]?\d+", stripped):
        return int(stripped)
    try:
        return dt.datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        return stripped


def _watermark_text(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return "" if value is None else str(value)


def check_sql_spec(spec: m.SqlImportSpec) -> None:
    selection = spec.WhichOneof("selection")
    if selection is None:
        raise InvalidArgument("sql needs a table or a query", reason="SQL_SELECTION_REQUIRED")
    if selection == "table" and not _SQL_NAME.match(spec.table):
        raise InvalidArgument(f"sql.table {spec.table!r} is not a table name (name or schema.name)", reason="INVALID_SQL_TABLE")
    if selection == "query":
        statement = spec.query.strip().rstrip(";").strip()
        if not re.match(r"(?is)^(select|with)\b", statement) or ";" in statement:
            raise InvalidArgument("sql.query must be one read-only SELECT statement", reason="SQL_QUERY_NOT_SELECT")
    if spec.mode == m.SQL_IMPORT_MODE_UNSPECIFIED:
        raise InvalidArgument("sql.mode is required (FULL or INCREMENTAL)", reason="SQL_MODE_REQUIRED")
    if spec.mode == m.SQL_IMPORT_MODE_INCREMENTAL and not spec.watermark_column:
        raise InvalidArgument("incremental imports need sql.watermark_column", reason="WATERMARK_COLUMN_REQUIRED")
    if spec.watermark_column and not _SQL_NAME.match(spec.watermark_column):
        raise InvalidArgument(f"sql.watermark_column {spec.watermark_column!r} is not a column name", reason="INVALID_WATERMARK_COLUMN")


def _statement(spec: m.SqlImportSpec, start: str) -> tuple[sa.Executable, dict[str, Any]]:
    incremental = spec.mode == m.SQL_IMPORT_MODE_INCREMENTAL
    params: dict[str, Any] = {}
    if spec.WhichOneof("selection") == "table":
        schema_name, _, table_name = spec.table.rpartition(".")
        source: sa.FromClause = sa.table(table_name, schema=schema_name or None)
        select = sa.select(sa.text("*")).select_from(source)
    else:
        source = sa.text(spec.query.strip().rstrip(";")).columns().subquery("falaj_source")
        select = sa.select(sa.text("*")).select_from(source)
    if incremental:
        watermark: sa.ColumnClause[Any] = sa.column(spec.watermark_column)
        if start:
            select = select.where(watermark > sa.bindparam("falaj_watermark"))
            params["falaj_watermark"] = _watermark_value(start)
        select = select.order_by(watermark)
    return select, params


def _partition_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> pa.Table:
    arrays = {}
    for index, name in enumerate(columns):
        values = [row[index] for row in rows]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            arrays[name] = pa.array([as_text(v) for v in values], pa.string())
    return pa.table(arrays)


def read_sql(url: sa.engine.URL, spec: m.SqlImportSpec, start_watermark: str) -> IngestInput:
    """Rows of the table or query (above the watermark for incremental imports), in pages."""
    check_sql_spec(spec)
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as error:
        raise InvalidArgument(f"cannot use {masked(url)}: {error}", reason="INVALID_SQL_URL") from None
    batches: list[Batch] = []
    fetch_size = spec.fetch_size or DEFAULT_FETCH_SIZE
    statement, params = _statement(spec, start_watermark)
    dialect = url.get_backend_name()
    try:
        with engine.connect() as connection:
            if dialect in ("mysql", "mariadb"):
                connection.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
            elif dialect == "postgresql":
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            elif dialect == "sqlite":
                connection.exec_driver_sql("PRAGMA query_only = ON")
            result = connection.execution_options(stream_results=True, yield_per=fetch_size).execute(statement, params)
            columns = list(result.keys())
            for page_number, page in enumerate(result.partitions(fetch_size)):
                batches.append(Batch(f"page-{page_number}", _partition_table(columns, page)))
            if not batches:
                batches.append(Batch("page-0", pa.table({c: pa.array([], pa.null()) for c in columns})))
    except sa_exc.OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "connection failed"
        raise Unavailable(f"cannot read from {masked(url)}: {reason}", reason="SQL_SOURCE_UNREACHABLE") from None
    except (sa_exc.ProgrammingError, sa_exc.DatabaseError) as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "query failed"
        raise InvalidArgument(f"the query on {masked(url)} failed: {reason}", reason="SQL_QUERY_FAILED") from None
    finally:
        engine.dispose()
    mapped = [Batch(b.batch_id, _rename(b.table, spec.column_mapping)) for b in batches]
    watermark_end = start_watermark
    if spec.mode == m.SQL_IMPORT_MODE_INCREMENTAL:
        watermark_name = spec.column_mapping.get(spec.watermark_column, spec.watermark_column)
        highest: Any = None
        for batch in mapped:
            if watermark_name not in batch.table.column_names:
                raise InvalidArgument(f"watermark column {spec.watermark_column!r} is not in the result", reason="WATERMARK_COLUMN_MISSING")
            column = batch.table.column(watermark_name)
            if len(column) and column.null_count < len(column) and not pa.types.is_null(column.type):
                top = pc.max(column).as_py()
                highest = top if highest is None or top > highest else highest
        if highest is not None:
            watermark_end = _watermark_text(highest)
    return IngestInput(
        batches=mapped,
        shape=InputShape(coerce=True),
        batches_received=len(mapped),
        drop_columns=[spec.column_mapping.get(spec.watermark_column, spec.watermark_column)] if spec.watermark_column else [],
        watermark_end=watermark_end,
    )
