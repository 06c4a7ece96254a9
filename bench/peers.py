"""Peer environments for the benchmarks: each peer gets a virtual environment of its own.

Peers (Evidently, KServe, ...) pin versions that conflict with Falaj's, so the benches
install them into `.bench/venvs/<name>` the first time they are needed and reuse them
afterwards. Only package registries are contacted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".bench" / "venvs"

PEERS = {
    "evidently": ["evidently==0.7.23", "pandas<3", "pyarrow"],
}


def peer_python(name: str, requirements: list[str] | None = None) -> Path:
    """The interpreter of peer `name`, creating and installing its environment when missing."""
    wanted = requirements or PEERS[name]
    folder = VENVS / name
    python = folder / "bin" / "python"
    stamp = folder / "falaj-requirements.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    print(f"[bench] installing peer '{name}' into {folder} ({', '.join(wanted)}) ...", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted], check=True)
    stamp.write_text(json.dumps(wanted))
    return python


def write_rows(path: Path | None, rows: list[dict[str, object]]) -> None:
    """Write benchmark rows in the shape bench/run_all.py reads."""
    if path is not None:
        path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


def row(benchmark: str, falaj: str, peer: str, ratio: float | None, goal: str, met: bool | None) -> dict[str, object]:
    """One line of the benchmark table: Falaj's figure, the peer's, their ratio and the goal.

    `ratio` reads "times better than the peer or floor": peer time / Falaj time, or Falaj
    rate / peer rate (below 1, Falaj is behind).
    """
    return {"benchmark": benchmark, "falaj": falaj, "peer": peer, "ratio": ratio, "goal": goal, "met": met}
