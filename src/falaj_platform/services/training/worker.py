"""The worker process of a training job: prepare, train, evaluate, gate, export, check parity.

Run by the service's job runner, one process per job (or one per rank under torchrun):

    python -m falaj_platform.services.training.worker --job-dir DIR
    python -m falaj_platform.services.training.worker --wait      # job dir on stdin

`--wait` starts ahead of time with torch imported and reads the job directory from
stdin, so a job does not wait for the interpreter. The directory holds `plan.json`
(`JobPlan`), `data.arrow` (the training set as fetched from the features service) and,
when the promotion gate has a baseline, `baseline.onnx`. The worker writes `model.onnx`
and `result.json` there and reports progress as JSON lines on stdout, each prefixed
with `EVENT_PREFIX`. It never touches the service's database or key material.

Seeds, deterministic algorithms and a fixed thread count make the same plan on the
same data give the same metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from falaj_platform.services.training import metrics as mx
from falaj_platform.services.training.models import Preprocessor, ServingModel, build_core
from falaj_platform.services.training.plan import (
    BINARY,
    CLASSIFICATION_TASKS,
    EVENT_PREFIX,
    INPUT_NAME,
    MULTICLASS,
    OUTPUT_NAMES,
    REGRESSION,
    JobFailed,
    JobPlan,
)
from falaj_platform.services.training.trainer import EpochReport, TrainingTensors, fit

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "pyarrow", "falaj-platform")

Emit = Callable[[dict[str, Any]], None]


def emit_stdout(event: dict[str, Any]) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def phase_event(phase: str, message: str) -> dict[str, Any]:
    return {"type": "progress", "progress": {"phase": f"TRAINING_PHASE_{phase}", "message": message, "time": now_rfc3339()}}


# -- data -------------------------------------------------------------------------------


@dataclass
class Columns:
    """The training set as arrays: raw features `[n, F]` (NaN for missing), labels, timestamps."""

    features: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray | None


def read_columns(path: Path, plan: JobPlan) -> Columns:
    """Read `data.arrow` (an Arrow IPC file) into arrays in the plan's feature order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc

    with pa.memory_map(str(path)) as source:
        table = pyarrow.ipc.open_file(source).read_all()
    features = np.empty((table.num_rows, len(plan.feature_references)), dtype=np.float64)
    for position, reference in enumerate(plan.feature_references):
        column = table.column(reference)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
            raise JobFailed(
                "TRAINING_ERROR",
                f"feature {reference} is of type {column.type}; only numeric and boolean features can be model inputs "
                "(encode categories as numbers in the feature view)",
            )
        features[:, position] = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    label = table.column(plan.label_column)
    if label.null_count:
        raise JobFailed("INVALID_LABELS", f"label column {plan.label_column!r} has {label.null_count} null values")
    timestamps = None
    if plan.timestamp_column and plan.timestamp_column in table.column_names:
        stamps = table.column(plan.timestamp_column)
        timestamps = pc.cast(stamps, pa.int64()).to_numpy(zero_copy_only=False) if pa.types.is_timestamp(stamps.type) else None
    return Columns(features, label.to_numpy(zero_copy_only=False), timestamps)


def encode_labels(task: str, raw: np.ndarray, label_column: str) -> tuple[np.ndarray, list[str]]:
    """Class indices and class labels (classification) or float targets (regression)."""
    if task == REGRESSION:
        try:
            targets = raw.astype(np.float64)
        except (TypeError, ValueError):
            raise JobFailed("INVALID_LABELS", f"label column {label_column!r} is not numeric; a regression needs numbers") from None
        bad = int(np.count_nonzero(~np.isfinite(targets)))
        if bad:
            raise JobFailed("INVALID_LABELS", f"label column {label_column!r} has {bad} NaN or infinite values")
        return targets, []
    if raw.dtype.kind == "f" and np.isnan(raw).any():
        raise JobFailed("INVALID_LABELS", f"label column {label_column!r} has {int(np.isnan(raw).sum())} NaN values")
    classes, indices = np.unique(raw, return_inverse=True)
    labels = [str(int(c)) if isinstance(c, float | np.floating) and float(c).is_integer() else str(c) for c in classes.tolist()]
    if task == BINARY and len(classes) != 2:
        raise JobFailed("INVALID_LABELS", f"binary classification needs exactly 2 classes in {label_column!r}; found {len(classes)}")
    if task == MULTICLASS and len(classes) < 3:
        raise JobFailed(
            "INVALID_LABELS",
            f"multiclass classification needs at least 3 classes in {label_column!r}; found {len(classes)} (use binary classification)",
        )
    return indices.astype(np.int64), labels


