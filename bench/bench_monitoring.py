"""Monitoring benchmark: drift of 20 numeric features, 100k reference x 100k current rows,
Falaj beside Evidently's DataDriftPreset on the same frames in the same run.

Both sides get the same two Parquet files. Falaj runs in this process
(`falaj_platform.services.monitoring.drift.dataset_drift`, with the plot histograms the
report needs); Evidently runs in its own virtual environment (its pins conflict with
Falaj's), timed inside that process around `Dataset.from_pandas` + `Report.run`. The
script prints both times, the ratio, and the largest absolute difference between the
per-column statistics.

Run: .venv/bin/python bench/bench_monitoring.py [--rows 100000] [--features 20] [--repeat 3] [--json PATH]
Evidently 0.7.23 is installed into .bench/venvs/evidently on first use (or point
EVIDENTLY_PYTHON at another interpreter that has it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.peers import peer_python, row, write_rows  # noqa: E402
from falaj_platform.services.monitoring import drift  # noqa: E402

EVIDENTLY_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import pandas as pd
from evidently import DataDefinition, Dataset, Report, __version__
from evidently.presets import DataDriftPreset

reference = pd.read_parquet(sys.argv[1])
current = pd.read_parquet(sys.argv[2])
repeat = int(sys.argv[3])
definition = DataDefinition(numerical_columns=list(reference.columns))
times, snapshot = [], None
for _ in range(repeat):
    started = time.perf_counter()
    report = Report([DataDriftPreset()])
    snapshot = report.run(Dataset.from_pandas(current, data_definition=definition), Dataset.from_pandas(reference, data_definition=definition))
    times.append(time.perf_counter() - started)
values, methods, share = {}, {}, None
for metric in snapshot.dict()["metrics"]:
    config = metric["config"]
    if config.get("type", "").endswith("ValueDrift"):
        values[config["column"]] = float(metric["value"])
        methods[config["column"]] = config["method"]
    elif config.get("type", "").endswith("DriftedColumnsCount"):
        share = metric["value"]["share"]
print(json.dumps({"version": __version__, "times": times, "values": values, "methods": methods, "share": share}))
"""


def frames(rows: int, features: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Half the features shifted by 0.05-0.5 std in the current frame, the rest unchanged."""
    rng = np.random.default_rng(seed)
    reference = pd.DataFrame({f"f{i:02d}": rng.normal(0, 1 + i / 10, rows) for i in range(features)})
    current = pd.DataFrame(
        {f"f{i:02d}": rng.normal((0.05 + 0.45 * i / features) * (1 + i / 10) if i % 2 else 0.0, 1 + i / 10, rows) for i in range(features)}
    )
    return reference, current


def run_falaj(reference: pd.DataFrame, current: pd.DataFrame, repeat: int) -> tuple[list[float], drift.DatasetDrift]:
    tests = [drift.ColumnTest(name, drift.ColumnKind.NUMERICAL) for name in reference.columns]
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        ref = {name: reference[name].to_numpy(dtype=np.float64) for name in reference.columns}
        cur = {name: current[name].to_numpy(dtype=np.float64) for name in current.columns}
        result = drift.dataset_drift(tests, ref, cur, with_plots=True)
        times.append(time.perf_counter() - started)
    assert result is not None
    return times, result


def run_evidently(reference_path: Path, current_path: Path, repeat: int) -> dict[str, Any] | str:
    try:
        python = os.environ.get("EVIDENTLY_PYTHON") or str(peer_python("evidently"))
    except subprocess.CalledProcessError as error:
        return f"could not install Evidently ({error})"
    completed = subprocess.run(
        [python, "-c", EVIDENTLY_SCRIPT, str(reference_path), str(current_path), str(repeat)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if completed.returncode != 0:
        return f"Evidently failed: {completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else completed.returncode}"
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, help="write the table rows here (bench/run_all.py reads them)")
    args = parser.parse_args()

    reference, current = frames(args.rows, args.features, args.seed)
    print(f"drift of {args.features} numeric features, {args.rows:,} reference x {args.rows:,} current rows, {os.cpu_count()} CPUs")
    falaj_times, result = run_falaj(reference, current, args.repeat)
    falaj_best = min(falaj_times)
    methods = sorted({c.method.value for c in result.columns})
    print(
        f"falaj:     best {falaj_best:.3f} s of {args.repeat} ({', '.join(f'{t:.3f}' for t in falaj_times)}); methods {methods}; drift share {result.drift_share:.2f}"
    )

    with tempfile.TemporaryDirectory(prefix="falaj-bench-") as folder:
        reference_path, current_path = Path(folder) / "reference.parquet", Path(folder) / "current.parquet"
        reference.to_parquet(reference_path)
        current.to_parquet(current_path)
        peer = run_evidently(reference_path, current_path, args.repeat)
    name = f"drift {args.features} cols, {args.rows // 1000}k x {args.rows // 1000}k"
    if isinstance(peer, str):
        print(f"evidently: not run - {peer}")
        print("ratio:     n/a")
        write_rows(args.json, [row(name, f"{falaj_best:.2f} s", f"Evidently: {peer}", None, ">= 5x faster, same statistics", False)])
        return 0
    evidently_times = [float(t) for t in peer["times"]]
    evidently_best = min(evidently_times)
    values: dict[str, float] = peer["values"]
    share = float(peer["share"])
    print(
        f"evidently: best {evidently_best:.3f} s of {args.repeat} ({', '.join(f'{t:.3f}' for t in evidently_times)}); "
        f"version {peer['version']}; methods {sorted(set(peer['methods'].values()))}; drift share {share:.2f}"
    )
    differences = {c.column: abs(c.statistic - values[c.column]) for c in result.columns}
    worst = max(differences, key=lambda name: differences[name])
    print(f"ratio:     Falaj is {evidently_best / falaj_best:.1f}x faster (Evidently {evidently_best:.3f} s / Falaj {falaj_best:.3f} s)")
    same_share = abs(result.drift_share - share) < 1e-12
    print(f"max |Falaj - Evidently| statistic: {differences[worst]:.3e} (column {worst}); same drift share: {same_share}")
    ratio = evidently_best / falaj_best
    equal = differences[worst] <= 1e-6 and same_share
    write_rows(
        args.json,
        [
            row(name, f"{falaj_best:.2f} s", f"Evidently {evidently_best:.2f} s", ratio, ">= 5x faster", ratio >= 5),
            row("drift statistics vs Evidently", f"max diff {differences[worst]:.1e}", "same frames", None, "<= 1e-6", equal),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
