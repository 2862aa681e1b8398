"""Measured per-unit memory costs of training a model, and the training memory of a plan.

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

Process level: `base_bytes` = RSS at the start of a warm step minus weights and optimizer state
(interpreter, torch, kernels, allocator slack); `batch_bytes` = input images + labels;
`step_peak_bytes` = the optimizer step's own transient with every unit updated.

What "training bytes" means
---------------------------
`training_bytes(profile, S)` = the peak, over one training step of the plan that updates units S,
of the process memory above `base_bytes`:

    W_all + Σ_{u∈S} O_u + max over the step's timeline of (batch + live activations + gradients)

W_all is every parameter and buffer (forward needs them all), O_u the optimizer state of updated
units (resident between steps). The timeline is replayed from the measured per-unit terms: during
the forward, region *u* peaks at (saved bytes kept by earlier regions + its entering activation +
its measured forward peak); during the backward, region *u* peaks at (saved bytes of regions ≤ u
still held + gradients G of updated units after it + the gradient flowing in + its measured
backward peak); the optimizer step peaks at (Σ_{u∈S} G_u + its transient). Units before the
earliest updated unit run in "frozen" mode (nothing saved), units after it that are not updated in
"passthrough" mode. This is the design's Σ(G+O) + A(S) + work + W_all with the sum replaced by the
maximum over time that a process really reaches: gradients of early units do not exist yet when
the saved activations peak, and the forward working set of frozen units is gone before the
backward starts. On MobileNetV2 (batch 64, 32x32) the plain sum W+G+O+A+batch is off by +5..+12 %
for early first units and, without a working-set term, -9..-45 % for late ones (where the frozen
forward dominates); adding the forward working set makes the early ones +18..+52 %. The replay
is within 2 % of measured steps (see `checks` and `dsparse plan --verify`).

`peak_bytes(profile, S) = base_bytes + training_bytes(profile, S)`: whole-process bytes, the unit
of budgets. Gradients are assumed freed between steps (`zero_grad(set_to_none=True)`).

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

PROFILE_FORMAT = 3   # 2: launcher_bytes; 3: supervisor_bytes
# glibc: serve every block >= 64 KiB by mmap and give freed memory back, so RSS follows live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "131072"}
DTYPES = ("float32", "float64", "bfloat16")
UPDATED, PASSTHROUGH, FROZEN = "updated", "passthrough", "frozen"


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
    base_bytes: int                      # warm process base (whole process minus weights/opt state)
    import_bytes: int                    # RSS after import torch + model build, before any step
    batch_bytes: int
    step_peak_bytes: int                 # optimizer-step transient, every unit updated
    units: list[UnitCost]
    checks: dict = field(default_factory=dict)   # measured vs replayed, per profiled configuration
    launcher_bytes: int = 0              # private memory of torchrun's agent (it runs next to the worker)
    supervisor_bytes: int = 0            # the same of dsparse's launcher (runtime/supervise.py)
    format: int = PROFILE_FORMAT

    # --- the cost-model interface the planner uses -------------------------------------------
    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def training_bytes(self, updated: Iterable[int]) -> int:
        return training_bytes(self, updated)

    def peak_bytes(self, updated: Iterable[int]) -> int:
        return peak_bytes(self, updated)

    # --- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        d = dict(d)
        d["units"] = [UnitCost(**u) for u in d["units"]]
        return cls(**d)


# ------------------------------------------------------------------------------------------
# Training memory of a plan (pure python)
# ------------------------------------------------------------------------------------------
def weight_bytes(profile: Profile) -> int:
    return sum(u.param_bytes + u.buffer_bytes for u in profile.units)


def _modes(n: int, updated: set[int]) -> list[str]:
    first = min(updated) if updated else n
    return [FROZEN if v < first else (UPDATED if v in updated else PASSTHROUGH) for v in range(n)]


def _kept_by_region(units: list[UnitCost], modes: list[str]) -> list[int]:
    """Bytes each region leaves saved for backward under these modes; each entering activation
    is counted once, by the region that saves it first."""
    kept = [0] * len(units)
    for v, (u, m) in enumerate(zip(units, modes)):
        if m == FROZEN:
            continue
        prev_keeps = v > 0 and modes[v - 1] != FROZEN and units[v - 1].saves_output[modes[v - 1]]
        kept[v] = u.saved[m] + (u.input_bytes if u.saves_input[m] and not prev_keeps else 0)
        if v + 1 < len(units) and u.saves_output[m]:
            kept[v] += units[v + 1].input_bytes
    return kept


def live_peak_bytes(profile: Profile, updated: Iterable[int]) -> int:
    """Peak over the step of batch + activations + gradients (everything but W_all and O)."""
    units, updated = profile.units, set(updated)
    n = len(units)
    modes = _modes(n, updated)
    kept = _kept_by_region(units, modes)
    peak, held = profile.batch_bytes, 0
    for v, (u, m) in enumerate(zip(units, modes)):                      # forward
        in_kept = v == 0 or (modes[v - 1] != FROZEN and units[v - 1].saves_output[modes[v - 1]])
        start = profile.batch_bytes + held + (0 if in_kept else u.input_bytes)
        peak = max(peak, start + u.forward_peak[m])
        held += kept[v]
    grads = 0
    for v in range(n - 1, -1, -1):                                        # backward
        m = modes[v]
        if m == FROZEN:
            break
        grad_in = units[v + 1].input_bytes if v + 1 < n else 0
        peak = max(peak, profile.batch_bytes + held + grads + grad_in + units[v].backward_peak[m])
        held -= kept[v]
        if m == UPDATED:
            grads += units[v].grad_bytes
    if updated:                                                            # optimizer step
        g_all = sum(u.grad_bytes for u in units) or 1
        peak = max(peak, profile.batch_bytes + grads + profile.step_peak_bytes * grads // g_all)
    return peak


def training_bytes(profile: Profile, updated: Iterable[int]) -> int:
    """Peak process bytes above the base for one step updating `updated` (see module doc)."""
    updated = set(updated)
    opt = sum(profile.units[v].optimizer_bytes for v in updated)
    return weight_bytes(profile) + opt + live_peak_bytes(profile, updated)


def peak_bytes(profile: Profile, updated: Iterable[int]) -> int:
    """Whole-process peak: measured base + training bytes."""
    return profile.base_bytes + training_bytes(profile, updated)


def breakdown(profile: Profile, updated: Iterable[int]) -> dict[str, int]:
    """The parts of training bytes, for display: weights, gradients, optimizer state, saved
    activations A(S), and the rest of the peak (batch and working set; negative when the peak
    comes before every gradient exists)."""
    updated = set(updated)
    modes = _modes(profile.num_units, updated)
    parts = {
        "weights": weight_bytes(profile),
        "gradients": sum(profile.units[v].grad_bytes for v in updated),
        "optimizer": sum(profile.units[v].optimizer_bytes for v in updated),
        "saved_activations": sum(_kept_by_region(profile.units, modes)),
    }
    parts["working_set"] = training_bytes(profile, updated) - sum(parts.values())
    return parts


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
                refresh: bool = False, timeout: float = 1800) -> Profile:
    """The cached profile under <state_dir>/profiles/<key>.json, measured first when missing."""
    check_args(model, batch_size, image_size, dtype, optimizer)
    key = profile_key(model, num_classes, image_size, batch_size, dtype, optimizer)
    path = profile_path(state_dir, key)
    if path.exists() and not refresh:
        try:
            prof = load_profile(path)
            if prof.key == key:
                return prof
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a damaged cache entry is measured again
    run_profile_subprocess(path, model=model, num_classes=num_classes, image_size=image_size,
                           batch_size=batch_size, dtype=dtype, optimizer=optimizer, timeout=timeout)
    return load_profile(path)


def launcher_bytes(profile: Profile, launcher: str) -> int:
    """What the board's launcher keeps next to the worker, as measured with the (cached) profile,
    so the same inputs give the same plan byte for byte (a fresh measurement moves by a few KiB)."""
    if launcher == "torchrun":
        return profile.launcher_bytes
    return profile.supervisor_bytes or measure_launcher_bytes(launcher)   # 0: a profile made by hand


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


def child_env() -> dict[str, str]:
    """Environment for a measuring child: this repo importable, glibc returning memory."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **MALLOC_ENV}
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