def split_rows(plan: JobPlan, rows: int, classes: np.ndarray | None, timestamps: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Row indices of the training, validation and held-out splits."""
    holdout = max(1, round(rows * plan.holdout_fraction))
    validation = max(1, round(rows * plan.validation_fraction))
    if rows - holdout - validation < 2:
        raise JobFailed(
            "INSUFFICIENT_DATA", f"{rows} rows cannot be split into training, validation ({validation}) and held-out ({holdout}) rows"
        )
    rng = np.random.default_rng(plan.seed)
    if plan.split_strategy == "TIME":
        if timestamps is None:
            raise JobFailed("INSUFFICIENT_DATA", f"a time split needs the timestamp column {plan.timestamp_column!r} in the training set")
        order = np.argsort(timestamps, kind="stable")
        return order[: rows - holdout - validation], order[rows - holdout - validation : rows - holdout], order[rows - holdout :]
    if plan.split_strategy == "STRATIFIED" and classes is not None:
        parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        for value in np.unique(classes):
            members = rng.permutation(np.flatnonzero(classes == value))
            held = round(len(members) * plan.holdout_fraction)
            valid = round(len(members) * plan.validation_fraction)
            parts[2].append(members[:held])
            parts[1].append(members[held : held + valid])
            parts[0].append(members[held + valid :])
        train, val, hold = (np.sort(np.concatenate(p)) for p in parts)
        if len(val) and len(hold) and len(train) >= 2:
            return train, val, hold
        # Too few rows per class for every split to get some: fall back to a random split.
    order = rng.permutation(rows)
    return order[holdout + validation :], order[holdout : holdout + validation], order[:holdout]


def fit_preprocessing(plan: JobPlan, x_train: np.ndarray) -> Preprocessor:
    missing = np.isnan(x_train)
    if plan.missing_values == "FAIL" and missing.any():
        counts = missing.sum(axis=0)
        worst = int(np.argmax(counts))
        raise JobFailed(
            "TRAINING_ERROR",
            f"feature {plan.feature_references[worst]} has {int(counts[worst])} missing values and the spec says to fail on missing values",
        )
    if plan.missing_values == "IMPUTE_ZERO":
        fill = np.zeros(x_train.shape[1])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-missing columns: mean of nothing
            fill = np.nan_to_num(np.nanmean(x_train, axis=0), nan=0.0)
    filled = np.where(missing, fill, x_train)
    mean = filled.mean(axis=0)
    scale = filled.std(axis=0)
    scale[scale == 0] = 1.0
    return Preprocessor(torch.from_numpy(fill), torch.from_numpy(mean), torch.from_numpy(scale), plan.standardize)


# -- evaluation, gate, export, parity ---------------------------------------------------


def served(serving: ServingModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return serving(torch.from_numpy(x.astype(np.float32))).double().numpy()


def served_metrics(task: str, actual: np.ndarray, output: np.ndarray, threshold: float) -> dict[str, Any]:
    """Metrics of a model's served output (probability, probabilities or prediction)."""
    if task == REGRESSION:
        return mx.regression_metrics(actual, output.reshape(-1))
    if task == BINARY:
        positive = output.reshape(len(actual), -1)
        positive = positive[:, -1] if positive.shape[1] == 2 else positive[:, 0]
        return mx.classification_metrics(actual, mx.binary_probabilities(positive), threshold)
    return mx.classification_metrics(actual, output, threshold)


def evaluation_result(task: str, actual: np.ndarray, output: np.ndarray, threshold: float, class_labels: list[str]) -> dict[str, Any]:
    found = served_metrics(task, actual, output, threshold)
    if task == REGRESSION:
        return {"rows": len(actual), "regression": found}
    matrix = found.pop("confusion_matrix")
    return {"rows": len(actual), "classification": {**found, "class_labels": class_labels, "confusion_matrix": matrix.reshape(-1).tolist()}}


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    values = evaluation.get("classification") or evaluation.get("regression") or {}
    return {name: float(value) for name, value in values.items() if isinstance(value, float | int) and not isinstance(value, bool)}


def evaluate_gate(plan: JobPlan, work: Path, x_hold: np.ndarray, y_hold: np.ndarray, candidate: dict[str, float]) -> dict[str, Any]:
    """Compare the candidate with the version behind the gate's alias on the same held-out rows."""
    metric = plan.gate_metric
    result: dict[str, Any] = {
        "metric": metric,
        "candidate_value": candidate.get(metric, math.nan),
        "min_improvement": plan.gate_min_improvement,
    }
    if not plan.baseline_model_version:
        return {**result, "passed": True, "reason": f"no version is behind alias {plan.gate_alias!r}; the gate passes"}
    result["baseline_model_version"] = plan.baseline_model_version
    baseline_value: float | None = None
    how = ""
    baseline_path = work / "baseline.onnx"
    if baseline_path.exists() and tuple(plan.baseline_feature_references) == tuple(plan.feature_references):
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(baseline_path), providers=["CPUExecutionProvider"])
            output = session.run(None, {session.get_inputs()[0].name: x_hold.astype(np.float32)})[0]
            baseline_value = float(served_metrics(plan.task, y_hold, np.asarray(output, dtype=np.float64), plan.threshold)[metric])
            how = "on the same held-out rows"
        except Exception as error:  # noqa: BLE001 - any failure of the baseline falls back to its recorded metric
            how = f"the baseline does not run on these rows ({type(error).__name__})"
    if baseline_value is None and metric in plan.baseline_metrics:
        baseline_value = float(plan.baseline_metrics[metric])
        how = "its recorded value: the baseline has other inputs" if not how else how + "; its recorded value"
    if baseline_value is None:
        return {**result, "passed": False, "reason": f"{plan.baseline_model_version} has no comparable {metric}; the gate fails"}
    value = float(result["candidate_value"])
    improvement = value - baseline_value if plan.gate_higher_is_better else baseline_value - value
    passed = bool(improvement >= plan.gate_min_improvement)
    return {
        **result,
        "baseline_value": baseline_value,
        "passed": passed,
        "reason": f"{metric} {value:.6g} vs {baseline_value:.6g} ({how}): {improvement:+.6g} "
        f"{'>=' if passed else '<'} {plan.gate_min_improvement:+.6g}",
    }


