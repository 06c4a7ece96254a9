"""Experiments service benchmarks.

1. Assignment throughput in-process: the domain Assigner (hash + bucket lookup) and the
   servicer's BatchAssignVariants called in-process (one store read per 10,000 units).
2. AssignVariant p50/p99 through the real gateway (mTLS, authorization, forward) and
   straight to the service, sequential calls.
3. Analysis of N events streamed from the store (default 10M: per unit 1 exposure,
   1 pre-period outcome for CUPED and 8 outcomes after exposure): its time and its peak
   memory, measured in a fresh process so that the loading does not count.

Run: .venv/bin/python bench/bench_experiments.py [--events 200000] [--database-url URL] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import row, write_rows  # noqa: E402

START = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
ACTOR = "spiffe://falaj.local/client/bench"
EVENTS_PER_UNIT = 10  # 1 exposure, 1 pre-period outcome, 8 outcomes after exposure


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    """Peak resident memory since the last `_reset_peak_rss` (VmHWM), else since the process began."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _design(experiment_id: str = "bench") -> Any:
    from falaj_platform.services.experiments import lifecycle
    from falaj_platform.services.experiments import model as m

    draft = lifecycle.create(
        m.Experiment(
            experiment_id=experiment_id,
            variants=(
                m.Variant("control", control=True, weight_bps=5000, deployment="deployments/ranker-a"),
                m.Variant("treatment", weight_bps=5000, deployment="deployments/ranker-b"),
            ),
            coverage_bps=10_000,
            hashing=m.Hashing("user_id", experiment_id),
            metrics=(m.MetricDefinition("revenue", m.MetricType.CONTINUOUS, m.MetricRole.PRIMARY),),
            residency_region="ae-dxb",
            analysis=m.AnalysisSettings(
                cuped=m.CupedSettings(enabled=True), sequential=m.SequentialSettings(enabled=True, tuning_units=100_000)
            ),
        ),
        ACTOR,
        START,
    )
    return m.start(draft, ACTOR, START, "bench")


def _open_store(url: str) -> Any:
    from falaj_platform.runtime.db import Database
    from falaj_platform.services.experiments.server import MIGRATIONS
    from falaj_platform.services.experiments.store import ExperimentsStore

    database = Database(url, MIGRATIONS, "falaj_experiments_schema_version")
    database.upgrade()
    return ExperimentsStore(database)


# -- 1. assignment ---------------------------------------------------------------------


def bench_assignment(units: int) -> dict[str, float]:
    from falaj.experiments.v1 import request_response_pb2 as rr
    from falaj_platform.runtime.settings import load_settings
    from falaj_platform.services.experiments.api import ExperimentsApi
    from falaj_platform.services.experiments.assignment import Assigner

    experiment = _design()
    assigner = Assigner(experiment)
    ids = [f"user-{i}" for i in range(units)]
    started = time.perf_counter()
    for unit in ids:
        assigner.assign(unit)
    domain_rate = units / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        store = _open_store(f"sqlite:///{tmp}/experiments.db")
        with store.transaction() as tx:
            tx.insert_experiment(experiment)
        api = ExperimentsApi(
            store, load_settings("experiments", env={"FALAJ_HOME": tmp}), audit=_NoAudit(), run_in_background=lambda task: task()
        )
        batches = [
            rr.BatchAssignVariantsRequest(experiment="experiments/bench", units=[rr.AssignmentUnit(unit_id=u) for u in ids[i : i + 10_000]])
            for i in range(0, units, 10_000)
        ]
        started = time.perf_counter()
        for request in batches:
            api.BatchAssignVariants(request, None)  # type: ignore[arg-type]
        servicer_rate = units / (time.perf_counter() - started)
        store.database.dispose()
    return {"assign_domain_per_s": domain_rate, "assign_servicer_batch_per_s": servicer_rate}


class _NoAudit:
    def report(self, event_type: Any, **details: Any) -> None:
        return None


