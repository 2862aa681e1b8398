"""What a job brings besides the runtime: the user's model file, a weights file, its image folder.

Checked here, on this machine, before any board is touched (each problem a one-line ConfigError,
exit 2), and turned into the files every board gets in its run dir and the per-board job keys.
A model file and a weights file are shipped under their base names: the worker looks them up in
its run dir. The weights' torchvision names and the model file's contents need torch/torchvision
to check, so those imports happen inside the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from dsparse_cli.contract import JobSpec, Plan
from dsparse_cli.errors import ConfigError
from dsparse_cli.inventory import Inventory, Target


@dataclass
class Workload:
    """The job spec as boards get it, and (local file, name in the run dir) for each shipped file."""
    spec: JobSpec
    files: list[tuple[Path, str]] = field(default_factory=list)


def prepare(inv: Inventory, plan: Plan, opts: JobSpec) -> Workload:
    work = Workload(opts)
    _model_file(plan, work)
    _weights(plan, work)
    if opts.dataset == "imagefolder":
        _image_folder(inv, plan, opts)
    return work


def _model_file(plan: Plan, work: Workload) -> None:
    from dsparse_cli import modelspec

    kind, location, _ = modelspec.parse(plan.model)
    if kind == "file":
        path = Path(location).expanduser()
        if not path.is_file():
            raise ConfigError(f"the plan's model file {location} is not on this machine any more",
                              "put it back or re-run `dsparse plan --model FILE.py:factory`")
        work.files.append((path, path.name))


def _weights(plan: Plan, work: Workload) -> None:
    """A weights file is shipped (the job names it by its base name); a torchvision weights name
    must be one the model has."""
    weights = work.spec.weights
    if not weights:
        return
    from dsparse_cli.modelspec import names_a_weights_file

    if names_a_weights_file(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"weights file {weights} not found", "pass a state_dict, checkpoint or model.pt file")
        _check_weights_file(path, plan)
        work.files.append((path, path.name))
        work.spec = replace(work.spec, weights=path.name)
        return
    from dsparse_cli.runtime.weights import WeightsError, check_weights_name

    try:
        check_weights_name(plan.model, weights)
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None


def _check_weights_file(path: Path, plan: Plan) -> None:
    """The file fits the plan's model (a resized head is allowed); checked here so a wrong file
    is exit 2 before the boards start, not a failure on every board."""
    import torch

    from dsparse_cli.runtime.models import ModelError, build_model, units_from_plan
    from dsparse_cli.runtime.weights import WeightsError, load_weights

    torch.manual_seed(0)
    try:
        model = build_model(plan.model, plan.num_classes)
        load_weights(model, units_from_plan(plan.to_dict()), str(path), spec=plan.model)
    except (ModelError, WeightsError) as exc:
        raise ConfigError(f"weights file {path.name}: {exc}") from None


def _image_folder(inv: Inventory, plan: Plan, opts: JobSpec) -> None:
    """Local boards without their own `data_dir` read `--data-dir` here: its layout and images
    are checked now (each board would fail on them later). SSH boards read a pushed copy."""
    from dsparse_cli.runtime import imagefolder
    from dsparse_cli.runtime.data import DataError

    boards = [inv.board(d.name) for d in plan.devices]
    if not opts.data_dir and any(not b.data_dir for b in boards):
        name = next(b.name for b in boards if not b.data_dir)
        raise ConfigError(f"dataset imagefolder needs --data-dir (board {name} has no data_dir)",
                          "pass --data-dir DIR (and `dsparse data push DIR` for SSH boards)")
    if not any(b.local and not b.data_dir for b in boards):
        return
    root = Path(opts.data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data dir {opts.data_dir} not found")
    try:
        index = imagefolder.scan(str(root), opts.val_fraction, imagefolder.SPLIT_SEED)
        imagefolder.bad_images(str(root), index, opts.skip_bad_images)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    if len(index.classes) > plan.num_classes:
        raise ConfigError(f"{opts.data_dir} has {len(index.classes)} classes but the plan's model predicts "
                          f"{plan.num_classes}", f"re-run `dsparse plan --num-classes {len(index.classes)}`")


def board_data_dir(target: Target, opts: JobSpec) -> str | None:
    """The data dir this board's worker reads (`~` still unresolved on SSH boards): for an image
    folder its own `data_dir`, else on an SSH board where `dsparse data push` put --data-dir,
    else --data-dir itself."""
    if opts.dataset != "imagefolder":
        return opts.data_dir
    if target.local:
        return str(Path(target.data_dir or opts.data_dir).expanduser().resolve())
    from dsparse_cli.jobs.datapush import board_data_dir as pushed_to

    return pushed_to(target, Path(opts.data_dir or ".").expanduser().resolve().name)   # as push names it
