"""Model registry and the split of each model into ordered *update units*.

This lives in the runtime (shipped to boards) because the worker must split the model exactly
as the planner did: a plan names units by index, and both sides rebuild the same list here.
Imports only torch, torchvision, the standard library and the shipped `contract`/`modelspec`.

A model spec (`modelspec.parse`) is
* a hand-split name of `contract.MODELS` (mobilenet_v2, mobilenet_v3_small, resnet18,
  shufflenet_v2_x0_5, tiny_cnn): built and split as below;
* any torchvision classification model name (`torchvision.models.list_models(module=
  torchvision.models)`), built untrained with `num_classes` outputs and split by the generic rule;
* `path/to/file.py:factory` or `package.module:factory`: `factory(num_classes=N)` when its
  signature takes `num_classes`, else `factory()`. Units come from `dsparse_units(model)` in the
  same file/module when it defines one (`[(unit name, [module qualified names...]), ...]` in
  forward order), else from the generic rule.

The generic rule: the model's parameterised children in registration order, each one unit; a
container child (Sequential/ModuleList/ModuleDict) with a parameterised *block* among its
children (a module that has submodules) is opened one level, each parameterised child a unit.
So a trunk of stages or blocks gives one unit per block, while a small Sequential of leaves (a
conv+bn+relu stem, a Dropout+Linear classifier) stays one unit. The last unit is the head.
Parameters registered on the root itself (ViT's class_token) fit in no unit: that is an error.

Every split is checked: each parameter in exactly one unit, every unit with parameters.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dsparse_cli.modelspec import FILE, NAME, parse
from dsparse_cli.contract import MODELS


class ModelError(ValueError):
    """A model spec that cannot be built or split; the message is one line."""


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
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 8, 1), block(8, 16, 2), block(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# The auxiliary heads return a tuple in train mode; without them forward returns one tensor
# (init_weights: torchvision warns when it is left unset).
_TORCHVISION_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}
_USER_MODULES: dict[str, object] = {}   # spec -> the module build_model loaded (split_units reads it)


def torchvision_names() -> list[str]:
    """Every torchvision classification model name."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_torchvision_model(spec: str) -> bool:
    return spec != "tiny_cnn" and ":" not in spec and spec in torchvision_names()


def build_model(spec: str, num_classes: int = 10, search_dirs: Sequence[str] = ()) -> nn.Module:
    """A randomly initialised model; deterministic under `torch.manual_seed`. A file spec's path
    is tried as given, then its base name in each of `search_dirs` (a board's run dir)."""
    kind, location, factory = _parse(spec)
    if kind != NAME:
        module = _user_module(spec, search_dirs)
        return _call_factory(getattr(module, factory, None), spec, location, factory, num_classes)
    if spec == "tiny_cnn":
        return TinyCNN(num_classes)
    if not is_torchvision_model(spec):
        raise ModelError(f"unknown model {spec!r}; `dsparse models` lists the names "
                         "(or pass FILE.py:factory / package.module:factory)")
    import torchvision

    return torchvision.models.get_model(spec, weights=None, num_classes=num_classes,
                                        **_TORCHVISION_EXTRA.get(spec, {}))


def _parse(spec: str) -> tuple[str, str, str | None]:
    try:
        return parse(spec)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def _user_module(spec: str, search_dirs: Sequence[str]):
    kind, location, _ = _parse(spec)
    module = _load_file(location, search_dirs) if kind == FILE else _import(location)
    _USER_MODULES[spec] = module
    return module


def find_file(location: str, search_dirs: Sequence[str]) -> str | None:
    """`location` as given, else its base name in the first of `search_dirs` holding it; None if neither."""
    for path in [os.path.expanduser(location)] + [os.path.join(d, os.path.basename(location)) for d in search_dirs]:
        if os.path.isfile(path):
            return path
    return None


