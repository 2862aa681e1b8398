"""One measured training step in a fresh process on this machine (`runtime/verify_step.py`), and
what the fast allocator adds to a full update. `verify.py` runs such steps for a plan's devices,
here or on the boards; the planner asks here for the allocator's figure (no SSH, no jobs)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dsparse_cli.errors import JobError
from dsparse_cli.planning.profile import Profile, child_env
from dsparse_cli.runtime.cpus import THREADS_ENV


def run_step(plan_path: str | Path, rank: int, *, device: str = "cpu", timeout: float = 600,
             threads: int | None = None, allocator: str = "lean") -> dict:
    """The step in a subprocess here; `threads`: its torch threads (default: this machine's CPUs)."""
    argv = [sys.executable, "-m", "dsparse_cli.runtime.verify_step", "--plan", str(plan_path),
            "--rank", str(rank), "--device", device]
    env = child_env(allocator) | ({THREADS_ENV: str(threads)} if threads else {})
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise JobError(f"verify step for rank {rank} took longer than {timeout:.0f} s") from None
    return step_result(proc.returncode, proc.stdout, proc.stderr, f"rank {rank}")


def fast_allocator_bytes(profile: Profile, timeout: float = 600) -> int:
    """What glibc's defaults (`allocator: fast`) add to a full update's training memory: the same
    step measured here under both allocators, each in a fresh process with one torch thread (more
    threads measured less here), the fast one twice and the larger kept. An estimate, not a bound:
    with the defaults the peak depends on the order of allocations and moves by ~15 % from run to
    run (BENCHMARKS); the planner adds it to every fast board, `--verify` shows each board's own."""
    units = [{"index": u.index, "name": u.name, "modules": list(u.modules)} for u in profile.units]
    doc = {"model": profile.model, "num_classes": profile.num_classes, "image_size": profile.image_size,
           "batch_size": profile.batch_size, "optimizer": profile.optimizer, "dtype": profile.dtype,
           "units": units, "devices": [{"name": "full update", "rank": 0, "units": [u["index"] for u in units]}]}
    with tempfile.TemporaryDirectory(prefix="dsparse-allocator-") as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(json.dumps(doc))
        lean = run_step(path, 0, timeout=timeout, threads=1)["measured_training_bytes"]
        fast = max(run_step(path, 0, timeout=timeout, threads=1, allocator="fast")["measured_training_bytes"]
                   for _ in range(2))
    return max(0, fast - lean)


def step_result(rc: int, stdout: str, stderr: str, where: str) -> dict:
    return child_json(rc, stdout, stderr, f"verify step {where} failed", JobError)


def child_json(rc: int, stdout: str, stderr: str, failed: str, error: type[Exception]) -> dict:
    """The last JSON line a measuring child printed; else `error` saying `failed` and the child's
    last line of stderr."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if rc != 0 or not lines:
        last = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or [f"exit code {rc}, no output"]
        raise error(f"{failed}: {last[0]}")
    return json.loads(lines[-1])
