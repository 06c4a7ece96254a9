"""Ingest benchmark: rows/s streamed with IngestBatches, validated and committed, beside the floor.

The dataset has 20 float64 columns (NOT NULL, a range constraint on each) under the
default cleansing policy (exact-row deduplication). The platform runs in-process (all six
services and the real gateway, real SQLite catalogs and Parquet files) and the stream
goes through the gateway over mTLS as an admin client's would. Measured from the first message sent to the
committed answer: gRPC transfer, Arrow decoding, validation, deduplication, Parquet
partition files (fsynced), content hashing, column profiles and the catalog commit.
The floor is pyarrow writing the same table to one Parquet file in this process.

Run: .venv/bin/python bench/bench_ingest.py --rows 1000000 [--batch-rows 65536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import row, write_rows  # noqa: E402

COLUMNS = 20


def _table(rows: int) -> object:
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(7)
    return pa.table({f"f{i:02d}": rng.normal(100.0, 15.0, rows) for i in range(COLUMNS)})


def _batches(table: object, batch_rows: int) -> list[tuple[str, bytes, int]]:
    import pyarrow as pa

    encoded = []
    for index, batch in enumerate(table.to_batches(max_chunksize=batch_rows)):  # type: ignore[attr-defined]
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        encoded.append((f"bench-{index}", sink.getvalue().to_pybytes(), batch.num_rows))
    return encoded


def floor_rows_per_second(table: object, folder: Path) -> float:
    import pyarrow.parquet as pq

    target = folder / "floor.parquet"
    started = time.perf_counter()
    pq.write_table(table, target)
    elapsed = time.perf_counter() - started
    target.unlink()
    return table.num_rows / elapsed  # type: ignore[attr-defined]


def ingest_rows_per_second(rows: int, batch_rows: int, repeat: int, folder: Path) -> tuple[list[float], float]:
    from falaj.common.v1 import common_pb2 as common
    from falaj.ingest.v1 import message_pb2 as m
    from falaj.ingest.v1 import request_response_pb2 as rr
    from falaj.ingest.v1 import service_pb2_grpc
    from falaj_platform.pki import PKI
    from falaj_platform.runtime.logs import configure_logging
    from tests.gateway.conftest import start_platform, stop_platform

    configure_logging("bench", "warning")
    pki = PKI(folder / "pki")
    pki.init()
    platform = start_platform(folder / "home", pki)
    # Through the real gateway: mTLS, authorization, audit, forwarding, as a client sees it.
    stub = service_pb2_grpc.IngestServiceStub(platform.channel("root"))
    region = platform.settings("ingest").region
    try:
        bounds = m.ColumnConstraints(range=m.RangeConstraint(min=-1e9, max=1e9))
        schema = m.Schema(columns=[m.Column(name=f"f{i:02d}", type=m.COLUMN_TYPE_FLOAT, constraints=bounds) for i in range(COLUMNS)])
        table = _table(rows)
        encoded = _batches(table, batch_rows)
        floor = floor_rows_per_second(table, folder)
        results = []
        for attempt in range(repeat):
            dataset_id = f"bench_{attempt}"
            stub.CreateDataset(
                rr.CreateDatasetRequest(dataset_id=dataset_id, dataset=m.Dataset(schema=schema, residency=common.Residency(region=region))),
                timeout=30,
            )

            def requests(dataset: str = f"datasets/{dataset_id}") -> object:
                yield rr.IngestBatchesRequest(header=rr.IngestStreamHeader(dataset=dataset, request_id=f"bench-{dataset}"))
                for batch_id, data, count in encoded:
                    yield rr.IngestBatchesRequest(batch=common.ArrowBatch(arrow_ipc=data, batch_id=batch_id, row_count=count))

            started = time.perf_counter()
            ingestion = stub.IngestBatches(requests(), timeout=600).ingestion
            elapsed = time.perf_counter() - started
            assert ingestion.report.rows_accepted == rows, ingestion.report
            results.append(rows / elapsed)
        return results, floor
    finally:
        stop_platform(platform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=65_536)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs, floor = ingest_rows_per_second(args.rows, args.batch_rows, args.repeat, Path(tmp))
    best, median = max(runs), statistics.median(runs)
    print(f"ingest: {args.rows:,} rows x {COLUMNS} float64 columns, batches of {args.batch_rows:,} rows, {args.repeat} run(s)")
    print(f"  IngestBatches (stream, validate, commit): {median:>12,.0f} rows/s median  {best:>12,.0f} rows/s best")
    print(f"  pyarrow write_table to Parquet (floor):   {floor:>12,.0f} rows/s")
    print(
        f"  ratio ingest/floor: {median / floor:.2f} (median), {best / floor:.2f} (best);  target 300,000 rows/s: {'met' if median >= 300_000 else 'NOT met'}"
    )
    write_rows(
        args.json,
        [
            row(
                f"ingest {args.rows // 1000}k rows x {COLUMNS} cols via gateway",
                f"{median:,.0f} rows/s",
                f"pyarrow to Parquet {floor:,.0f} rows/s",
                median / floor,
                ">= 300,000 rows/s",
                median >= 300_000,
            )
        ],
    )


if __name__ == "__main__":
    main()
