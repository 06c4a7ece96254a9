"""The contracts: buf lint clean, generated code fresh, OIP identical to the public spec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing_service

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"

_DUMP_OIP = """
import json, sys, importlib
module = importlib.import_module(sys.argv[1])
out = {}
def walk(message):
    out[message.full_name] = sorted((f.name, f.number, f.type, f.label, f.message_type.full_name if f.message_type else '') for f in message.fields)
    for nested in message.nested_types:
        walk(nested)
for message in module.DESCRIPTOR.message_types_by_name.values():
    walk(message)
service = module.DESCRIPTOR.services_by_name['GRPCInferenceService']
out['rpcs'] = sorted((m.name, m.input_type.full_name, m.output_type.full_name) for m in service.methods)
print(json.dumps(out))
"""


def test_generated_code_is_fresh() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_standard_is_clean() -> None:
    if not BUF.exists():
        missing_service("buf is not installed (make installs it with npm)")
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dump(module: str) -> dict[str, list[list[object]]]:
    # One process per module: both define the `inference.*` names, one pool cannot hold both.
    result = subprocess.run([sys.executable, "-c", _DUMP_OIP, module], capture_output=True, text=True, check=True)
    data: dict[str, list[list[object]]] = json.loads(result.stdout)
    return data


def test_open_inference_protocol_matches_tritonclient_field_for_field() -> None:
    ours = _dump("falaj.inference.open_inference_grpc_pb2")
    theirs = _dump("tritonclient.grpc.service_pb2")
    assert ours["rpcs"]
    for rpc in ours["rpcs"]:
        assert rpc in theirs["rpcs"], f"{rpc} differs from tritonclient"
    for message, fields in ours.items():
        if message == "rpcs":
            continue
        assert message in theirs, f"{message} is not in tritonclient's contract"
        for field in fields:
            assert field in theirs[message], f"{message}.{field[0]} differs from tritonclient's"


@pytest.mark.parametrize("service", ["ingest", "features", "training", "serving", "experiments", "monitoring", "gateway"])
def test_every_rpc_has_its_own_request_and_response(service: str) -> None:
    import importlib

    module = importlib.import_module(f"falaj.{service}.v1.service_pb2")
    (descriptor,) = module.DESCRIPTOR.services_by_name.values()
    assert len(descriptor.methods) >= 5
    for method in descriptor.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
