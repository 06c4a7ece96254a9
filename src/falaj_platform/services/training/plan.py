"""What a worker process is told to do: the resolved job plan, and how a job fails.

`JobPlan` is the validated spec with every default applied, plus what the service
learned before launching the worker (feature order, label and timestamp columns, the
baseline of the promotion gate). It travels to the worker as JSON, so this module
imports nothing beyond the standard library: workers, the service and benchmarks share
it without pulling in gRPC or SQLAlchemy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

BINARY = "BINARY_CLASSIFICATION"
MULTICLASS = "MULTICLASS_CLASSIFICATION"
REGRESSION = "REGRESSION"
CLASSIFICATION_TASKS = (BINARY, MULTICLASS)

CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae", "loss"})

EVENT_PREFIX = "@falaj-event "
"""Prefix of a worker's progress lines on stdout (anything else there is ignored)."""

INPUT_NAME = "features"
OUTPUT_NAMES = {BINARY: "probability", MULTICLASS: "probabilities", REGRESSION: "prediction"}


def metric_names(task: str) -> tuple[str, ...]:
    return REGRESSION_METRICS if task == REGRESSION else CLASSIFICATION_METRICS


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


class JobFailed(Exception):
    """A job cannot go on; `reason` is a `FailureReason` name without its prefix."""

    def __init__(self, reason: str, message: str, *, phase: str = "", rank: int = -1):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.phase = phase
        self.rank = rank


@dataclass(frozen=True)
class JobPlan:
    """A training job as the worker runs it; every field has its final value."""

    job_id: str
    task: str
    family: str
    # MLP
    hidden_sizes: tuple[int, ...] = (64, 32)
    activation: str = "RELU"
    dropout: float = 0.0
    batch_norm: bool = False
    # Custom module
    custom_source: str = ""
    custom_class: str = ""
    custom_kwargs: dict[str, Any] = field(default_factory=dict)
    # Loop
    optimizer: str = "ADAM"
    learning_rate: float = 1e-3
    epochs: int = 10
    batch_size: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.0
    balance_classes: bool = False
    early_stopping_metric: str = ""
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    # Resources
    device: str = "cpu"
    processes_per_node: int = 1
    num_nodes: int = 1
    cpu_threads: int = 1
    backend: str = "gloo"
    rendezvous_endpoint: str = ""
    rendezvous_id: str = ""
    max_restarts: int = 0
    # Data
    split_strategy: str = "RANDOM"
    validation_fraction: float = 0.1
    holdout_fraction: float = 0.2
    standardize: bool = False
    missing_values: str = "IMPUTE_MEAN"
    feature_references: tuple[str, ...] = ()
    label_column: str = ""
    timestamp_column: str = ""
    # Evaluation and gate
    threshold: float = 0.5
    gate_alias: str = "production"
    gate_metric: str = ""
    gate_min_improvement: float = 0.0
    gate_higher_is_better: bool = True
    baseline_model_version: str = ""
    baseline_feature_references: tuple[str, ...] = ()
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    # Export
    opset: int = 17
    parity_atol: float = 1e-5
    parity_rtol: float = 1e-4
    parity_rows: int = 10_000
    timeout_seconds: float = 24 * 3600.0

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.num_nodes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobPlan:
        raw = json.loads(text)
        for name in ("hidden_sizes", "feature_references", "baseline_feature_references"):
            raw[name] = tuple(raw.get(name, ()))
        return cls(**raw)
