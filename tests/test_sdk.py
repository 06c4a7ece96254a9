"""The SDK: installable on its own (no torch, Feast, ONNX Runtime), typed errors, typed clients."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from falaj.sdk import Falaj

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "feast", "onnxruntime", "sqlalchemy", "falaj_platform", "tritonclient")


def test_sdk_wheel_depends_only_on_grpc_and_protobuf(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT / "sdk")],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("falaj_sdk-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
    requires = sorted(
        line.split(":", 1)[1].strip().split(">")[0].split("<")[0] for line in metadata.splitlines() if line.startswith("Requires-Dist")
    )
    assert requires == ["googleapis-common-protos", "grpcio", "grpcio-status", "protobuf"]
    assert "falaj/ingest/v1/service_pb2_grpc.pyi" in names and "falaj/sdk/client.py" in names and "falaj/py.typed" in names
    assert not any(n.startswith("falaj_platform") for n in names)


def test_sdk_imports_every_contract_without_heavy_packages() -> None:
    code = (
        "import sys, falaj.sdk\n"
        "for s in ['ingest','features','training','serving','experiments','monitoring','gateway']:\n"
        "    __import__(f'falaj.{s}.v1.service_pb2_grpc')\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sdk_shares_an_environment_with_tritonclient() -> None:
    # Same interpreter, same protobuf 6.x: tritonclient and the SDK both import,
    # and the SDK does not load its own `inference.*` copy until asked.
    code = "import tritonclient.grpc, falaj.sdk, falaj.serving.v1.service_pb2_grpc, google.protobuf as p; assert p.__version__.startswith('6.'), p.__version__"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_service_is_a_clear_error() -> None:
    import grpc

    client = Falaj(grpc.insecure_channel("127.0.0.1:1"))
    with pytest.raises(ValueError, match="unknown service 'billing'"):
        client.client("billing")
    client.close()
