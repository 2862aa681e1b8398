"""`dsparse plan --verify`: run one real training step per device under its plan, each in a fresh
process on the board itself, and put measured next to predicted memory.

Where the step runs: an SSH board runs it with its own python, memory, CPUs and cgroup (the SSH
session lands where the board's sshd runs), from the runtime shipped as for a job; a local board
is this machine, so its step is a subprocess here.

Both sides use the worker's split (see `replay` and `verify_step`):
* training bytes = the peak of private memory above the base point (model and optimizer made,
  nothing run; the worker's meter, `runtime/memory.py`) over the steps: the first step's one-time
  bytes, optimizer state, the step's peak of batch, activations, gradients and working set. One process here has no other board and no evaluation, so the
  prediction it is held to is the plan's without those parts (`replay.single_process_bytes`).
* step bytes = the measured step's peak above the resident memory before it (one-time bytes and
  optimizer state already there): the stricter comparison.
* peak bytes = whole process: predicted base + those training bytes vs VmHWM over the steps.
"""

from __future__ import annotations

import shlex
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from dsparse_cli.errors import JobError
from dsparse_cli.inventory import Target
from dsparse_cli.planning.planfile import plan_json
from dsparse_cli.planning.profile import allocator_env
from dsparse_cli.planning.replay import single_process_bytes
from dsparse_cli.planning.step import run_step, step_result
from dsparse_cli.remote.base import Transport
from dsparse_cli.remote.parallel import results_of
from dsparse_cli.runtime.cpus import THREADS_ENV, process_cpus

TOLERANCE = 0.10


def _pct(measured: int, predicted: int) -> float:
    return round(100.0 * (measured - predicted) / predicted, 2) if predicted else 0.0


def run_step_on_board(transport: Transport, target: Target, plan_path: Path, rank: int, *,
                      device: str = "cpu", timeout: float = 600, allocator: str = "lean") -> dict:
    """The step on an SSH board: the runtime shipped to <workdir>/pkg as for a job (and kept
    there for it), the plan to <workdir>/verify/plan.json, run by the board's python."""
    from dsparse_cli.jobs.shipping import ship_runtime
    from dsparse_cli.remote.shell import sh_path

    workdir = target.workdir.rstrip("/")
    pkg, remote_plan = f"{workdir}/pkg", f"{workdir}/verify/plan.json"
    staging = plan_path.parent / target.name   # its own: boards are verified at once
    staging.mkdir(exist_ok=True)
    ship_runtime(transport, pkg, staging)
    transport.put(str(plan_path), remote_plan)
    env = [f"{k}={shlex.quote(v)}" for k, v in allocator_env(allocator).items()] + [f"PYTHONPATH={sh_path(pkg)}"]
    if target.threads:
        env.append(f"{THREADS_ENV}={target.threads}")
    cmd = " ".join(["env", *env, shlex.quote(target.python), "-m", "dsparse_cli.runtime.verify_step",
                    "--plan", sh_path(remote_plan), "--rank", str(rank), "--device", shlex.quote(device)])
    res = transport.run(cmd, timeout=timeout)
    if res.timed_out:
        raise JobError(f"verify step on {target.name} took longer than {timeout:.0f} s")
    return step_result(res.rc, res.stdout, res.stderr, f"on {target.name}")


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
            "host": measured.get("host"), "cgroup": measured.get("cgroup"),
            # a fast board's figure holds an estimate of its allocator's extra: held to it from above only
            "within_tolerance": (err if device.get("allocator") == "fast" else abs(err)) <= 100 * TOLERANCE}


def verify_plan(doc: dict, *, boards: dict[str, Target] | None = None, connect: Callable | None = None,
                ranks: Iterable[int] | None = None, device: str = "cpu", timeout: float = 600,
                progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One measured step per device, all at once: each is its own process, whose memory the
    others do not change (local boards share this machine's cores, at most one step per CPU).
    A device whose board in `boards` is an SSH board runs it there, through `connect(target)`
    (a Transport context manager); the others here. Returns `compare` rows in rank order;
    `progress(row)` is called as each ends. The first failure is raised once all have ended."""
    wanted = set(ranks) if ranks is not None else None
    devices = [d for d in doc["devices"] if wanted is None or d["rank"] in wanted]
    with tempfile.TemporaryDirectory(prefix="dsparse-verify-") as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(plan_json(doc))
        # local steps share this machine: as many at once as there are CPUs, one thread each
        # (more threads than cores spin and take twice the CPU time)
        local = [d for d in devices if not _remote((boards or {}).get(d["name"]), connect)]
        cpus = process_cpus()
        slots = max(1, min(cpus, len(local)))
        local_slots = threading.BoundedSemaphore(slots)

        def one(dev: dict) -> dict:
            target = (boards or {}).get(dev["name"])
            if _remote(target, connect):
                with connect(target) as transport:
                    measured = run_step_on_board(transport, target, path, dev["rank"], device=device, timeout=timeout,
                                                 allocator=dev.get("allocator", "lean"))
            else:
                with local_slots:
                    measured = run_step(path, dev["rank"], device=device, timeout=timeout,
                                        threads=max(1, cpus // slots), allocator=dev.get("allocator", "lean"))
            row = compare(dev, measured)
            if progress:
                progress(row)
            return row

        with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
            return results_of([pool.submit(one, dev) for dev in devices])


def _remote(target: Target | None, connect: Callable | None) -> bool:
    return target is not None and not target.local and connect is not None


def merge_verify(doc: dict, rows: list[dict]) -> dict:
    """Copy the measured fields into the plan's device entries (for display / --json)."""
    by_rank = {r["rank"]: r for r in rows}
    keys = ("measured_training_bytes", "measured_peak_bytes", "error_pct", "peak_error_pct",
            "measured_step_bytes", "step_error_pct", "within_tolerance")
    for dev in doc["devices"]:
        row = by_rank.get(dev["rank"])
        if row:
            dev.update({k: row[k] for k in keys})
            dev["verified_on"] = {"host": row.get("host"), "cgroup": row.get("cgroup")}
            # what one process was held to: the plan's prediction less aggregation and evaluation
            dev["verify_predicted_training_bytes"] = row["predicted_training_bytes"]
    return doc
