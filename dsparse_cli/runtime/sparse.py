"""Apply a sparse-update plan to a model: which units train, which only run forward.

Frozen parameters get `requires_grad=False`, so autograd records nothing (and saves no
activations) before the first updated unit, and the optimizer never sees frozen parameters.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dsparse_cli.contract import OPTIMIZERS
from dsparse_cli.runtime.models import UnitSpec, unit_modules, unit_params


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


def set_train_mode(model: nn.Module, units: list[UnitSpec], updated: Iterable[int],
                   trained_elsewhere: Iterable[int] = ()) -> None:
    """`model.train()`, with three kinds of unit:

    * updated here: plain train mode;
    * updated by another board only (`trained_elsewhere`): eval mode (no dropout noise), except
      BatchNorm, which normalises with batch statistics as it does on the board that trains the
      unit (and as DDP does on every rank). Its momentum is 0 so the running statistics stay as
      the group root's last Broadcast left them. In eval mode the downstream units this board
      trains would see features normalised by lagging running statistics: on the seven-board
      example that cost 2.5 accuracy points against DDP;
    * updated by nobody: eval mode, BatchNorm included (frozen statistics).
    """
    updated, elsewhere = set(updated), set(trained_elsewhere)
    model.train()
    for unit in units:
        for m in unit_modules(model, unit):
            for sub in m.modules():
                _restore_momentum(sub)
            if unit.index in updated:
                continue
            m.eval()
            if unit.index in elsewhere:
                for sub in m.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.train()
                        sub._dsparse_momentum = sub.momentum
                        sub.momentum = 0.0


def _restore_momentum(module: nn.Module) -> None:
    if hasattr(module, "_dsparse_momentum"):
        module.momentum = module.__dict__.pop("_dsparse_momentum")


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