# -- 2. through the gateway ------------------------------------------------------------


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_gateway(calls: int) -> dict[str, float | str]:
    import grpc

    from falaj.experiments.v1 import request_response_pb2 as rr
    from falaj.experiments.v1 import service_pb2_grpc
    from falaj_platform.gateway.server import start_gateway
    from falaj_platform.pki import PKI
    from falaj_platform.runtime import tls
    from falaj_platform.runtime.identity import CALLER_METADATA_KEY, client_id
    from falaj_platform.runtime.service import start_service
    from falaj_platform.runtime.settings import PkiPaths, load_settings
    from falaj_platform.services.experiments.server import SPEC
    from falaj_platform.services.experiments.store import ExperimentsStore

    with tempfile.TemporaryDirectory() as tmp:
        pki = PKI(Path(tmp) / "pki")
        pki.init()
        pki.issue_client("bench", role="admin")
        env = {"FALAJ_HOME": f"{tmp}/home", "FALAJ_PKI_DIR": str(pki.root), "FALAJ_LOG_LEVEL": "warning"}
        running, database = start_service(SPEC, load_settings("experiments", env=env), listen_addr="127.0.0.1:0")
        with ExperimentsStore(database).transaction() as tx:
            tx.insert_experiment(_design())
        gateway = start_gateway(
            load_settings("gateway", env={**env, "FALAJ_EXPERIMENTS_ADDR": f"127.0.0.1:{running.port}"}), listen_addr="127.0.0.1:0"
        )
        options = [("grpc.ssl_target_name_override", "localhost")]

        def creds(kind: str, name: str) -> grpc.ChannelCredentials:
            folder = pki.service_dir(name) if kind == "service" else pki.client_dir(name)
            return tls.channel_credentials(PkiPaths(pki.ca_cert_path, folder / "cert.pem", folder / "key.pem"))

        channels = {
            "direct": (
                grpc.secure_channel(f"127.0.0.1:{running.port}", creds("service", "gateway"), options=options),
                [(CALLER_METADATA_KEY, client_id("bench"))],
            ),
            "gateway": (grpc.secure_channel(f"127.0.0.1:{gateway.running.port}", creds("client", "bench"), options=options), []),
        }
        results: dict[str, float | str] = {}
        try:
            for label, (channel, metadata) in channels.items():
                stub = service_pb2_grpc.ExperimentsServiceStub(channel)
                try:
                    for i in range(100):
                        stub.AssignVariant(
                            rr.AssignVariantRequest(experiment="experiments/bench", unit_id=f"warm-{i}"), metadata=metadata, timeout=10
                        )
                    samples = []
                    for i in range(calls):
                        request = rr.AssignVariantRequest(experiment="experiments/bench", unit_id=f"user-{i}")
                        started = time.perf_counter()
                        stub.AssignVariant(request, metadata=metadata, timeout=10)
                        samples.append((time.perf_counter() - started) * 1000)
                    results[f"assign_{label}_p50_ms"], results[f"assign_{label}_p99_ms"] = _percentiles(samples)
                except grpc.RpcError as error:
                    results[f"assign_{label}_error"] = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
        finally:
            for channel, _ in channels.values():
                channel.close()
            gateway.stop(0)
            running.stop(0)
            database.dispose()
    return results


# -- 3. analysis of N events -----------------------------------------------------------


