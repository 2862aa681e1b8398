"""Apply a sparse-update plan to a model: which units train, which only run forward.

Frozen parameters get `requires_grad=False`, so autograd records nothing (and saves no
activations) before the first updated unit, and the optimizer never sees frozen parameters.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dsparse_cli.runtime.models import UnitSpec, unit_modules, unit_params

OPTIMIZERS = ("sgd", "sgd-momentum", "adam")


def apply_plan(model: nn.Module, units: list[UnitSpec], updated: Iterable[int]) -> list[nn.Parameter]:
    """Set `requires_grad` per unit; return the trainable parameters in model order."""
    updated = set(updated)
    unknown = updated - {u.index for u in units}
    if unknown:
        raise ValueError(f"plan updates units {sorted(unknown)} that the model does not have")
    for unit in units:
        for p in unit_params(model, unit):
            p.requires_grad_(unit.index in updated)
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: nn.Module, units: list[UnitSpec], updated: Iterable[int]) -> None:
    """`model.train()`, but frozen units stay in eval: their BatchNorm statistics must not drift
    (they are not aggregated) and dropout in a frozen unit would only add noise."""
    updated = set(updated)
    model.train()
    for unit in units:
        if unit.index not in updated:
            for m in unit_modules(model, unit):
                m.eval()


def make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
