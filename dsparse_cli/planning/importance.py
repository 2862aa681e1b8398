"""Importance order of update units (most important first).

* `depth`: later units first (the classifier leads), as on-device training work found.
* `grad`: measured: each unit's share of the squared gradient norm on one calibration batch
  (the bundled digits data, synthetic if it cannot be read), at the job's batch and image size,
  seeded so the order is reproducible. Ties go to the later unit.
"""

from __future__ import annotations

from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.planner import depth_order

KINDS = ("depth", "grad")


def grad_scores(model_name: str, *, num_classes: int = 10, image_size: int = 32, batch_size: int = 64,
                seed: int = 0) -> list[float]:
    """Per unit: ||grad_u||² / Σ ||grad||² after one full backward on a calibration batch."""
    import torch

    from dsparse_cli.runtime.models import build_model, split_units, unit_params

    torch.manual_seed(seed)
    model = build_model(model_name, num_classes)
    units = split_units(model, model_name)
    model.train()
    x, y = calibration_batch(batch_size, image_size, num_classes, seed)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    sq = [sum(float(p.grad.double().pow(2).sum()) for p in unit_params(model, u) if p.grad is not None)
          for u in units]
    total = sum(sq) or 1.0
    return [s / total for s in sq]


def calibration_batch(batch_size: int, image_size: int, num_classes: int, seed: int):
    import torch

    from dsparse_cli.runtime import data

    try:
        ds = data.load_dataset("digits", image_size=image_size)
        idx = torch.arange(min(batch_size, ds.train.size))
        x, y = ds.train.fetch(idx)
        return x, y % num_classes
    except (data.DataError, OSError):
        ds = data.load_synthetic(batch_size * 2, image_size=image_size, seed=seed, num_classes=num_classes)
        return ds.train.fetch(torch.arange(min(batch_size, ds.train.size)))


def order_from_scores(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda u: (-scores[u], -u))


def importance_order(kind: str, num_units: int, *, model: str | None = None, **kwargs) -> list[int]:
    """The ranking used by the planner, most important unit first."""
    if kind == "depth":
        return depth_order(num_units)
    if kind == "grad":
        scores = grad_scores(model, **kwargs)
        if len(scores) != num_units:
            raise ValueError(f"{model} split into {len(scores)} units, profile has {num_units}")
        return order_from_scores(scores)
    raise ConfigError(f"unknown importance {kind!r}", f"choose one of {', '.join(KINDS)}")