def _load_file(location: str, search_dirs: Sequence[str]):
    """Execute the user's file as a module of its own (registered in sys.modules while it runs,
    so dataclasses and pickling inside it work); executed anew at every build."""
    path = find_file(location, search_dirs)
    if path is None:
        where = f" (nor {os.path.basename(location)} in {', '.join(search_dirs)})" if search_dirs else ""
        raise ModelError(f"model file {location} not found{where}")
    path = os.path.abspath(path)
    name = "dsparse_user_model_" + hashlib.sha256(path.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelError(f"model file {location} line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: say what it raised, on one line
        sys.modules.pop(name, None)
        raise ModelError(f"model file {location} failed to load: {_one_line(exc)}") from None
    return module


def _import(location: str):
    try:
        return importlib.import_module(location)
    except Exception as exc:  # noqa: BLE001 - ImportError or whatever the module raised
        raise ModelError(f"model module {location} cannot be imported: {_one_line(exc)}") from None


def _call_factory(fn, spec: str, location: str, factory: str, num_classes: int) -> nn.Module:
    if not callable(fn):
        raise ModelError(f"model {location} defines no function {factory!r}")
    try:
        params = inspect.signature(fn).parameters
        takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):   # no signature to read (a builtin): call it plainly
        takes = False
    try:
        model = fn(num_classes=num_classes) if takes else fn()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise ModelError(f"{spec} raised {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}".rstrip(": ")


# Named splits: (unit name, module names) in forward order. Anything with parameters that a
# split leaves out would silently never train, so split_units() checks coverage.
def _mobilenet_v2(model: nn.Module) -> list[tuple[str, list[str]]]:
    n = len(model.features)
    units = [("stem", ["features.0"])]
    units += [(f"block{i}", [f"features.{i}"]) for i in range(1, n - 1)]
    return units + [("last_conv", [f"features.{n - 1}"]), ("classifier", ["classifier"])]


def _staged(stem: list[str], stages: tuple[str, ...], tail: list[tuple[str, list[str]]]):
    """A stem, one unit per block of each stage, then `tail` (ResNet's layers, ShuffleNet's stages)."""
    def split(model: nn.Module) -> list[tuple[str, list[str]]]:
        blocks = [(f"{s}.{i}", [f"{s}.{i}"]) for s in stages for i in range(len(getattr(model, s)))]
        return [("stem", stem)] + blocks + tail
    return split


def _tiny_cnn(model: nn.Module) -> list[tuple[str, list[str]]]:
    blocks = [(f"block{i}", [f"features.{i}"]) for i in range(len(model.features))]
    return blocks + [("classifier", ["classifier"])]


_SPLITS = {
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_small": _mobilenet_v2,  # same shape: features[0] stem ... features[-1] conv
    "resnet18": _staged(["conv1", "bn1"], ("layer1", "layer2", "layer3", "layer4"), [("classifier", ["fc"])]),
    "shufflenet_v2_x0_5": _staged(["conv1"], ("stage2", "stage3", "stage4"),
                                  [("last_conv", ["conv5"]), ("classifier", ["fc"])]),
    "tiny_cnn": _tiny_cnn,
}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def generic_split(model: nn.Module, label: str = "the model") -> list[tuple[str, list[str]]]:
    """The generic rule (module docstring): parameterised children in order, a container of
    blocks opened one level."""
    own = [n for n, _ in model.named_parameters(recurse=False)]
    if own:
        raise ModelError(f"cannot split {label}: parameters on its root module ({', '.join(own[:3])}) fit in no "
                         "unit; use a model file that keeps them in a submodule and defines dsparse_units(model)")
    units: list[tuple[str, list[str]]] = []
    for name, child in model.named_children():
        if not _has_params(child):
            continue
        inner = [(f"{name}.{sub}", c) for sub, c in child.named_children() if _has_params(c)]
        if isinstance(child, _CONTAINERS) and any(list(c.children()) for _, c in inner):   # a block among them
            units += [(qual, [qual]) for qual, _ in inner]
        else:
            units.append((name, [name]))
    return units


def split_units(model: nn.Module, spec: str | None = None, search_dirs: Sequence[str] = ()) -> list[UnitSpec]:
    """Ordered update units (input side first): the hand split of a `contract.MODELS` name, a
    user model's `dsparse_units`, else the generic rule. Checked: every parameter in one unit."""
    if spec in _SPLITS:
        raw = _SPLITS[spec](model)
    elif spec and ":" in spec:
        module = _USER_MODULES.get(spec) or _user_module(spec, search_dirs)
        fn = getattr(module, "dsparse_units", None)
        raw = _user_units(fn, model, spec) if callable(fn) else generic_split(model, spec)
    else:
        raw = generic_split(model, spec or "the model")
    units = [UnitSpec(i, uname, tuple(mods)) for i, (uname, mods) in enumerate(raw)]
    _check_units(model, units, spec or "the model")
    return units


def _user_units(fn, model: nn.Module, spec: str) -> list[tuple[str, list[str]]]:
    try:
        raw = [(str(name), [str(m) for m in mods]) for name, mods in fn(model)]
    except Exception as exc:  # noqa: BLE001 - the user's code, or a result of the wrong shape
        raise ModelError(f"dsparse_units of {spec} failed: {_one_line(exc)} "
                         "(it returns [(unit name, [module names...]), ...])") from None
    for name, mods in raw:
        for m in mods:
            try:
                model.get_submodule(m)
            except AttributeError:
                raise ModelError(f"dsparse_units of {spec}: unit {name!r} names {m!r}, "
                                 "which is not a module of the model") from None
    return raw


def _check_units(model: nn.Module, units: list[UnitSpec], label: str) -> None:
    """Each parameter in exactly one unit (one left out would never train; one in two units
    would be updated twice), and no unit without parameters."""
    owner: dict[int, str] = {}
    for u in units:
        params = unit_params(model, u)
        if not params:
            raise ModelError(f"split of {label}: unit {u.name!r} has no parameters")
        for p in {id(p) for p in params}:
            if p in owner:
                raise ModelError(f"split of {label}: units {owner[p]!r} and {u.name!r} share parameters")
            owner[p] = u.name
    missing = [n for n, p in model.named_parameters() if id(p) not in owner]
    if missing:
        raise ModelError(f"split of {label} leaves parameters outside every unit: {missing[:3]}")


def units_from_plan(plan: dict) -> list[UnitSpec]:
    """The unit list recorded in a plan file."""
    return [UnitSpec(u["index"], u["name"], tuple(u["modules"])) for u in plan["units"]]


def unit_modules(model: nn.Module, unit: UnitSpec) -> list[nn.Module]:
    return [model.get_submodule(m) for m in unit.modules]


def unit_params(model: nn.Module, unit: UnitSpec) -> list[nn.Parameter]:
    return [p for m in unit_modules(model, unit) for p in m.parameters()]


def unit_buffers(model: nn.Module, unit: UnitSpec) -> list[torch.Tensor]:
    return [b for m in unit_modules(model, unit) for b in m.buffers()]


def list_available(num_classes: int = 10) -> list[dict]:
    """Every buildable name for `dsparse models`: name, source, parameters, units, and `error`
    for a model that cannot be built or split here. Built on the meta device: no memory, no
    initialisation work."""
    names = list(MODELS) + [n for n in torchvision_names() if n not in MODELS]
    return [_describe(name, num_classes) for name in names]


def _describe(name: str, num_classes: int) -> dict:
    row = {"name": name, "source": "hand split" if name in _SPLITS else "generic",
           "parameters": None, "units": None, "error": None}
    try:
        model = _build_on_meta(name, num_classes)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["units"] = len(split_units(model, name))
    except Exception as exc:  # noqa: BLE001 - one bad model must not hide the others
        row["error"] = str(exc) if isinstance(exc, ModelError) else _one_line(exc)
    return row


# Random fills of a meta tensor do nothing, but torch runs them through a slow Python decomposition.
_RANDOM_FILLS = {"normal_", "uniform_", "bernoulli_", "exponential_", "random_", "cauchy_", "log_normal_"}


class _SkipInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _RANDOM_FILLS and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


class _MetaEmpty(TorchFunctionMode):
    """`torch.empty` (how every torch layer makes its parameters) on the meta device, all else
    as usual: for constructors that compute with tensors (regnet's stage widths)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build_on_meta(name: str, num_classes: int) -> nn.Module:
    try:
        with torch.device("meta"), _SkipInitOnMeta():
            return build_model(name, num_classes)
    except NotImplementedError:   # "Cannot copy out of meta tensor": the constructor reads a tensor
        with _MetaEmpty(), _SkipInitOnMeta():
            return build_model(name, num_classes)
