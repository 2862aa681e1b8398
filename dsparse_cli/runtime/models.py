"""Model registry and the split of each model into ordered *update units*.

This lives in the runtime (shipped to boards) because the worker must split the model exactly
as the planner did: a plan names units by index, and both sides rebuild the same list here.
Imports only torch and torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsparse_cli.contract import MODELS


@dataclass(frozen=True)
class UnitSpec:
    """One update unit: a run of modules that are trained (or frozen) together."""

    index: int
    name: str
    modules: tuple[str, ...]


class TinyCNN(nn.Module):
    """A small conv net with BatchNorm, for fast tests and demos."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(block(3, 8, 1), block(8, 16, 2), block(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _torchvision(name: str):
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


MODEL_NAMES = MODELS   # the names the planner checks before it imports torch
_BUILDERS = {name: TinyCNN if name == "tiny_cnn" else _torchvision(name) for name in MODEL_NAMES}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A randomly initialised model; deterministic under `torch.manual_seed`."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes)


# Named splits: (unit name, module names) in forward order. Anything with parameters that a
# split leaves out would silently never train, so split_units() checks coverage.
def _mobilenet_v2(model: nn.Module) -> list[tuple[str, list[str]]]:
    n = len(model.features)
    units = [("stem", ["features.0"])]
    units += [(f"block{i}", [f"features.{i}"]) for i in range(1, n - 1)]
    return units + [("last_conv", [f"features.{n - 1}"]), ("classifier", ["classifier"])]


def _resnet(model: nn.Module) -> list[tuple[str, list[str]]]:
    units = [("stem", ["conv1", "bn1"])]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i in range(len(getattr(model, layer))):
            units.append((f"{layer}.{i}", [f"{layer}.{i}"]))
    return units + [("classifier", ["fc"])]


def _shufflenet(model: nn.Module) -> list[tuple[str, list[str]]]:
    units = [("stem", ["conv1"])]
    for stage in ("stage2", "stage3", "stage4"):
        for i in range(len(getattr(model, stage))):
            units.append((f"{stage}.{i}", [f"{stage}.{i}"]))
    return units + [("last_conv", ["conv5"]), ("classifier", ["fc"])]


def _tiny_cnn(model: nn.Module) -> list[tuple[str, list[str]]]:
    blocks = [(f"block{i}", [f"features.{i}"]) for i in range(len(model.features))]
    return blocks + [("classifier", ["classifier"])]


_SPLITS = {
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_small": _mobilenet_v2,  # same shape: features[0] stem ... features[-1] conv
    "resnet18": _resnet,
    "shufflenet_v2_x0_5": _shufflenet,
    "tiny_cnn": _tiny_cnn,
}


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def generic_split(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Split any module: its parameterised children in registration order, opening up
    containers (Sequential/ModuleList) one level so a deep trunk gives several units."""
    units: list[tuple[str, list[str]]] = []
    for name, child in model.named_children():
        if not _has_params(child):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            for sub, grandchild in child.named_children():
                if _has_params(grandchild):
                    units.append((f"{name}.{sub}", [f"{name}.{sub}"]))
        else:
            units.append((name, [name]))
    return units


def split_units(model: nn.Module, name: str | None = None) -> list[UnitSpec]:
    """Ordered update units (input side first). Unknown names use the generic splitter."""
    raw = _SPLITS.get(name, generic_split)(model) if name else generic_split(model)
    units = [UnitSpec(i, uname, tuple(mods)) for i, (uname, mods) in enumerate(raw)]
    _check_coverage(model, units)
    return units


def _check_coverage(model: nn.Module, units: list[UnitSpec]) -> None:
    covered = {id(p) for u in units for p in unit_params(model, u)}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"model split leaves parameters outside every unit: {missing[:3]}")


def units_from_plan(plan: dict) -> list[UnitSpec]:
    """The unit list recorded in a plan file."""
    return [UnitSpec(u["index"], u["name"], tuple(u["modules"])) for u in plan["units"]]


def unit_modules(model: nn.Module, unit: UnitSpec) -> list[nn.Module]:
    return [model.get_submodule(m) for m in unit.modules]


def unit_params(model: nn.Module, unit: UnitSpec) -> list[nn.Parameter]:
    return [p for m in unit_modules(model, unit) for p in m.parameters()]


def unit_buffers(model: nn.Module, unit: UnitSpec) -> list[torch.Tensor]:
    return [b for m in unit_modules(model, unit) for b in m.buffers()]
