"""Measured per-unit memory costs of training a model (the profile) and its cache.

Nothing here is a formula over layer shapes: every number comes from running the model.

What is measured (`measure.measure_profile`, in a fresh subprocess started by `get_profile`)
-----------------------------------------------------------------------------------------
Three configurations of one real training step (batch, image size, dtype, optimizer as the job),
each after warm-up steps, each with hooks that mark *regions*: region *u* starts at the forward
pre-hook of unit *u*'s first module and runs until the next unit starts, so functional ops
between units (flatten, adaptive pool, resnet's relu/maxpool, the loss) belong to the unit
before them, consistently in forward, backward and saved-tensor attribution.

1. every unit updated  -> mode "updated"      (train mode, everything recorded)
2. only unit 0 updated -> mode "passthrough"  (units after it frozen, BatchNorm on batch statistics
                                                as when another board trains them; autograd
                                                must pass gradients through them)
3. nothing updated     -> mode "frozen"       (no autograd, nothing recorded: the no-grad forward
                                                of the units before a plan's first updated unit)

Per unit: parameter, buffer, gradient bytes (from the real `.grad` tensors), optimizer-state
bytes (the real `optimizer.state` tensors after a step), and per mode:

* saved bytes: tensors autograd saves for backward, counted with
  `torch.autograd.graph.saved_tensors_hooks`, each storage once (identity of the storage object,
  so views and in-place ops count once), parameters/buffers and the input batch excluded (they
  are counted elsewhere). A saved storage belongs to the region that was running when it was
  saved. The activation *entering* a unit is kept apart (`input_bytes`, with flags saying whether
  the unit saves it and whether the region before saves it), because whether it is kept depends
  on the neighbours' modes: the first updated unit must save its own input (a conv needs it for
  the weight gradient) although in the all-updated pass the previous unit may have saved it.
* forward peak / backward peak: the growth of the process's resident memory above the region's
  start, measured with VmHWM (reset through /proc/self/clear_refs at every region boundary),
  with glibc told to return freed blocks (`MALLOC_ENV`) so RSS follows live tensors.

Process level: `base_bytes` = RSS right before the first step, the model built and the optimizer
made (interpreter, torch, weights: the worker's base point, `runtime/memory.py`), plus the code
pages the first steps map (file-backed, `first_step_file_bytes`: the meter counts private memory
only, so they are part of the process, not of training); `batch_bytes` =
input images + labels; `step_peak_bytes` = the optimizer step's own transient with every unit
updated. Before any of the above, on the cold process, `first_step_bytes` per unit and
`eval_first_bytes`: what the first steps and the first evaluation add for good (`measure`).

Training bytes of a plan (the peak above `base_bytes` over a run, which is what the worker
reports) are replayed from these terms in `replay.py`; `peak_bytes = base_bytes +
training_bytes` is whole-process bytes, the unit of budgets. Peaks assume
`zero_grad(set_to_none=True)`.

This module never imports torch at import time (the measuring is in `measure`, in a child process),
so cached profiles load fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.replay import (FROZEN, PASSTHROUGH, UPDATED, breakdown, live_peak_bytes, peak_bytes,
                                         training_bytes, weight_bytes)

# The replay (replay.py) is part of what a profile offers its users: re-exported here.
__all__ = ["FROZEN", "PASSTHROUGH", "UPDATED", "MALLOC_ENV", "PROFILE_FORMAT", "Profile", "UnitCost", "allocator_env",
           "breakdown", "check_args", "check_model", "child_env", "get_profile", "launcher_bytes", "live_peak_bytes",
           "load_profile", "measure_launcher_bytes", "peak_bytes", "profile_key", "profile_path",
           "run_profile_subprocess", "save_profile", "torch_version", "training_bytes", "weight_bytes"]

# 2: launcher_bytes; 3: supervisor_bytes; 4: the worker's base point (weights in the base), one-time
# first-step and first-evaluation bytes, torchrun's agent measured only when a plan needs it
PROFILE_FORMAT = 5
# glibc: serve every block >= 64 KiB by mmap and give freed memory back, so RSS follows live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "131072"}
DTYPES = ("float32", "float64", "bfloat16")


@dataclass
class UnitCost:
    index: int
    name: str
    modules: list[str]
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    input_bytes: int                     # activation entering the unit (0 when it is the batch)
    saved: dict[str, int]                # mode -> saved bytes inside the region (updated, passthrough)
    saves_input: dict[str, bool]         # mode -> the unit saves the activation entering it
    saves_output: dict[str, bool]        # mode -> the region saves the activation entering the next unit
    forward_peak: dict[str, int]         # mode -> RSS growth over the region's forward
    backward_peak: dict[str, int]        # mode -> RSS growth over the region's backward
    first_step_bytes: int = 0            # one-time growth when a first step first runs this unit backward


@dataclass
class Profile:
    key: str
    model: str
    num_classes: int
    image_size: int
    batch_size: int
    dtype: str
    optimizer: str
    torch: str
    device: str
    base_bytes: int                      # RSS right before the first step (torch, model, empty optimizer)
    #                                      + the first steps' file-backed pages (torch's code)
    import_bytes: int                    # RSS after import torch + model build, before any step
    batch_bytes: int
    step_peak_bytes: int                 # optimizer-step transient, every unit updated
    units: list[UnitCost]
    checks: dict = field(default_factory=dict)   # measured vs replayed, per profiled configuration
    launcher_bytes: int = 0              # private memory of torchrun's agent; 0: not measured yet
    supervisor_bytes: int = 0            # the same of dsparse's launcher (runtime/supervise.py)
    eval_first_bytes: int = 0            # one-time growth of the first evaluation (eval-mode forward)
    first_step_file_bytes: int = 0       # file-backed pages the first steps map (in base_bytes)
    fast_allocator_bytes: int | None = None   # what glibc's defaults add to a full update (None: not measured)
    unit_seconds: dict = field(default_factory=dict)   # allocator -> `compute.measure_seconds` (time plans)
    format: int = PROFILE_FORMAT

    # --- the cost-model interface the planner uses -------------------------------------------
    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def training_bytes(self, updated: Iterable[int], comm=None) -> int:
        return training_bytes(self, updated, comm)

    def peak_bytes(self, updated: Iterable[int], comm=None) -> int:
        return peak_bytes(self, updated, comm)

    # --- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        d = dict(d)
        d["units"] = [UnitCost(**u) for u in d["units"]]
        return cls(**d)


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------
def torch_version() -> str:
    """The installed torch's version without importing it (fast)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        raise ConfigError("torch is not installed here", "install torch to plan") from None


