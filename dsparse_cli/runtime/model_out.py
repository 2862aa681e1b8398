"""The trained model a job hands back: `model.pt` and its sidecar `model.json`.

`model.pt` is a dict: `format` "dsparse-model", `state_dict`, and `meta` (what rebuilds the model
and feeds it: the model spec, classes, image size, normalisation). `model.json` repeats `meta` so
the control side and a deployment can read it without torch. Rank 0 writes both into its run dir
when the job finishes; `dsparse train` copies them to `.dsparse/jobs/<id>/`, where
`dsparse export` turns them into a TorchScript or plain state_dict file.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from torch import nn

from dsparse_cli.contract import MODEL_FILE, MODEL_SIDECAR as SIDECAR
from dsparse_cli.modelspec import FILE, parse

MODEL_FORMAT = "dsparse-model"


def model_meta(*, spec: str, num_classes: int, image_size: int, classes: Sequence[str] | None,
               mean: Sequence[float] | None, std: Sequence[float] | None, accuracy: float | None,
               job: str, dataset: str, steps: int, weights: str | None) -> dict:
    """What a user of the model needs besides its weights. `mean`/`std` are None for datasets
    that standardise themselves (digits, synthetic): feed those the way the dataset does."""
    kind, location, _ = parse(spec)
    return {"format": MODEL_FORMAT, "version": 1, "model": spec,
            "model_file": os.path.basename(location) if kind == FILE else None,
            "num_classes": num_classes, "image_size": image_size,
            "classes": list(classes) if classes else [str(i) for i in range(num_classes)],
            "normalize": {"mean": list(mean), "std": list(std)} if mean is not None and std is not None else None,
            "accuracy": accuracy, "job": job, "dataset": dataset, "steps": steps, "weights": weights}


def save_model(directory: str, model: nn.Module, meta: dict) -> str:
    """Write model.pt (to a temporary name, then renamed) and model.json; -> model.pt's path."""
    path = os.path.join(directory, MODEL_FILE)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "meta": meta, "state_dict": state}, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(directory, SIDECAR + ".tmp"), "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(os.path.join(directory, SIDECAR + ".tmp"), os.path.join(directory, SIDECAR))
    return path


class ModelFileError(Exception):
    """A model.pt that cannot be read or rebuilt; one line."""


def load_model(path: str, search_dirs: Sequence[str] = ()) -> tuple[nn.Module, dict]:
    """Rebuild the trained model from model.pt (a user model's file is looked up in `search_dirs`)
    -> (model in eval mode, meta)."""
    from dsparse_cli.runtime.models import build_model

    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a model file written by dsparse")
    meta = doc["meta"]
    model = build_model(meta["model"], int(meta["num_classes"]),
                        search_dirs=[os.path.dirname(os.path.abspath(path)), *search_dirs])
    model.load_state_dict(doc["state_dict"])
    return model.eval(), meta
