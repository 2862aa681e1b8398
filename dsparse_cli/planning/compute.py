"""The compute side of `--objective time`: how long one training step of a plan takes on a board.

Measured, like the memory costs: a fresh process on this machine, one torch thread and the
board's allocator, times every unit's forward and backward in the profile's three configurations
(`measure._run_config`: every unit updated, only unit 0 updated so the rest pass gradients
through, nothing updated), the quicker of two steps each. A plan's step on this machine is then

    frozen forward of the units before its first updated unit
    + forward and backward of every later unit (updated or passing gradients through)
    + the optimizer step, in proportion to the parameters it updates,

and a board takes that divided by its CPU share: its cgroup quota where below one CPU (what the
edge testbed emulates), else one. Not modelled: a board's per-core speed against this machine's
(a Pi's core is slower than an x86's), more than one thread per worker, and compute overlapping
aggregation. `bench/edge.py` prints each board's prediction next to its measured compute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

from dsparse_cli.errors import ConfigError

MODES = ("updated", "passthrough", "frozen")


def compute_seconds(seconds: dict, updated: Iterable[int]) -> float:
    """One step's compute on this machine (one thread) for a board updating `updated`.
    `seconds`: a profile's `unit_seconds[allocator]` (see `measure_seconds`)."""
    fwd, bwd = seconds["forward"], seconds["backward"]
    updated = set(updated)
    n = len(fwd["frozen"])
    first = min(updated, default=n)
    total = sum(fwd["frozen"][:first])
    for u in range(first, n):
        mode = "updated" if u in updated else "passthrough"
        total += fwd[mode][u] + bwd[mode][u]
    params = seconds["param_bytes"]
    return total + seconds["optimizer"] * sum(params[u] for u in updated) / max(1, sum(params))


def cpu_share(quota: float | None) -> float:
    """The share of one CPU a board's worker gets: its cgroup quota below one CPU, else 1."""
    return min(1.0, quota) if quota and quota > 0 else 1.0


@dataclass(frozen=True)
class BoardCompute:
    """What the planner knows of each board's compute, by rank: its allocator's `unit_seconds`
    and its CPU share."""
    seconds: Sequence[dict]
    shares: Sequence[float]

    def per_board(self, units: Sequence[Iterable[int]]) -> list[float]:
        """Each board's predicted compute per step when it updates `units[rank]`."""
        return [compute_seconds(s, u) / share for s, u, share in zip(self.seconds, units, self.shares)]


def measure_seconds(model: str, *, num_classes: int, image_size: int, batch_size: int, dtype: str,
                    optimizer: str, allocator: str, timeout: float = 900) -> dict:
    """`unit_seconds` for `allocator`, measured in a fresh process here (`_measure` sets one torch
    thread)."""
    from dsparse_cli.planning.profile import child_env
    from dsparse_cli.planning.step import child_json

    argv = [sys.executable, "-m", "dsparse_cli.planning.compute", "--model", model, "--num-classes",
            str(num_classes), "--image-size", str(image_size), "--batch-size", str(batch_size), "--dtype", dtype,
            "--optimizer", optimizer]
    try:
        proc = subprocess.run(argv, env=child_env(allocator), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"timing {model}'s units took longer than {timeout:.0f} s") from None
    seconds = child_json(proc.returncode, proc.stdout, proc.stderr, f"timing {model}'s units failed", ConfigError)
    return seconds | {"allocator": allocator}


def _measure(model_name: str, num_classes: int, image_size: int, batch_size: int, dtype: str,
             optimizer: str) -> dict:
    import torch

    from dsparse_cli.planning.measure import _make_batch, _Recorder, _run_config, _tensor_bytes
    from dsparse_cli.runtime.models import build_model, split_units, unit_params

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    model = build_model(model_name, num_classes).to(tdtype)
    units = split_units(model, model_name)
    n = len(units)
    gen = torch.Generator().manual_seed(0)
    rec = _Recorder(model, units, rss=False)
    runs = {mode: _run_config(torch, model, units, updated, optimizer, rec,
                              lambda: _make_batch(torch, batch_size, image_size, num_classes, tdtype, gen))[0]
            for mode, updated in zip(MODES, (set(range(n)), {0}, set()))}
    sec = {mode: r["seconds"] for mode, r in runs.items()}
    return {"forward": {m: [sec[m].get(("fwd", u), 0.0) for u in range(n)] for m in MODES},
            "backward": {m: [sec[m].get(("bwd", u), 0.0) for u in range(n)] for m in MODES[:2]},
            "optimizer": sec["updated"].get(("opt",), 0.0),
            "param_bytes": [_tensor_bytes(unit_params(model, u)) for u in units],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsparse_cli.planning.compute")
    for name, kind, default in (("--model", str, None), ("--num-classes", int, 10), ("--image-size", int, 32),
                                ("--batch-size", int, 64), ("--dtype", str, "float32"),
                                ("--optimizer", str, "sgd-momentum")):
        ap.add_argument(name, type=kind, default=default, required=default is None)
    a = ap.parse_args(argv)
    print(json.dumps(_measure(a.model, a.num_classes, a.image_size, a.batch_size, a.dtype, a.optimizer)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

