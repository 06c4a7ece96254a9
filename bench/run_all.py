"""`make bench`: every benchmark, side by side with its peer or floor, in one table.

Each bench script runs in its own process with `--json`, returning rows of
(benchmark, Falaj's figure, the peer's or floor's figure, ratio, goal, met). The table is
printed, written to bench/results/latest.json, and to docs/benchmarks.md with the date
and the machine. The ratio always reads "times better than the peer or floor": the
peer's time over Falaj's, or Falaj's rate over the peer's; below 1 Falaj is behind. Absolute times on shared 2-core machines are noisy; ratios measured in
the same run are what count.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (script, arguments, time limit in seconds): each sized to fit the 15-minute budget.
BENCHES: list[tuple[str, list[str], int]] = [
    ("bench_gateway.py", ["--calls", "2000"], 240),
    ("bench_ingest.py", ["--rows", "1000000", "--repeat", "2"], 300),
    ("bench_features.py", [], 300),
    ("bench_training.py", [], 300),
    ("bench_serving.py", [], 420),
    ("bench_experiments.py", ["--events", "2000000"], 300),
    ("bench_monitoring.py", ["--repeat", "2"], 420),
]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def run(script: str, args: list[str], limit: int) -> tuple[list[dict[str, object]], str, float]:
    path = ROOT / "bench" / script
    if not path.exists():
        return [{"benchmark": script, "falaj": "-", "peer": "-", "ratio": None, "goal": "-", "met": None}], "not written yet", 0.0
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, str(path), *args, "--json", str(out_path)], cwd=ROOT, capture_output=True, text=True, timeout=limit
        )
        elapsed = time.perf_counter() - started
        if completed.returncode != 0:
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
            return [], f"failed (exit {completed.returncode}): {tail[0][:200]}", elapsed
        rows = json.loads(out_path.read_text())["rows"]
        return rows, "ok", elapsed
    except subprocess.TimeoutExpired:
        return [], f"stopped after {limit} s", time.perf_counter() - started
    except (OSError, ValueError, KeyError) as error:
        return [], f"no results: {error}", time.perf_counter() - started
    finally:
        out_path.unlink(missing_ok=True)


def fmt_ratio(ratio: object) -> str:
    return f"{ratio:,.1f}x" if isinstance(ratio, (int, float)) else "-"


def fmt_met(met: object) -> str:
    return {True: "met", False: "MISSED", None: "-"}[met if isinstance(met, bool) else None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these scripts (e.g. bench_gateway.py)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    selected = [b for b in BENCHES if not args.only or b[0] in args.only]
    results = []
    for script, script_args, limit in selected:
        print(f"[bench] {script} ...", flush=True)
        rows, status, elapsed = run(script, script_args, limit)
        print(f"[bench] {script}: {status} ({elapsed:.0f} s)", flush=True)
        results.append({"script": script, "status": status, "seconds": round(elapsed, 1), "rows": rows})

    header = "| benchmark | Falaj | peer or floor | ratio | goal | met |\n|---|---|---|---|---|---|"
    lines = []
    for result in results:
        if not result["rows"]:
            lines.append(f"| {result['script']} | - | - | - | - | {result['status']} |")
        for r in result["rows"]:
            lines.append(f"| {r['benchmark']} | {r['falaj']} | {r['peer']} | {fmt_ratio(r['ratio'])} | {r['goal']} | {fmt_met(r['met'])} |")
    table = header + "\n" + "\n".join(lines)
    print("\n" + table)

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "latest.json").write_text(
        json.dumps({"date": now, "machine": machine(), "results": results}, indent=2) + "\n"
    )
    if not args.no_docs:
        docs = ROOT / "docs" / "benchmarks.md"
        docs.parent.mkdir(exist_ok=True)
        docs.write_text(
            "# Benchmarks\n\n"
            f"Measured {now} on {machine()} by `make bench` (each peer measured in the same run; "
            "shared machines are noisy, so ratios are what count).\n\n"
            'The ratio reads "times better than the peer or floor" (peer time / Falaj time, or Falaj rate / peer rate); '
            "below 1 Falaj is behind.\n\n"
            f"{table}\n\n"
            + "".join(f"- `{r['script']}`: {r['status']}, {r['seconds']} s\n" for r in results)
            + "\n"
            + (ROOT / "bench" / "NOTES.md").read_text()
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
