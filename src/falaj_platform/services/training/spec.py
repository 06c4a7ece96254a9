"""Validation of a training job spec, and the plan a worker runs from it.

Everything that can be checked without the data is checked when the job is submitted,
so a bad spec is refused with INVALID_ARGUMENT (or FAILED_PRECONDITION for a device the
service does not have) instead of failing later in a worker. Defaults are applied here
and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from falaj.training.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from falaj_platform.services.training import names
from falaj_platform.services.training.config import TrainingConfig
from falaj_platform.services.training.plan import (
    BINARY,
    CLASSIFICATION_TASKS,
    MULTICLASS,
    REGRESSION,
    JobPlan,
    higher_is_better,
    metric_names,
)

MAX_CUSTOM_SOURCE_BYTES = 1024 * 1024
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(9, 22)
MAX_PROCESSES = 64

TASKS = {
    pb.TASK_TYPE_BINARY_CLASSIFICATION: BINARY,
    pb.TASK_TYPE_MULTICLASS_CLASSIFICATION: MULTICLASS,
    pb.TASK_TYPE_REGRESSION: REGRESSION,
}
TASK_VALUES = {name: value for value, name in TASKS.items()}
ALL_TASKS = tuple(TASKS)

FAMILIES: dict[int, tuple[str, str, str, tuple[int, ...]]] = {
    pb.MODEL_FAMILY_LINEAR_REGRESSION: (
        "LINEAR_REGRESSION",
        "Linear regression",
        "One linear layer trained with mean squared error on standardized targets. Settings: optimizer, learning rate, weight decay.",
        (pb.TASK_TYPE_REGRESSION,),
    ),
    pb.MODEL_FAMILY_LOGISTIC_REGRESSION: (
        "LOGISTIC_REGRESSION",
        "Logistic regression",
        "One linear layer with a sigmoid (binary) or softmax (multiclass) head, trained with cross-entropy. "
        "Settings: optimizer, learning rate, weight decay, balance_classes.",
        (pb.TASK_TYPE_BINARY_CLASSIFICATION, pb.TASK_TYPE_MULTICLASS_CLASSIFICATION),
    ),
    pb.MODEL_FAMILY_MLP: (
        "MLP",
        "Multi-layer perceptron",
        "Fully connected hidden layers for tabular classification and regression. "
        "Settings: hidden_sizes, activation, dropout, batch_norm, plus the optimizer settings.",
        ALL_TASKS,
    ),
    pb.MODEL_FAMILY_CUSTOM_MODULE: (
        "CUSTOM_MODULE",
        "Custom torch module",
        "A torch.nn.Module from user-supplied Python source; forward takes [batch, inputs] and returns logits or predictions. "
        "Runs in the service's worker processes: submitting one needs the custom-module permission.",
        ALL_TASKS,
    ),
}
OPTIMIZERS = {pb.OPTIMIZER_UNSPECIFIED: "ADAM", pb.OPTIMIZER_ADAM: "ADAM", pb.OPTIMIZER_ADAMW: "ADAMW", pb.OPTIMIZER_SGD: "SGD"}
ACTIVATIONS = {pb.ACTIVATION_UNSPECIFIED: "RELU", pb.ACTIVATION_RELU: "RELU", pb.ACTIVATION_GELU: "GELU", pb.ACTIVATION_TANH: "TANH"}
SPLITS = {
    pb.SPLIT_STRATEGY_UNSPECIFIED: "RANDOM",
    pb.SPLIT_STRATEGY_RANDOM: "RANDOM",
    pb.SPLIT_STRATEGY_STRATIFIED: "STRATIFIED",
    pb.SPLIT_STRATEGY_TIME: "TIME",
}
MISSING = {
    pb.MISSING_VALUE_POLICY_UNSPECIFIED: "IMPUTE_MEAN",
    pb.MISSING_VALUE_POLICY_IMPUTE_MEAN: "IMPUTE_MEAN",
    pb.MISSING_VALUE_POLICY_IMPUTE_ZERO: "IMPUTE_ZERO",
    pb.MISSING_VALUE_POLICY_FAIL: "FAIL",
}
DEFAULT_GATE_METRIC = {BINARY: "roc_auc", MULTICLASS: "accuracy", REGRESSION: "rmse"}


def model_families(task: int = pb.TASK_TYPE_UNSPECIFIED) -> list[pb.ModelFamilyInfo]:
    """The families the service trains, optionally only those supporting `task`."""
    return [
        pb.ModelFamilyInfo(
            family=family,  # type: ignore[arg-type]
            display_name=display,
            description=description,
            tasks=tasks,  # type: ignore[arg-type]
            supports_cuda=True,
            supports_distributed=True,
        )
        for family, (_, display, description, tasks) in FAMILIES.items()
        if task == pb.TASK_TYPE_UNSPECIFIED or task in tasks
    ]


@dataclass(frozen=True)
class DataSelection:
    """Which training set to fetch from the features service."""

    feature_service: str
    feature_references: tuple[str, ...]
    dataset_version: str
    event_timestamp_column: str
    start_time_unix: float | None
    end_time_unix: float | None
    label_column: str


@dataclass(frozen=True)
class Registration:
    """Where a successful job registers its model."""

    model: str
    description: str
    tags: dict[str, str]
    aliases: tuple[str, ...]
    require_gate_pass: bool


@dataclass(frozen=True)
class ResolvedSpec:
    plan: JobPlan
    data: DataSelection
    registration: Registration
    custom_module_sha256: str


def _invalid(message: str, field: str, reason: str = "INVALID_SPEC") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"field": field})


def _data(spec: pb.TrainingDataSpec) -> DataSelection:
    which = spec.WhichOneof("features")
    service, references = "", tuple[str, ...]()
    if which == "feature_service":
        service = spec.feature_service
        if not names.FEATURE_SERVICE_PATTERN.match(service):
            raise _invalid(f"feature_service {service!r} must be featureServices/{{feature_service}}", "spec.data.feature_service")
    elif which == "feature_list":
        references = tuple(spec.feature_list.references)
        if not references:
            raise _invalid("feature_list names no features", "spec.data.feature_list.references")
        bad = [ref for ref in references if not names.FEATURE_REFERENCE_PATTERN.match(ref)]
        if bad:
            raise _invalid(
                f"feature references must be {{feature_view}}:{{feature}}; not {', '.join(map(repr, bad))}", "spec.data.feature_list"
            )
        if len(set(references)) != len(references):
            raise _invalid("feature_list names a feature twice", "spec.data.feature_list.references")
    else:
        raise _invalid("spec.data needs a feature_service or a feature_list", "spec.data.features")
    frame = spec.entities
    if not names.DATASET_VERSION_PATTERN.match(frame.dataset_version):
        raise _invalid(
            f"entities.dataset_version {frame.dataset_version!r} must be datasets/{{dataset}}/versions/{{version}}",
            "spec.data.entities.dataset_version",
        )
    start = frame.start_time.ToNanoseconds() / 1e9 if frame.HasField("start_time") else None
    end = frame.end_time.ToNanoseconds() / 1e9 if frame.HasField("end_time") else None
    if start is not None and end is not None and start >= end:
        raise _invalid("entities.start_time must be before end_time", "spec.data.entities")
    if not spec.label_column.strip():
        raise _invalid("label_column is required", "spec.data.label_column")
    return DataSelection(service, references, frame.dataset_version, frame.event_timestamp_column, start, end, spec.label_column)


def _fraction(value: float, default: float, field: str) -> float:
    if not 0.0 <= value < 1.0:
        raise _invalid(f"{field.rsplit('.', 1)[-1]} must be in [0, 1); got {value}", field)
    return value or default


def resolve_spec(
    spec: pb.TrainingJobSpec, *, job_id: str, seed: int, config: TrainingConfig, cuda_devices: Callable[[], int], caller: str
) -> ResolvedSpec:
    """Validate `spec` and apply every default; `seed` replaces a spec seed of 0."""
    data = _data(spec.data)
    task = TASKS.get(spec.task)
    if task is None:
        raise _invalid("spec.task is required", "spec.task")
    family_info = FAMILIES.get(spec.model.family)
    if family_info is None:
        raise _invalid("spec.model.family is required", "spec.model.family")
    family, display, _, tasks = family_info
    if spec.task not in tasks:
        raise _invalid(f"{display} does not support {pb.TaskType.Name(spec.task)}", "spec.model.family", "FAMILY_TASK_MISMATCH")
    config_kind = spec.model.WhichOneof("config")
    if config_kind == "mlp" and family != "MLP":
        raise _invalid("an mlp config needs MODEL_FAMILY_MLP", "spec.model.mlp")
    if config_kind == "custom_module" and family != "CUSTOM_MODULE":
        raise _invalid("a custom_module config needs MODEL_FAMILY_CUSTOM_MODULE", "spec.model.custom_module")
    mlp = spec.model.mlp
    hidden = tuple(mlp.hidden_sizes) or (64, 32)
    if any(size < 1 or size > 65536 for size in hidden) or len(hidden) > 32:
        raise _invalid("mlp.hidden_sizes must be 1-32 layers of 1-65536 units", "spec.model.mlp.hidden_sizes")
    if not 0.0 <= mlp.dropout < 1.0:
        raise _invalid("mlp.dropout must be in [0, 1)", "spec.model.mlp.dropout")
    custom = spec.model.custom_module
    custom_kwargs: dict[str, object] = {}
    custom_sha = ""
    if family == "CUSTOM_MODULE":
        if "*" not in config.custom_module_submitters and caller not in config.custom_module_submitters:
            raise PermissionDenied(
                f"{caller or 'this caller'} may not submit custom torch modules (they run inside the training service); "
                "ask an operator to add you to FALAJ_TRAINING_CUSTOM_MODULE_SUBMITTERS",
                reason="CUSTOM_MODULE_NOT_ALLOWED",
            )
        source_bytes = custom.module_source.encode()
        if not source_bytes or len(source_bytes) > MAX_CUSTOM_SOURCE_BYTES:
            raise _invalid("custom_module.module_source must be 1 byte to 1 MiB of Python", "spec.model.custom_module.module_source")
        if not custom.class_name.isidentifier():
            raise _invalid("custom_module.class_name must be a Python class name", "spec.model.custom_module.class_name")
        if custom.init_kwargs_json.strip():
            try:
                parsed = json.loads(custom.init_kwargs_json)
            except json.JSONDecodeError as error:
                raise _invalid(
                    f"custom_module.init_kwargs_json is not JSON: {error.msg}", "spec.model.custom_module.init_kwargs_json"
                ) from None
            if not isinstance(parsed, dict):
                raise _invalid("custom_module.init_kwargs_json must be a JSON object", "spec.model.custom_module.init_kwargs_json")
            custom_kwargs = parsed
        custom_sha = hashlib.sha256(source_bytes).hexdigest()
    hp = spec.hyperparameters
    if not 0.0 <= hp.learning_rate <= 10.0:
        raise _invalid("learning_rate must be in [0, 10]", "spec.hyperparameters.learning_rate")
    if not 0 <= hp.epochs <= 100_000:
        raise _invalid("epochs must be in [0, 100000]", "spec.hyperparameters.epochs")
    if not 0 <= hp.batch_size <= 1_000_000:
        raise _invalid("batch_size must be in [0, 1000000]", "spec.hyperparameters.batch_size")
    if hp.weight_decay < 0 or not 0.0 <= hp.momentum < 1.0:
        raise _invalid("weight_decay must be >= 0 and momentum in [0, 1)", "spec.hyperparameters")
    if hp.balance_classes and task == REGRESSION:
        raise _invalid("balance_classes applies to classification only", "spec.hyperparameters.balance_classes")
    stop_metric = hp.early_stopping.metric if hp.HasField("early_stopping") else ""
    if stop_metric and stop_metric != "loss" and stop_metric not in metric_names(task):
        raise _invalid(
            f"early_stopping.metric {stop_metric!r} is not 'loss' or one of {', '.join(metric_names(task))}",
            "spec.hyperparameters.early_stopping.metric",
        )
    if stop_metric and hp.early_stopping.patience < 1:
        raise _invalid("early_stopping.patience must be at least 1", "spec.hyperparameters.early_stopping.patience")
    if spec.seed < 0:
        raise _invalid("seed must not be negative", "spec.seed")
    resources = spec.resources
    device = "cuda" if resources.device == pb.DEVICE_TYPE_CUDA else "cpu"
    processes = resources.processes_per_node or 1
    if not 1 <= processes <= MAX_PROCESSES:
        raise _invalid(f"processes_per_node must be in [1, {MAX_PROCESSES}]", "spec.resources.processes_per_node")
    if not 0 <= resources.cpu_threads_per_process <= 256:
        raise _invalid("cpu_threads_per_process must be in [0, 256]", "spec.resources.cpu_threads_per_process")
    distributed = resources.distributed
    backend = {pb.DISTRIBUTED_BACKEND_GLOO: "gloo", pb.DISTRIBUTED_BACKEND_NCCL: "nccl"}.get(
        distributed.backend, "nccl" if device == "cuda" else "gloo"
    )
    if backend == "nccl" and device != "cuda":
        raise _invalid("the NCCL backend needs DEVICE_TYPE_CUDA; use gloo on CPU", "spec.resources.distributed.backend")
    nodes = distributed.num_nodes or 1
    if nodes < 1 or nodes > 1024:
        raise _invalid("distributed.num_nodes must be in [1, 1024]", "spec.resources.distributed.num_nodes")
    if nodes > 1 and ":" not in distributed.rendezvous_endpoint:
        raise _invalid("a multi-node job needs distributed.rendezvous_endpoint host:port", "spec.resources.distributed.rendezvous_endpoint")
    if not 0 <= distributed.max_restarts <= 10:
        raise _invalid("distributed.max_restarts must be in [0, 10]", "spec.resources.distributed.max_restarts")
    if device == "cuda":
        gpus = cuda_devices()
        if gpus == 0:
            raise FailedPrecondition(
                "the job asks for CUDA but the training service has no CUDA device; use DEVICE_TYPE_CPU", reason="CUDA_UNAVAILABLE"
            )
        if processes > gpus:
            raise FailedPrecondition(
                f"processes_per_node={processes} needs {processes} GPUs; the training service has {gpus}", reason="NOT_ENOUGH_GPUS"
            )
    split = spec.data.split
    strategy = SPLITS[split.strategy]
    if strategy == "STRATIFIED" and task not in CLASSIFICATION_TASKS:
        raise _invalid("a stratified split needs a classification task", "spec.data.split.strategy")
    validation = _fraction(split.validation_fraction, 0.1, "spec.data.split.validation_fraction")
    holdout = _fraction(split.holdout_fraction, 0.2, "spec.data.split.holdout_fraction")
    if validation + holdout > 0.9:
        raise _invalid("validation_fraction + holdout_fraction must leave at least 10% for training", "spec.data.split")
    evaluation = spec.evaluation
    threshold = evaluation.classification_threshold or 0.5
    if not 0.0 < threshold < 1.0:
        raise _invalid("classification_threshold must be in (0, 1)", "spec.evaluation.classification_threshold")
    gate = evaluation.gate
    gate_metric = gate.metric or DEFAULT_GATE_METRIC[task]
    if gate_metric not in metric_names(task):
        raise _invalid(f"gate.metric {gate_metric!r} is not one of {', '.join(metric_names(task))}", "spec.evaluation.gate.metric")
    gate_alias = names.check_alias(gate.baseline_alias or "production", "spec.evaluation.gate.baseline_alias")
    higher = {pb.METRIC_DIRECTION_HIGHER_IS_BETTER: True, pb.METRIC_DIRECTION_LOWER_IS_BETTER: False}.get(
        gate.direction, higher_is_better(gate_metric)
    )
    export = spec.export
    opset = export.opset_version or DEFAULT_OPSET
    if opset not in SUPPORTED_OPSETS:
        raise _invalid(f"opset_version must be in [{SUPPORTED_OPSETS.start}, {SUPPORTED_OPSETS.stop - 1}]", "spec.export.opset_version")
    if export.parity_atol < 0 or export.parity_rtol < 0 or export.parity_rows < 0:
        raise _invalid("parity tolerances and rows must not be negative", "spec.export")
    registration = spec.registration
    model = names.model_id_of(registration.registered_model, "spec.registration.registered_model") if registration.registered_model else ""
    if not model:
        raise _invalid("registration.registered_model is required (models/{model})", "spec.registration.registered_model")
    names.check_id(model, "registered model", "spec.registration.registered_model")
    aliases = tuple(names.check_alias(alias, "spec.registration.aliases") for alias in registration.aliases)
    protected = sorted(set(aliases) & config.protected_aliases)
    if protected:
        raise FailedPrecondition(
            f"alias {protected[0]!r} is protected: it moves only through an approved promotion request", reason="PROTECTED_ALIAS"
        )
    if len(set(aliases)) != len(aliases):
        raise _invalid("registration.aliases names an alias twice", "spec.registration.aliases")
    timeout = spec.timeout.ToTimedelta().total_seconds() if spec.HasField("timeout") else config.default_timeout_seconds
    if timeout <= 0:
        raise _invalid("timeout must be positive", "spec.timeout")
    plan = JobPlan(
        job_id=job_id,
        task=task,
        family=family,
        hidden_sizes=hidden,
        activation=ACTIVATIONS[mlp.activation],
        dropout=mlp.dropout,
        batch_norm=mlp.batch_norm,
        custom_source=custom.module_source if family == "CUSTOM_MODULE" else "",
        custom_class=custom.class_name if family == "CUSTOM_MODULE" else "",
        custom_kwargs=custom_kwargs,
        optimizer=OPTIMIZERS[hp.optimizer],
        learning_rate=hp.learning_rate or 1e-3,
        epochs=hp.epochs or 10,
        batch_size=hp.batch_size or 256,
        weight_decay=hp.weight_decay,
        momentum=hp.momentum,
        balance_classes=hp.balance_classes,
        early_stopping_metric=stop_metric,
        early_stopping_patience=hp.early_stopping.patience,
        early_stopping_min_delta=hp.early_stopping.min_delta,
        seed=spec.seed or seed,
        device=device,
        processes_per_node=processes,
        num_nodes=nodes,
        cpu_threads=resources.cpu_threads_per_process or config.default_cpu_threads,
        backend=backend,
        rendezvous_endpoint=distributed.rendezvous_endpoint,
        rendezvous_id=distributed.rendezvous_id or job_id,
        max_restarts=distributed.max_restarts,
        split_strategy=strategy,
        validation_fraction=validation,
        holdout_fraction=holdout,
        standardize=spec.data.preprocessing.standardize_numeric,
        missing_values=MISSING[spec.data.preprocessing.missing_values],
        label_column=data.label_column,
        timestamp_column=data.event_timestamp_column,
        threshold=threshold,
        gate_alias=gate_alias,
        gate_metric=gate_metric,
        gate_min_improvement=gate.min_improvement,
        gate_higher_is_better=higher,
        opset=opset,
        parity_atol=export.parity_atol or 1e-5,
        parity_rtol=export.parity_rtol or 1e-4,
        parity_rows=export.parity_rows or 10_000,
        timeout_seconds=timeout,
    )
    return ResolvedSpec(
        plan=plan,
        data=data,
        registration=Registration(model, registration.description, dict(registration.tags), aliases, registration.require_gate_pass),
        custom_module_sha256=custom_sha,
    )
