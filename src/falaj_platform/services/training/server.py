"""Wiring of the training service: store, artifact store, job runner and servicer.

`SPEC` is the production wiring: training data from the features service through the
gateway, the gateway's audit log, the key-encryption key from FALAJ_TRAINING_KEK_FILE
(or created under the service's data folder). `build_spec(...)` wires the same service
with another data source, audit sink or config, which tests use.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from falaj.training.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.audit import AuditReporter
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceRuntime, ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.training.api import TrainingApi
from falaj_platform.services.training.artifacts import ArtifactStore, Keyring, load_or_create_kek
from falaj_platform.services.training.config import TrainingConfig, load_training_config
from falaj_platform.services.training.data import TrainingDataSource
from falaj_platform.services.training.features_source import FeaturesServiceDataSource
from falaj_platform.services.training.registry import AuditSink
from falaj_platform.services.training.store import TrainingStore

MIGRATIONS = Path(__file__).parent / "migrations"


def cuda_device_count() -> int:
    """GPUs this process can use (torch is imported only when a job asks for CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def keyring_for(config: TrainingConfig, settings: Settings) -> Keyring:
    current = load_or_create_kek(config.kek_file or settings.data_dir / "keys" / "kek.key")
    return Keyring(current, [load_or_create_kek(path) for path in config.previous_kek_files])


def build_register(
    config: TrainingConfig | None = None,
    data_source: Callable[[Settings], TrainingDataSource] | None = None,
    audit: Callable[[Settings], AuditSink] | None = None,
    on_api: Callable[[TrainingApi], None] | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    cuda_devices: Callable[[], int] = cuda_device_count,
) -> Callable[[grpc.Server, Database, Settings], Iterable[str]]:
    """A register function; each dependency left None gets its production wiring."""

    def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
        training_config = config or load_training_config()
        artifacts = ArtifactStore(
            settings.data_dir / "artifacts", keyring_for(training_config, settings), training_config.artifact_chunk_bytes
        )
        source = (
            data_source(settings)
            if data_source is not None
            else FeaturesServiceDataSource(
                lambda: secure_channel(settings.gateway_addr, settings.pki), consent_purpose=training_config.consent_purpose
            )
        )
        api = TrainingApi(
            TrainingStore(database),
            settings,
            config=training_config,
            artifacts=artifacts,
            data_source=source,
            audit=audit(settings) if audit is not None else AuditReporter(settings),
            cuda_devices=cuda_devices,
            **({"clock": clock} if clock is not None else {}),
        )
        if on_api is not None:
            on_api(api)
        api.start()
        service_pb2_grpc.add_TrainingServiceServicer_to_server(api, server)
        return [service_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name]

    return register


def build_spec(**wiring: object) -> ServiceSpec:
    """The training ServiceSpec with the given `build_register` wiring; stopping the server
    stops the job runner (its threads and warm workers), as at process exit."""
    apis: list[TrainingApi] = []
    on_api = wiring.pop("on_api", None)

    def remember(api: TrainingApi) -> None:
        apis.append(api)
        if on_api is not None:
            on_api(api)  # type: ignore[operator]

    register = build_register(**wiring, on_api=remember)  # type: ignore[arg-type]

    def setup(server: grpc.Server, runtime: ServiceRuntime) -> Iterable[str]:
        names = register(server, runtime.database, runtime.settings)
        runtime.on_stop(apis[-1].close)
        return names

    return ServiceSpec("training", MIGRATIONS, setup=setup)


register = build_register()

SPEC = build_spec()
