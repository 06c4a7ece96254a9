"""Regenerate the SDK's Python stubs from proto/ (what `make proto` runs).

With `--check` it generates into a temporary folder and exits non-zero when the
committed code under sdk/src differs, which is how CI catches stale stubs.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
SDK_SRC = ROOT / "sdk" / "src"
GENERATED_TOP = "falaj"  # every generated module lives under sdk/src/falaj/<area>/...
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) with the python, grpc and mypy plugins into out_dir."""
    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *_proto_files(),
    ]
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:  # plugins chat on stderr; show it only when protoc fails
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed with exit code {result.returncode}")
    # Packages need an __init__.py so setuptools, mypy and pytest agree on module names.
    for folder in sorted({p.parent for p in out_dir.rglob("*_pb2.py")}):
        while folder != out_dir:
            (folder / "__init__.py").touch()
            folder = folder.parent


def _generated_files(base: Path) -> set[str]:
    found: set[str] = set()
    for path in (base / GENERATED_TOP).rglob("*"):
        if path.name.endswith(GENERATED_SUFFIXES):
            found.add(str(path.relative_to(base)))
    return found


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = _generated_files(fresh), _generated_files(SDK_SRC)
        stale = sorted(want ^ have)
        stale += sorted(f for f in want & have if not filecmp.cmp(fresh / f, SDK_SRC / f, shallow=False))
    if stale:
        print("generated code is stale; run `make proto`:", *stale, sep="\n  ")
        return 1
    print(f"generated code is fresh ({len(want)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        return check()
    for old in _generated_files(SDK_SRC):
        (SDK_SRC / old).unlink()
    generate(SDK_SRC)
    print(f"generated {len(_generated_files(SDK_SRC))} files under {SDK_SRC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
