"""Training-specific settings: one frozen object read from the environment at boot.

The shared `Settings` carries what every service needs (home, region, database, PKI);
this adds what only training needs: how many jobs run at once, the key-encryption key
of the artifact store, which aliases are protected, and who may submit custom modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from falaj_platform.runtime.errors import StartupError

PRODUCTION_ALIAS = "production"


@dataclass(frozen=True)
class TrainingConfig:
    """What the training service needs beyond the shared settings."""

    # Jobs trained at the same time; each runs in its own worker process (or process
    # group, for distributed jobs).
    max_concurrent_jobs: int = 1
    # Worker processes kept started ahead (torch loaded: about 350 MB each), so a job does
    # not wait seconds for the interpreter and torch; 0 starts each worker on demand.
    prewarm_workers: int = 1
    # torch.set_num_threads of a worker when the spec leaves it 0; fixed rather than
    # "all cores" so the same spec gives the same floating-point results on any host.
    default_cpu_threads: int = 1
    # Wall-clock limit of a job whose spec sets none.
    default_timeout_seconds: float = 24 * 3600.0
    # Aliases that move only through an approved promotion request.
    protected_aliases: frozenset[str] = frozenset({PRODUCTION_ALIAS})
    # SPIFFE IDs allowed to submit MODEL_FAMILY_CUSTOM_MODULE jobs (their code runs in
    # the service's worker processes); "*" allows every caller. Empty: nobody.
    custom_module_submitters: frozenset[str] = frozenset()
    # Key-encryption key file (32 random bytes, base64). None: `<data_dir>/keys/kek.key`,
    # created with mode 0600 on first start. Point it at a mounted secret in production.
    kek_file: Path | None = None
    # Older key-encryption keys still accepted for reading artifacts (key rotation).
    previous_kek_files: tuple[Path, ...] = ()
    # Plaintext bytes per encrypted chunk of an artifact.
    artifact_chunk_bytes: int = 4 * 1024 * 1024
    # How often a running job's lease is renewed, and after how long without renewal
    # another replica (or a restarted service) marks the job's worker lost.
    heartbeat_seconds: float = 5.0
    stale_job_seconds: float = 60.0
    # Consent purpose asked of the features service: rows of data subjects who did not
    # consent to it are left out of training sets. "" asks for no filter (only for data
    # without data subjects).
    consent_purpose: str = "training"
    # Largest ONNX file ImportModelVersion accepts.
    max_import_bytes: int = 16 * 1024**3


def _int(env: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StartupError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise StartupError(f"{key}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StartupError(f"{key}={raw!r} is not a number") from None
    if value <= 0:
        raise StartupError(f"{key}={raw!r} must be positive")
    return value


def _names(env: Mapping[str, str], key: str, default: frozenset[str]) -> frozenset[str]:
    raw = env.get(key)
    if raw is None:
        return default
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def load_training_config(env: Mapping[str, str] | None = None) -> TrainingConfig:
    """Build the training config from the environment (os.environ by default)."""
    env = os.environ if env is None else env
    kek = env.get("FALAJ_TRAINING_KEK_FILE", "").strip()
    previous = tuple(Path(p.strip()) for p in env.get("FALAJ_TRAINING_PREVIOUS_KEK_FILES", "").split(",") if p.strip())
    protected = _names(env, "FALAJ_TRAINING_PROTECTED_ALIASES", frozenset({PRODUCTION_ALIAS}))
    if PRODUCTION_ALIAS not in protected:
        raise StartupError("FALAJ_TRAINING_PROTECTED_ALIASES must include 'production'")
    return TrainingConfig(
        max_concurrent_jobs=_int(env, "FALAJ_TRAINING_MAX_CONCURRENT_JOBS", 1, 1),
        prewarm_workers=_int(env, "FALAJ_TRAINING_PREWARM_WORKERS", 1, 0),
        default_cpu_threads=_int(env, "FALAJ_TRAINING_DEFAULT_CPU_THREADS", 1, 1),
        default_timeout_seconds=_float(env, "FALAJ_TRAINING_DEFAULT_TIMEOUT_SECONDS", 24 * 3600.0),
        protected_aliases=protected,
        custom_module_submitters=_names(env, "FALAJ_TRAINING_CUSTOM_MODULE_SUBMITTERS", frozenset()),
        kek_file=Path(kek) if kek else None,
        previous_kek_files=previous,
        artifact_chunk_bytes=_int(env, "FALAJ_TRAINING_ARTIFACT_CHUNK_BYTES", 4 * 1024 * 1024, 1024),
        consent_purpose=env.get("FALAJ_TRAINING_CONSENT_PURPOSE", "training").strip(),
    )
