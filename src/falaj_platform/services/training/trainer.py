"""The training loop: mini-batch optimization, validation after each epoch, early stopping.

One loop serves single-process and DDP jobs. Under DDP every rank shuffles the whole
training split with the same seeded generator and takes its own contiguous share, so
all ranks run the same number of steps and the gradients DDP averages cover each row
once per epoch. Validation runs on every rank with synchronized weights; rank 0 decides
early stopping and broadcasts the decision so ranks never disagree.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from falaj_platform.services.training import metrics as mx
from falaj_platform.services.training.plan import BINARY, MULTICLASS, REGRESSION, JobFailed, JobPlan, higher_is_better


@dataclass
class TrainingTensors:
    """Prepared (imputed, standardized) inputs and targets of the training and validation splits."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_validation: torch.Tensor
    y_validation: torch.Tensor
    num_classes: int = 0
    class_weights: torch.Tensor | None = None
    # Regression targets are trained standardized; these undo it for metrics and serving.
    target_mean: float = 0.0
    target_scale: float = 1.0


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    total_epochs: int
    step: int
    train_loss: float
    validation_loss: float
    metrics: dict[str, float]
    samples_per_second: float
    message: str = ""


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    training_seconds: float
    history: list[EpochReport] = field(default_factory=list)


def loss_function(task: str, class_weights: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == BINARY:
        pos_weight = None if class_weights is None else (class_weights[1] / class_weights[0]).reshape(1)
        binary = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        return lambda outputs, targets: binary(outputs.reshape(-1), targets)
    if task == MULTICLASS:
        return nn.CrossEntropyLoss(weight=class_weights)
    mse = nn.MSELoss()
    return lambda outputs, targets: mse(outputs.reshape(-1), targets)


def make_optimizer(plan: JobPlan, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if plan.optimizer == "SGD":
        return torch.optim.SGD(parameters, lr=plan.learning_rate, momentum=plan.momentum, weight_decay=plan.weight_decay)
    if plan.optimizer == "ADAMW":
        return torch.optim.AdamW(parameters, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    return torch.optim.Adam(parameters, lr=plan.learning_rate, weight_decay=plan.weight_decay)


def served_outputs(task: str, outputs: torch.Tensor, target_mean: float, target_scale: float) -> np.ndarray:
    """Core outputs -> probabilities `[n, K]` (classification) or predictions `[n]` in target units."""
    if task == BINARY:
        return mx.binary_probabilities(torch.sigmoid(outputs.reshape(-1)).double().cpu().numpy())
    if task == MULTICLASS:
        return torch.softmax(outputs.double(), dim=-1).cpu().numpy()
    return outputs.reshape(-1).double().cpu().numpy() * target_scale + target_mean


def task_metrics(task: str, actual: np.ndarray, served: np.ndarray, threshold: float) -> dict[str, float]:
    if task == REGRESSION:
        return mx.regression_metrics(actual, served)
    found = mx.classification_metrics(actual, served, threshold)
    return {name: float(value) for name, value in found.items() if name != "confusion_matrix"}  # type: ignore[arg-type]


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fit(
    core: nn.Module,
    data: TrainingTensors,
    plan: JobPlan,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    report: Callable[[EpochReport], None] = lambda _report: None,
) -> FitResult:
    """Train `core` in place; returns what happened. Raises JobFailed when the loss diverges."""
    distributed = world_size > 1
    core.to(device)
    model: nn.Module = core
    if distributed:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    loss_of = loss_function(plan.task, None if data.class_weights is None else data.class_weights.to(device))
    optimizer = make_optimizer(plan, [p for p in model.parameters() if p.requires_grad])
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_validation.to(device), data.y_validation.to(device)
    y_val_actual = (
        data.y_validation.numpy() if plan.task != REGRESSION else data.y_validation.numpy() * data.target_scale + data.target_mean
    )
    rows = len(x_train)
    share = rows // world_size
    skip_single = _has_batch_norm(core)  # batch norm cannot train on a batch of one row
    watch = plan.early_stopping_metric
    best_value = math.nan
    best_epoch, stale_epochs, step = 0, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    result = FitResult(epochs_run=0, best_epoch=0, stopped_early=False, training_seconds=0.0)
    started = time.perf_counter()
    for epoch in range(1, plan.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + epoch)
        order = torch.randperm(rows, generator=generator)
        if distributed:
            order = order[rank * share : (rank + 1) * share]
        order = order.to(device)
        # Batch losses are summed once per epoch: no extra tensor work inside the step.
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        for begin in range(0, len(order), plan.batch_size):
            batch = order[begin : begin + plan.batch_size]
            if skip_single and len(batch) < 2:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            sizes.append(len(batch))
            step += 1
        loss_sum = (
            (torch.stack(losses).double() @ torch.tensor(sizes, dtype=torch.float64, device=device))
            if losses
            else torch.zeros((), dtype=torch.float64)
        )
        totals = torch.stack([loss_sum.to(device), torch.tensor(float(sum(sizes)), dtype=torch.float64, device=device)])
        if distributed:
            dist.all_reduce(totals)
        train_loss = float(totals[0] / totals[1].clamp(min=1.0))
        if not math.isfinite(train_loss):
            raise JobFailed("TRAINING_ERROR", f"the training loss became {train_loss} in epoch {epoch}; lower the learning rate")
        core.eval()
        with torch.inference_mode():
            val_outputs = core(x_val)
            validation_loss = float(loss_of(val_outputs, y_val))
        validation_metrics = task_metrics(
            plan.task, y_val_actual, served_outputs(plan.task, val_outputs, data.target_mean, data.target_scale), plan.threshold
        )
        message = ""
        decision = torch.zeros(2)
        if watch:
            value = validation_loss if watch == "loss" else validation_metrics.get(watch, math.nan)
            better = higher_is_better(watch)
            improved = math.isnan(best_value) or (
                value > best_value + plan.early_stopping_min_delta if better else value < best_value - plan.early_stopping_min_delta
            )
            stale_epochs = 0 if improved else stale_epochs + 1
            decision = torch.tensor([float(improved), float(stale_epochs >= plan.early_stopping_patience > 0)])
        if distributed:
            dist.broadcast(decision, src=0)
        improved_now, stop_now = bool(decision[0]), bool(decision[1])
        if watch and improved_now:
            best_value = validation_loss if watch == "loss" else validation_metrics.get(watch, math.nan)
            best_epoch = epoch
            best_state = copy.deepcopy(core.state_dict())
        if stop_now:
            message = f"early stopping after epoch {epoch}: {watch} has not improved for {plan.early_stopping_patience} epochs"
        elapsed = time.perf_counter() - epoch_started
        epoch_report = EpochReport(
            epoch=epoch,
            total_epochs=plan.epochs,
            step=step,
            train_loss=train_loss,
            validation_loss=validation_loss,
            metrics=validation_metrics,
            samples_per_second=float(totals[1]) / elapsed if elapsed > 0 else 0.0,
            message=message,
        )
        result.history.append(epoch_report)
        result.epochs_run = epoch
        report(epoch_report)
        if stop_now:
            result.stopped_early = True
            break
    result.training_seconds = time.perf_counter() - started
    if best_state is not None:
        core.load_state_dict(best_state)
        result.best_epoch = best_epoch
    else:
        result.best_epoch = result.epochs_run
    core.eval()
    return result
