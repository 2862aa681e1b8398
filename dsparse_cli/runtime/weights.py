"""Start a model from pretrained weights (`dsparse train --weights`), on the board.

A weights source is
* a file (tried as given, then its base name in `search_dirs`: the launcher ships it into the run
  dir) holding a plain state_dict, a dsparse checkpoint (`{"model": state_dict, ...}`,
  `checkpoint.py`) or a dsparse model file (`{"format": "dsparse-model", "state_dict": ...}`,
  `model_out.py`);
* a torchvision weights name of the model (`DEFAULT`, `IMAGENET1K_V1`, ...), read from torch hub's
  cache (`<torch.hub.get_dir()>/checkpoints/<file name of the weights' URL>`), downloaded there
  when missing and the board can reach the internet.

The weights must fit the model key for key, with one exception: a key of the head (the last
unit's modules) whose shape differs keeps its fresh initialisation, so ImageNet weights start a
10-class model. Anything else — a missing or unexpected key, another shape — is a `WeightsError`
naming the first such key: a file for another architecture fails on its first key.
Imports only torch, torchvision, the standard library and the shipped runtime.
"""

from __future__ import annotations

import os
from typing import Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from dsparse_cli.modelspec import names_a_weights_file
from dsparse_cli.runtime.model_out import MODEL_FORMAT
from dsparse_cli.runtime.models import UnitSpec, find_file, is_torchvision_model


class WeightsError(Exception):
    """Weights that cannot be found, read or loaded into the model; one line."""


def load_weights(model: nn.Module, units: list[UnitSpec], source: str, *, spec: str,
                 search_dirs: Sequence[str] = ()) -> str:
    """Load `source` into `model` (see module doc) -> one line saying what was loaded."""
    path = find_file(source, search_dirs)
    if path is not None:
        state, what = _read_file(path), f"weights file {os.path.basename(path)}"
    elif names_a_weights_file(source):
        where = f" (nor in {', '.join(search_dirs)})" if search_dirs else ""
        raise WeightsError(f"weights file {source} not found{where}")
    else:
        weights = _member(spec, source)
        state, what = _torchvision_state(spec, weights), f"weights {weights.name}"
    kept = _fit(model, units, state, spec)
    model.load_state_dict({k: v for k, v in state.items() if k not in kept}, strict=False)
    return what + (f" (head re-initialised for {model.state_dict()[kept[0]].shape[0]} classes)" if kept else "")


def check_weights_name(spec: str, name: str) -> None:
    """A `WeightsError` unless `name` is one of the model's torchvision weights."""
    _member(spec, name)


# --- files -----------------------------------------------------------------------------------
def _read_file(path: str) -> dict:
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"cannot read weights file {os.path.basename(path)}: {first}") from None
    state = _state_dict_of(doc)
    if state is None:
        raise WeightsError(f"{os.path.basename(path)} holds no state_dict (nor a dsparse checkpoint or model file)")
    return state


def _state_dict_of(doc) -> dict | None:
    if isinstance(doc, dict) and doc.get("format") == MODEL_FORMAT:
        doc = doc.get("state_dict")
    elif isinstance(doc, dict) and isinstance(doc.get("model"), dict):   # a dsparse checkpoint
        doc = doc["model"]
    elif isinstance(doc, dict) and isinstance(doc.get("state_dict"), dict):
        doc = doc["state_dict"]
    if not isinstance(doc, dict) or not doc or not all(torch.is_tensor(v) for v in doc.values()):
        return None
    if all(k.startswith("module.") for k in doc):   # saved from DistributedDataParallel
        doc = {k[len("module."):]: v for k, v in doc.items()}
    return doc


# --- torchvision weights -------------------------------------------------------------------------
def _member(spec: str, name: str):
    """The torchvision weights enum member `name` of model `spec`."""
    if not is_torchvision_model(spec):
        raise WeightsError(f"model {spec} has no torchvision weights; pass a weights file")
    import torchvision

    enum = torchvision.models.get_model_weights(spec)
    names = list(enum.__members__)
    match = next((n for n in names if n.upper() == name.upper()), None)
    if match is None:
        raise WeightsError(f"model {spec} has no weights {name!r}; choose one of {', '.join(names)}")
    return enum[match]


def cache_path(weights) -> str:
    """Where torch hub keeps a torchvision weights file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def _torchvision_state(spec: str, weights) -> dict:
    path = cache_path(weights)
    if os.path.isfile(path):
        return _read_file(path)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # noqa: BLE001 - URLError, socket and HTTP errors alike
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"no cached copy of {spec} weights {weights.name} at {path}, and downloading "
                           f"{weights.url} failed ({reason}); copy that file there from a machine that has it"
                           ) from None


# --- fitting ---------------------------------------------------------------------------------
def _fit(model: nn.Module, units: list[UnitSpec], state: dict, spec: str) -> list[str]:
    """Check `state` against the model key by key -> the head keys left as initialised."""
    own = model.state_dict()
    head = tuple(units[-1].modules) if units else ()
    kept: list[str] = []
    for key, mine in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):   # older files lack it; torch tolerates that too
                continue
            raise WeightsError(f"weights do not fit {spec}: {key} is missing (the model's is {_shape(mine)})")
        if state[key].shape != mine.shape:
            if not any(key.startswith(m + ".") for m in head):
                raise WeightsError(f"weights do not fit {spec}: {key} is {_shape(state[key])} in the weights, "
                                   f"{_shape(mine)} in the model")
            kept.append(key)
    for key in state:
        if key not in own and not _absent_aux(model, key):
            raise WeightsError(f"weights do not fit {spec}: unexpected key {key} {_shape(state[key])}")
    return kept


def _absent_aux(model: nn.Module, key: str) -> bool:
    """A key of a submodule the model has switched off (googlenet's aux1, inception's
    AuxLogits are None without auxiliary heads), as torchvision itself drops them."""
    return "." in key and hasattr(model, key.split(".")[0]) and getattr(model, key.split(".")[0]) is None


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"
