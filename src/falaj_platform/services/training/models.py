"""The torch model families, the preprocessing baked into every export, and the serving head.

A job trains a *core* (linear layer, MLP or a user-supplied module) on prepared inputs.
What is exported is `ServingModel`: raw feature values in, missing values imputed and
numeric features standardized inside the graph, the core, then the head that turns
logits into probabilities (or standardized predictions back into target units). So a
serving system feeds the same raw values the features service returns.
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from falaj_platform.services.training.plan import BINARY, MULTICLASS, REGRESSION, JobFailed, JobPlan

ACTIVATIONS: dict[str, type[nn.Module]] = {"RELU": nn.ReLU, "GELU": nn.GELU, "TANH": nn.Tanh}


def num_outputs(task: str, num_classes: int) -> int:
    return num_classes if task == MULTICLASS else 1


def build_mlp(num_inputs: int, outputs: int, hidden_sizes: Sequence[int], activation: str, dropout: float, batch_norm: bool) -> nn.Module:
    layers: list[nn.Module] = []
    width = num_inputs
    for size in hidden_sizes:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def load_custom_class(source: str, class_name: str) -> type[nn.Module]:
    """The nn.Module subclass `class_name` defined by `source` (run in this worker process)."""
    name = "falaj_custom_module_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    module = types.ModuleType(name)
    module.__file__ = f"<custom module {name}>"
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except Exception as error:  # noqa: BLE001 - user code can raise anything
        raise JobFailed("TRAINING_ERROR", f"the custom module source does not run: {type(error).__name__}: {error}") from None
    found = getattr(module, class_name, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise JobFailed("TRAINING_ERROR", f"the custom module source defines no torch.nn.Module subclass named {class_name!r}")
    return found


def build_core(plan: JobPlan, num_inputs: int, num_classes: int) -> nn.Module:
    """The trainable model of `plan`'s family for `num_inputs` prepared features."""
    outputs = num_outputs(plan.task, num_classes)
    if plan.family in ("LINEAR_REGRESSION", "LOGISTIC_REGRESSION"):
        return nn.Linear(num_inputs, outputs)
    if plan.family == "MLP":
        return build_mlp(num_inputs, outputs, plan.hidden_sizes, plan.activation, plan.dropout, plan.batch_norm)
    if plan.family == "CUSTOM_MODULE":
        module_class = load_custom_class(plan.custom_source, plan.custom_class)
        kwargs: dict[str, Any] = {**plan.custom_kwargs, "num_inputs": num_inputs, "num_outputs": outputs}
        try:
            return module_class(**kwargs)
        except Exception as error:  # noqa: BLE001 - user code can raise anything
            raise JobFailed("TRAINING_ERROR", f"{plan.custom_class}(**init_kwargs) raised {type(error).__name__}: {error}") from None
    raise JobFailed("INTERNAL", f"unknown model family {plan.family}")


class Preprocessor(nn.Module):
    """Impute missing values, then standardize; fitted on the training split only."""

    fill: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, fill: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, standardize: bool):
        super().__init__()
        self.register_buffer("fill", fill.to(torch.float32))
        self.register_buffer("mean", mean.to(torch.float32))
        self.register_buffer("scale", scale.to(torch.float32))
        self.standardize = standardize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = torch.where(torch.isnan(features), self.fill, features)
        if self.standardize:
            features = (features - self.mean) / self.scale
        return features


class ServingModel(nn.Module):
    """Raw features -> preprocessing -> core -> probabilities or predictions (what is exported)."""

    target_mean: torch.Tensor
    target_scale: torch.Tensor

    def __init__(self, preprocessor: Preprocessor, core: nn.Module, task: str, target_mean: float = 0.0, target_scale: float = 1.0):
        super().__init__()
        self.preprocessor = preprocessor
        self.core = core
        self.task = task
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32))
        self.register_buffer("target_scale", torch.tensor(target_scale, dtype=torch.float32))

    def head(self, outputs: torch.Tensor) -> torch.Tensor:
        """Core outputs -> what the model serves."""
        if self.task == BINARY:
            return torch.sigmoid(outputs).reshape(-1)
        if self.task == MULTICLASS:
            return torch.softmax(outputs, dim=-1)
        if self.task == REGRESSION:
            return (outputs * self.target_scale + self.target_mean).reshape(-1)
        raise ValueError(self.task)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.core(self.preprocessor(features)))