def profile_key(model: str, num_classes: int, image_size: int, batch_size: int, dtype: str,
                optimizer: str, torch: str | None = None) -> str:
    from dsparse_cli.modelspec import file_digest

    inputs = {"model": model, "num_classes": num_classes, "image_size": image_size, "batch_size": batch_size,
              "dtype": dtype, "optimizer": optimizer, "torch": torch or torch_version(),
              "format": PROFILE_FORMAT, "malloc": MALLOC_ENV}
    digest = file_digest(model)
    if digest:   # a user's model file: an edit is a new model (named specs keep their keys)
        inputs["model_file_sha256"] = digest
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def profile_path(state_dir: str | Path, key: str) -> Path:
    return Path(state_dir) / "profiles" / f"{key}.json"


def load_profile(path: str | Path) -> Profile:
    return Profile.from_dict(json.loads(Path(path).read_text()))


def save_profile(profile: Profile, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(profile.to_json())
    os.replace(tmp, path)


def check_args(model: str, batch_size: int, image_size: int, dtype: str, optimizer: str) -> None:
    """The measuring options, checked without importing torch."""
    from dsparse_cli.contract import OPTIMIZERS

    check_model(model)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}", f"choose one of {', '.join(OPTIMIZERS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if batch_size < 1 or image_size < 8:
        raise ConfigError(f"batch size {batch_size} / image size {image_size} is too small",
                          "use --batch-size >= 1 and --image-size >= 8")


def check_model(model: str) -> None:
    """A hand-split or torchvision name, or a model file/module that can be found; no torch import."""
    from dsparse_cli import modelspec
    from dsparse_cli.contract import MODELS

    if model in MODELS:
        return
    try:
        kind = modelspec.parse(model)[0]
        modelspec.check(model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if kind == modelspec.NAME:
        names = modelspec.torchvision_names()
        if names is None:   # torchvision's source not readable as expected: ask it
            import torchvision

            names = set(torchvision.models.list_models(module=torchvision.models))
        if model not in names:
            raise ConfigError(f"unknown model {model!r}", "`dsparse models` lists the names; or pass FILE.py:factory")


def get_profile(state_dir: str | Path, model: str, *, num_classes: int = 10, image_size: int = 32,
                batch_size: int = 64, dtype: str = "float32", optimizer: str = "sgd-momentum",
                refresh: bool = False, timeout: float = 1800, launcher: str = "dsparse") -> Profile:
    """The cached profile under <state_dir>/profiles/<key>.json, measured first when missing.
    `launcher` "torchrun": torchrun's agent is measured too (~3 s: it imports torch) unless the
    cached profile has it, and kept in the cache, so the same inputs give the same plan byte for
    byte (a fresh measurement moves by a few KiB). Plans for dsparse's launcher never pay it."""
    check_args(model, batch_size, image_size, dtype, optimizer)
    key = profile_key(model, num_classes, image_size, batch_size, dtype, optimizer)
    path = profile_path(state_dir, key)
    prof = None
    if path.exists() and not refresh:
        try:
            prof = load_profile(path)
            prof = prof if prof.key == key else None
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a damaged cache entry is measured again
    if prof is None:
        run_profile_subprocess(path, model=model, num_classes=num_classes, image_size=image_size,
                               batch_size=batch_size, dtype=dtype, optimizer=optimizer, timeout=timeout)
        prof = load_profile(path)
    if launcher == "torchrun" and not prof.launcher_bytes:
        prof.launcher_bytes = measure_launcher_bytes("torchrun")
        save_profile(prof, path)
    return prof


def launcher_bytes(profile: Profile, launcher: str) -> int:
    """What the board's launcher keeps next to the worker, as measured with the (cached) profile
    (`get_profile(..., launcher=...)`); measured here, uncached, only for a profile that lacks it
    (one made by hand)."""
    if launcher == "torchrun":
        return profile.launcher_bytes or measure_launcher_bytes(launcher)
    return profile.supervisor_bytes or measure_launcher_bytes(launcher)


def measure_launcher_bytes(kind: str = "torchrun") -> int:
    """Private (anonymous) memory of the launcher that shares the board with the worker: a fresh
    interpreter that has imported what it imports. Its file-backed pages are the same libraries
    the worker maps, so only the private part adds to the board's use: ~300 MiB for torchrun's
    agent with the CUDA build of torch, a few MiB for dsparse's supervisor (standard library)."""
    module = "torch.distributed.run" if kind == "torchrun" else "dsparse_cli.runtime.supervise"
    code = (f"import {module}\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('RssAnon:')))")
    root = str(Path(__file__).resolve().parents[2])   # the dsparse_cli package's parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        raise ConfigError(f"could not measure the {kind} launcher's memory: "
                          f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return int(proc.stdout.strip()) * 1024


def allocator_env(allocator: str) -> dict[str, str]:
    """What a worker's environment holds for its allocator (contract.ALLOCATORS): lean, glibc
    returning freed memory at once as the profile measures it; fast, glibc's defaults."""
    return dict(MALLOC_ENV) if allocator == "lean" else {}


def child_env(allocator: str = "lean") -> dict[str, str]:
    """Environment for a measuring child: this repo importable, glibc set up for `allocator`."""
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | allocator_env(allocator)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_profile_subprocess(out: Path, *, model: str, num_classes: int, image_size: int, batch_size: int,
                           dtype: str, optimizer: str, timeout: float) -> None:
    argv = [sys.executable, "-m", "dsparse_cli.planning.measure", "--out", str(out), "--model", model,
            "--num-classes", str(num_classes), "--image-size", str(image_size), "--batch-size",
            str(batch_size), "--dtype", dtype, "--optimizer", optimizer]
    try:
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"profiling {model} took longer than {timeout:.0f} s",
                          "lower --batch-size or --image-size") from None
    if proc.returncode != 0 or not out.exists():
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise ConfigError(f"profiling {model} at batch {batch_size} failed: {last[0]}",
                          "check that the model runs here at this batch size")
