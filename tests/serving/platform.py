"""The whole platform for serving's cross-service tests: the six services and the gateway,
in-process, over mTLS, with the gateway on a port known up front so that serving reaches
training, features, ingest and the audit log through it with its own identity."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from falaj.common.v1 import common_pb2
from falaj.training.v1 import message_pb2 as train_pb
from falaj.training.v1 import request_response_pb2 as train_rr
from falaj.training.v1 import service_pb2_grpc as train_service
from falaj_platform.gateway.server import start_gateway
from falaj_platform.pki import PKI
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import SERVICES, load_settings
from falaj_platform.stack import MODULES
from tests.backends import backend_env
from tests.conftest import free_port
from tests.gateway.conftest import CLIENTS, Platform


def start_serving_platform(
    home: Path, pki: PKI, *, service_env: dict[str, str] | None = None, gateway_env: dict[str, str] | None = None
) -> Platform:
    """The six services and the gateway, in-process, as tests/gateway starts them (and on the
    same stores), except that the gateway listens on a port known up front; `service_env` and
    `gateway_env` add settings to the services' and the gateway's own."""
    for name, role in CLIENTS.items():
        if not (pki.client_dir(name) / "cert.pem").exists():
            pki.issue_client(name, role=role)
    env = {
        **backend_env(home),
        "FALAJ_HOME": str(home),
        "FALAJ_PKI_DIR": str(pki.root),
        "FALAJ_LOG_LEVEL": "warning",
        "FALAJ_RELOAD_SECONDS": "0.2",
        "FALAJ_GATEWAY_ADDR": f"127.0.0.1:{free_port()}",
    }
    services = {}
    for name in SERVICES:
        spec = importlib.import_module(MODULES[name] + ".server").SPEC
        services[name] = start_service(spec, load_settings(name, env={**env, **(service_env or {})}), listen_addr="127.0.0.1:0")
        env[f"FALAJ_{name.upper()}_ADDR"] = f"127.0.0.1:{services[name][0].port}"
    gateway = start_gateway(load_settings("gateway", env={**env, **(gateway_env or {})}))
    return Platform(home, pki, gateway, services, env)


def import_model(platform: Platform, model: str, path: Path, task: int, signature: train_pb.ModelSignature | None = None) -> str:
    """Import an ONNX file into the training registry as `root`; the new version's name."""
    content = path.read_bytes()
    header = train_rr.ImportModelVersionHeader(
        registered_model=f"models/{model}",
        residency=common_pb2.Residency(region="ae-dxb"),
        task=task,  # type: ignore[arg-type]
        expected_sha256=hashlib.sha256(content).hexdigest(),
        import_source="tests/serving",
        signature=signature,
    )
    messages = [train_rr.ImportModelVersionRequest(header=header)]
    messages += [train_rr.ImportModelVersionRequest(chunk=content[i : i + 65536]) for i in range(0, len(content), 65536)]
    stub = train_service.TrainingServiceStub(platform.channel("root"))
    return str(stub.ImportModelVersion(iter(messages), timeout=60).model_version.name)
