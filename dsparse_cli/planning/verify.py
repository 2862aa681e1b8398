"""`dsparse plan --verify`: run one real training step per device under its plan, each in a fresh
subprocess on this machine, and put measured next to predicted memory.

Both sides use the worker's split (see `replay` and `verify_step`):
* training bytes = the peak above the base point (model and optimizer made, nothing run) over the
  steps: the first step's one-time bytes, optimizer state, the step's peak of batch, activations,
  gradients and working set. One process here has no other board and no evaluation, so the
  prediction it is held to is the plan's without those parts (`replay.single_process_bytes`).
* step bytes = the measured step's peak above the resident memory before it (one-time bytes and
  optimizer state already there): the stricter comparison.
* peak bytes = whole process: predicted base + those training bytes vs VmHWM over the steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from dsparse_cli.errors import JobError
from dsparse_cli.planning.planfile import plan_json
from dsparse_cli.planning.profile import child_env
from dsparse_cli.planning.replay import single_process_bytes

TOLERANCE = 0.10


def _pct(measured: int, predicted: int) -> float:
    return round(100.0 * (measured - predicted) / predicted, 2) if predicted else 0.0


def run_step(plan_path: str | Path, rank: int, *, device: str = "cpu", timeout: float = 600) -> dict:
    argv = [sys.executable, "-m", "dsparse_cli.planning.verify_step", "--plan", str(plan_path),
            "--rank", str(rank), "--device", device]
    try:
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise JobError(f"verify step for rank {rank} took longer than {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise JobError(f"verify step for rank {rank} failed: {last[0]}")
    return json.loads(lines[-1])


def compare(device: dict, measured: dict) -> dict:
    """Predicted (from the plan's device entry) next to measured (from `run_step`)."""
    parts = device.get("predicted_breakdown") or {}
    pred_train = single_process_bytes(parts) if parts else device["predicted_training_bytes"]
    pred_peak = device["predicted_peak_bytes"] - device["predicted_training_bytes"] + pred_train
    m_train, m_peak = measured["measured_training_bytes"], measured["measured_peak_bytes"]
    pred_step = pred_train - parts.get("first_step", 0) - parts.get("optimizer", 0)
    m_step = measured["measured_step_bytes"]
    err = _pct(m_train, pred_train)
    return {"name": device["name"], "rank": device["rank"], "units": device["units"],
            "predicted_training_bytes": pred_train, "measured_training_bytes": m_train, "error_pct": err,
            "predicted_peak_bytes": pred_peak, "measured_peak_bytes": m_peak,
            "peak_error_pct": _pct(m_peak, pred_peak), "predicted_step_bytes": pred_step,
            "measured_step_bytes": m_step, "step_error_pct": _pct(m_step, pred_step),
            "measured_base_bytes": measured.get("measured_base_bytes"), "device": measured.get("device", "cpu"),
            "within_tolerance": abs(err) <= 100 * TOLERANCE}


def verify_plan(doc: dict, *, ranks: Iterable[int] | None = None, device: str = "cpu", timeout: float = 600,
                progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One measured step per device (one at a time: they would compete for the cores).
    Returns `compare` rows in rank order; `progress(row)` is called after each."""
    wanted = set(ranks) if ranks is not None else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsparse-verify-") as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(plan_json(doc))
        for dev in doc["devices"]:
            if wanted is not None and dev["rank"] not in wanted:
                continue
            row = compare(dev, run_step(path, dev["rank"], device=device, timeout=timeout))
            rows.append(row)
            if progress:
                progress(row)
    return rows


def merge_verify(doc: dict, rows: list[dict]) -> dict:
    """Copy the measured fields into the plan's device entries (for display / --json)."""
    by_rank = {r["rank"]: r for r in rows}
    keys = ("measured_training_bytes", "measured_peak_bytes", "error_pct", "peak_error_pct",
            "measured_step_bytes", "step_error_pct", "within_tolerance")
    for dev in doc["devices"]:
        row = by_rank.get(dev["rank"])
        if row:
            dev.update({k: row[k] for k in keys})
            # what one process was held to: the plan's prediction less aggregation and evaluation
            dev["verify_predicted_training_bytes"] = row["predicted_training_bytes"]
    return doc