def populate(url: str, events: int, seed: int = 7) -> dict[str, float]:
    """Load events straight into the store's tables in chunks (bounded memory)."""
    import numpy as np

    from falaj_platform.services.experiments.assignment import Assigner
    from falaj_platform.services.experiments.store import exposures, outcomes

    store = _open_store(url)
    experiment = _design()
    with store.transaction() as tx:
        tx.insert_experiment(experiment)
    assigner = Assigner(experiment)
    units = max(events // EVENTS_PER_UNIT, 2)
    rng = np.random.default_rng(seed)
    # A few shared timestamps: creating 10M datetime objects would measure Python, not the store.
    exposed_at = [START + dt.timedelta(minutes=m) for m in range(60)]
    after = [START + dt.timedelta(hours=2, minutes=m) for m in range(60)]
    before = START - dt.timedelta(days=3)
    recorded = START + dt.timedelta(days=1)
    started = time.perf_counter()
    chunk = 20_000
    for first in range(0, units, chunk):
        ids = [f"user-{i}" for i in range(first, min(first + chunk, units))]
        habit = rng.gamma(2.0, 10.0, len(ids))
        treated = np.array([assigner.variant_of_unit(u).variant_id == "treatment" for u in ids])  # type: ignore[union-attr]
        exposure_rows = [
            {
                "experiment": "bench",
                "event_id": f"x-{u}",
                "unit_id": u,
                "variant_id": "treatment" if t else "control",
                "time": exposed_at[i % 60],
                "source": "",
                "recorded_at": recorded,
            }
            for i, (u, t) in enumerate(zip(ids, treated, strict=True))
        ]
        pre = habit + rng.normal(0, 3, len(ids))
        post = habit[:, None] / 8 + rng.normal(0, 1, (len(ids), 8)) + treated[:, None] * 0.05
        outcome_rows = [
            {
                "experiment": "bench",
                "event_id": f"p-{u}",
                "unit_id": u,
                "metric_id": "revenue",
                "value": float(pre[i]),
                "time": before,
                "recorded_at": recorded,
            }
            for i, u in enumerate(ids)
        ]
        outcome_rows += [
            {
                "experiment": "bench",
                "event_id": f"r{k}-{u}",
                "unit_id": u,
                "metric_id": "revenue",
                "value": float(post[i, k]),
                "time": after[(i + k) % 60],
                "recorded_at": recorded,
            }
            for i, u in enumerate(ids)
            for k in range(8)
        ]
        with store.database.engine.begin() as connection:
            connection.execute(exposures.insert(), exposure_rows)
            connection.execute(outcomes.insert(), outcome_rows)
    load_s = time.perf_counter() - started
    if store.database.engine.dialect.name == "postgresql":
        with store.database.engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
            connection.commit()
    store.database.dispose()
    return {"units": units, "events_loaded": units * EVENTS_PER_UNIT, "load_s": load_s}


def _analyse_in_child(url: str, queue: Any) -> None:
    from falaj_platform.services.experiments.analyzer import run_analysis

    store = _open_store(url)
    experiment = store.get_experiment("bench")
    baseline = _rss_mib()
    reset = _reset_peak_rss()  # imports and migrations peak higher than the analysis; count only the analysis
    started = time.perf_counter()
    result = run_analysis(store, experiment, experiment.analysis, START + dt.timedelta(days=1), list(experiment.metrics))
    elapsed = time.perf_counter() - started
    comparison = result.metrics[0].comparisons[0]
    queue.put(
        {
            "analysis_s": elapsed,
            "events_analysed": result.events_analysed,
            "rss_before_analysis_mib": baseline,
            "peak_rss_mib": _peak_rss_mib(),
            "peak_rss_above_baseline_mib": _peak_rss_mib() - baseline,
            "peak_rss_counts_analysis_only": reset,
            "units_analysed": sum(t.units for t in result.traffic),
            "cuped_variance_reduction": comparison.cuped_variance_reduction,
            "p_value": comparison.test.p_value,
        }
    )
    store.database.dispose()


def bench_analysis(url: str) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak memory is the analysis's own
    queue = context.Queue()
    process = context.Process(target=_analyse_in_child, args=(url, queue))
    process.start()
    result: dict[str, float] = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="events to analyse (default 10M)")
    parser.add_argument("--assignments", type=int, default=200_000, help="units to assign in-process")
    parser.add_argument("--calls", type=int, default=2_000, help="sequential AssignVariant calls per path")
    parser.add_argument("--database-url", default="", help="store for the analysis (default: a temporary SQLite file)")
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    print(f"assignment: {args.assignments} units in-process ...", flush=True)
    results.update(bench_assignment(args.assignments))
    print(f"  domain Assigner        {results['assign_domain_per_s']:>12,.0f} assignments/s")
    print(f"  BatchAssignVariants    {results['assign_servicer_batch_per_s']:>12,.0f} assignments/s (servicer in-process, 10k per call)")
    if not args.skip_gateway:
        print(f"AssignVariant: {args.calls} sequential calls ...", flush=True)
        results.update(bench_gateway(args.calls))
        for label in ("direct", "gateway"):
            if f"assign_{label}_p50_ms" in results:
                print(f"  {label:<8} p50 {results[f'assign_{label}_p50_ms']:.3f} ms   p99 {results[f'assign_{label}_p99_ms']:.3f} ms")
            else:
                print(f"  {label:<8} failed: {results[f'assign_{label}_error']}")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/analysis.db"
        print(f"analysis: loading {args.events:,} events into {url.split('://')[0]} ...", flush=True)
        results.update(populate(url, args.events))
        print(f"  loaded {results['events_loaded']:,} events for {results['units']:,} units in {results['load_s']:.1f} s")
        results.update(bench_analysis(url))
    print(
        f"  analysed {results['events_analysed']:,} events ({results['units_analysed']:,} units, CUPED + sequential) "
        f"in {results['analysis_s']:.2f} s"
    )
    print(
        f"  peak RSS while analysing {results['peak_rss_mib']:.0f} MiB "
        f"({results['peak_rss_above_baseline_mib']:.0f} MiB above the {results['rss_before_analysis_mib']:.0f} MiB the process had before"
        + ("" if results["peak_rss_counts_analysis_only"] else "; includes the import peak: VmHWM could not be reset")
        + ")"
    )
    table = [
        row("assignments in-process", f"{results['assign_domain_per_s']:,.0f}/s", "-", None, "shown (no goal)", None),
        row(
            f"analysis of {results['events_analysed']:,} events, streamed",
            f"{results['analysis_s']:.1f} s, +{results['peak_rss_above_baseline_mib']:.0f} MiB",
            "-",
            None,
            "streamed, bounded memory",
            results["peak_rss_above_baseline_mib"] < 512,
        ),
    ]
    if "assign_gateway_p50_ms" in results and "assign_direct_p50_ms" in results:
        table.insert(
            1,
            row(
                "AssignVariant p50 via gateway",
                f"{results['assign_gateway_p50_ms']:.2f} ms",
                f"direct {results['assign_direct_p50_ms']:.2f} ms",
                results["assign_direct_p50_ms"] / results["assign_gateway_p50_ms"],
                "shown (no goal)",
                None,
            ),
        )
    write_rows(args.json, table)


if __name__ == "__main__":
    main()