def export_onnx(serving: ServingModel, example: np.ndarray, plan: JobPlan) -> bytes:
    output = OUTPUT_NAMES[plan.task]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
            torch.onnx.export(
                serving,
                (torch.from_numpy(example.astype(np.float32)),),
                buffer,  # type: ignore[arg-type]
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[output],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
                opset_version=plan.opset,
            )
    except Exception as error:  # noqa: BLE001 - any exporter failure fails the job with its message
        raise JobFailed("EXPORT_FAILED", f"torch.onnx.export failed: {type(error).__name__}: {error}") from None
    return buffer.getvalue()


def check_parity(serving: ServingModel, onnx_bytes: bytes, x: np.ndarray, atol: float, rtol: float, output_name: str) -> dict[str, Any]:
    """ONNX Runtime vs torch on the same rows, with numpy.allclose semantics."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    inputs = x.astype(np.float32)
    runtime = np.asarray(session.run(None, {INPUT_NAME: inputs})[0], dtype=np.float64)
    with torch.no_grad():
        expected = serving(torch.from_numpy(inputs)).double().numpy()
    if runtime.shape != expected.shape:
        difference = np.full(expected.shape, np.inf)
    else:
        difference = np.abs(runtime - expected)
    within = np.isclose(runtime, expected, atol=atol, rtol=rtol) if runtime.shape == expected.shape else np.zeros(expected.shape, bool)
    mismatched = int(np.count_nonzero(~within))
    relative = difference / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
    return {
        "passed": mismatched == 0,
        "rows_checked": len(x),
        "atol": atol,
        "rtol": rtol,
        "outputs": [
            {
                "output_name": output_name,
                "max_abs_diff": float(difference.max()) if difference.size else 0.0,
                "max_rel_diff": float(relative.max()) if relative.size else 0.0,
                "mismatched_elements": mismatched,
            }
        ],
        "execution_provider": session.get_providers()[0],
    }


def signature(plan: JobPlan, class_labels: list[str]) -> dict[str, Any]:
    width = len(plan.feature_references)
    outputs = {
        BINARY: {"shape": [-1], "description": f"probability of class {class_labels[-1] if class_labels else ''}"},
        MULTICLASS: {"shape": [-1, len(class_labels)], "description": "class probabilities, in class_labels order"},
        REGRESSION: {"shape": [-1], "description": f"predicted {plan.label_column}"},
    }[plan.task]
    return {
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "TENSOR_DATA_TYPE_FLOAT32",
                "shape": [-1, width],
                "feature_references": list(plan.feature_references),
                "description": "raw feature values in this order; NaN for a missing value",
            }
        ],
        "outputs": [{"name": OUTPUT_NAMES[plan.task], "dtype": "TENSOR_DATA_TYPE_FLOAT32", **outputs}],
        "class_labels": class_labels,
    }


def environment(plan: JobPlan, world_size: int, device: torch.device) -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    devices = [torch.cuda.get_device_name(device)] if device.type == "cuda" else ["cpu"]
    return {
        "python_version": platform.python_version(),
        "package_versions": versions,
        "cuda_version": (torch.version.cuda or "") if device.type == "cuda" else "",
        "devices": devices,
        "seed": plan.seed,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "world_size": world_size,
        "service_version": versions.get("falaj-platform", ""),
    }


# -- the job ----------------------------------------------------------------------------


def make_deterministic(plan: JobPlan, device: torch.device) -> None:
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic results (read when CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(plan.cpu_threads)
    torch.use_deterministic_algorithms(True)
    random.seed(plan.seed)
    np.random.seed(plan.seed % 2**32)
    torch.manual_seed(plan.seed)


def choose_device(plan: JobPlan, local_rank: int) -> torch.device:
    if plan.device == "cuda":
        if not torch.cuda.is_available():
            raise JobFailed("RESOURCES_UNAVAILABLE", "the job asks for CUDA but this worker has no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise JobFailed(
                "RESOURCES_UNAVAILABLE", f"process {local_rank} needs GPU {local_rank}; only {torch.cuda.device_count()} present"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def prepare_tensors(
    plan: JobPlan, columns: Columns, y: np.ndarray, class_labels: list[str], splits: tuple[np.ndarray, ...]
) -> tuple[TrainingTensors, Preprocessor]:
    train, val, _ = splits
    preprocessor = fit_preprocessing(plan, columns.features[train])
    with torch.no_grad():
        x_train = preprocessor(torch.from_numpy(columns.features[train]).float())
        x_val = preprocessor(torch.from_numpy(columns.features[val]).float())
    tensors = TrainingTensors(x_train, torch.empty(0), x_val, torch.empty(0), num_classes=len(class_labels))
    if plan.task == REGRESSION:
        mean, scale = float(y[train].mean()), float(y[train].std()) or 1.0
        tensors.y_train = torch.from_numpy((y[train] - mean) / scale).float()
        tensors.y_validation = torch.from_numpy((y[val] - mean) / scale).float()
        tensors.target_mean, tensors.target_scale = mean, scale
    else:
        dtype = torch.long if plan.task == MULTICLASS else torch.float32
        tensors.y_train = torch.from_numpy(y[train]).to(dtype)
        tensors.y_validation = torch.from_numpy(y[val]).to(dtype)
        if plan.balance_classes:
            counts = np.bincount(y[train], minlength=len(class_labels)).astype(np.float64)
            weights = len(train) / (len(class_labels) * np.maximum(counts, 1.0))
            tensors.class_weights = torch.from_numpy(weights).float()
    return tensors, preprocessor


def run_job(plan: JobPlan, columns: Columns, work: Path, emit: Emit, *, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
    """Everything a worker does for one job; rank 0 writes model.onnx and result.json."""
    leader = rank == 0
    report = emit if leader else (lambda _event: None)
    device = choose_device(plan, local_rank)
    make_deterministic(plan, device)
    emit(
        {"type": "worker", "rank": rank, "local_rank": local_rank, "node": socket.gethostname(), "device": str(device), "state": "RUNNING"}
    )
    y, class_labels = encode_labels(plan.task, columns.labels, plan.label_column)
    splits = split_rows(plan, len(y), y if plan.task in CLASSIFICATION_TASKS else None, columns.timestamps)
    train, val, hold = splits
    tensors, preprocessor = prepare_tensors(plan, columns, y, class_labels, splits)
    core = build_core(plan, len(plan.feature_references), len(class_labels))
    report(phase_event("TRAINING", f"training on {len(train)} rows, validating on {len(val)}, {len(hold)} held out"))

    def on_epoch(epoch: EpochReport) -> None:
        progress = {
            "phase": "TRAINING_PHASE_TRAINING",
            "epoch": epoch.epoch,
            "total_epochs": epoch.total_epochs,
            "step": epoch.step,
            "train_loss": epoch.train_loss,
            "validation_loss": epoch.validation_loss,
            "metrics": epoch.metrics,
            "samples_per_second": epoch.samples_per_second,
            "message": epoch.message,
            "time": now_rfc3339(),
        }
        report({"type": "progress", "progress": progress})

    try:
        fitted = fit(core, tensors, plan, device=device, rank=rank, world_size=world_size, report=on_epoch)
    except JobFailed:
        raise
    except Exception as error:  # noqa: BLE001 - the model's own code can raise anything
        raise JobFailed("TRAINING_ERROR", f"training raised {type(error).__name__}: {error}", rank=rank) from None
    if world_size > 1:
        dist.barrier()
    if not leader:
        emit(
            {
                "type": "worker",
                "rank": rank,
                "local_rank": local_rank,
                "node": socket.gethostname(),
                "device": str(device),
                "state": "EXITED",
            }
        )
        return
    serving = ServingModel(preprocessor, core.cpu().eval(), plan.task, tensors.target_mean, tensors.target_scale).eval()
    x_hold, y_hold = columns.features[hold], y[hold]
    report(phase_event("EVALUATING", f"evaluating on {len(hold)} held-out rows"))
    evaluation = evaluation_result(plan.task, y_hold, served(serving, x_hold), plan.threshold, class_labels)
    candidate = flat_metrics(evaluation)
    gate = evaluate_gate(plan, work, x_hold, y_hold, candidate)
    report(phase_event("EXPORTING", f"exporting to ONNX opset {plan.opset}"))
    onnx_bytes = export_onnx(serving, x_hold[: min(len(x_hold), 2)], plan)
    report(phase_event("CHECKING_PARITY", "comparing ONNX Runtime with torch on held-out rows"))
    parity_rows = x_hold[: plan.parity_rows] if plan.parity_rows > 0 else x_hold[:10_000]
    parity = check_parity(serving, onnx_bytes, parity_rows, plan.parity_atol, plan.parity_rtol, OUTPUT_NAMES[plan.task])
    export = {
        "opset_version": plan.opset,
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "size_bytes": len(onnx_bytes),
        "parity": parity,
    }
    result = {
        "signature": signature(plan, class_labels),
        "evaluation": evaluation,
        "metrics": candidate,
        "gate_result": gate,
        "export_result": export,
        "environment": environment(plan, world_size, device),
        "split_rows": {"train_rows": len(train), "validation_rows": len(val), "holdout_rows": len(hold)},
        "training": {"epochs_run": fitted.epochs_run, "best_epoch": fitted.best_epoch, "seconds": fitted.training_seconds},
    }
    (work / "model.onnx").write_bytes(onnx_bytes)
    (work / "result.json").write_text(json.dumps(result))
    if not parity["passed"]:
        worst = parity["outputs"][0]
        raise JobFailed(
            "PARITY_FAILED",
            f"ONNX Runtime differs from torch on {worst['mismatched_elements']} of {len(parity_rows)} held-out outputs "
            f"(max abs diff {worst['max_abs_diff']:.3g}, atol {plan.parity_atol:g}, rtol {plan.parity_rtol:g}); the version is not registered",
            phase="TRAINING_PHASE_CHECKING_PARITY",
        )
    emit({"type": "worker", "rank": rank, "local_rank": local_rank, "node": socket.gethostname(), "device": str(device), "state": "EXITED"})
    emit({"type": "result"})


def run_job_dir(work: Path, emit: Emit = emit_stdout) -> int:
    """Run the job in `work`; returns the process exit code (0 on success)."""
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun for distributed jobs
    try:
        plan = JobPlan.from_json((work / "plan.json").read_text())
        world_size = plan.world_size
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world_size > 1:
            backend = "nccl" if plan.device == "cuda" else plan.backend
            dist.init_process_group(backend=backend)
        try:
            columns = read_columns(work / "data.arrow", plan)
            run_job(plan, columns, work, emit, rank=rank, world_size=world_size, local_rank=local_rank)
        finally:
            if world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
    except JobFailed as failure:
        emit({"type": "failed", "reason": failure.reason, "message": failure.message, "phase": failure.phase, "rank": rank})
        return 3
    except Exception as error:  # noqa: BLE001 - reported to the service, which logs it under the job id
        traceback.print_exc(file=sys.stderr)
        emit({"type": "failed", "reason": "INTERNAL", "message": f"{type(error).__name__}: {error}", "phase": "", "rank": rank})
        return 4
    return 0


def watch_supervisor(pid: int, interval: float = 1.0) -> None:
    """Exit when the service that started this worker is gone, so no worker outlives it."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(70)
            except PermissionError:
                continue

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path)
    parser.add_argument("--wait", action="store_true", help="start now, read the job directory from stdin")
    parser.add_argument("--supervisor-pid", type=int, default=0, help="exit when this process (the service) ends")
    args = parser.parse_args(argv)
    if args.supervisor_pid:
        watch_supervisor(args.supervisor_pid)
    preload()
    if args.wait:
        line = sys.stdin.readline().strip()
        if not line:
            return 0  # the service stopped before handing over a job
        return run_job_dir(Path(line))
    if args.job_dir is None:
        parser.error("--job-dir or --wait is required")
    return run_job_dir(args.job_dir)


def preload() -> None:
    """Load what every job needs before it arrives (a waiting worker then starts at once)."""
    import onnxruntime  # noqa: F401
    import pyarrow.compute
    import pyarrow.ipc  # noqa: F401
    import torch.onnx

    # The first call imports torch's compiler stack (seconds); every job sets it anyway.
    torch.use_deterministic_algorithms(True)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (torch's takes about a second): everything is written.
    os._exit(code)
