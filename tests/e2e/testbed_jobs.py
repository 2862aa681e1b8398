"""A dsparse job on the emulated cluster, seen from outside: its record, the boards' heartbeats
(the boards' workdirs are on this machine's filesystem: the namespaces share it), its processes
(one PID namespace), the boards' memory cgroups."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

MiB = 1 << 20
HEADROOM = 0.15                      # `dsparse plan`'s default


def predicted_needs(state_dir: Path, batch_size: int, image_size: int = 32) -> tuple[int, int]:
    """What a board must hold for tiny_cnn (worker peak + dsparse's launcher) to train the last unit
    only, and every unit, from the profile measured here (as `dsparse plan` does; cached in
    `state_dir`)."""
    from dsparse_cli.planning.profile import get_profile, launcher_bytes

    prof = get_profile(state_dir, "tiny_cnn", batch_size=batch_size, image_size=image_size)
    n, launcher = prof.num_units, launcher_bytes(prof, "dsparse")
    return prof.peak_bytes([n - 1]) + launcher, prof.peak_bytes(range(n)) + launcher


def up_args(boards: int, memory_mib: int, delay: str = "2ms") -> list[str]:
    """One CPU per board (a quota): each worker runs one torch thread, as on a one-core board, not
    the two this machine's cores would give it: 3-4 boards x 2 threads on 2 cores spin."""
    return ["--boards", str(boards), "--memory", f"{memory_mib}MiB", "--rate", "100mbit", "--delay", delay,
            "--cpus", "1"]


def latest_job(d: Path) -> dict | None:
    jobs = d / ".dsparse" / "jobs"
    try:
        return json.loads((jobs / f"{(jobs / 'latest').read_text().strip()}.json").read_text())
    except (OSError, ValueError):
        return None


def heartbeat(run: dict) -> dict:
    try:
        return json.loads(Path(run["run_dir"], "status.json").read_text())
    except (OSError, ValueError):
        return {}


def board_run(job: dict, name: str) -> dict:
    return next(b for b in job["boards"] if b["name"] == name)


def steps(job: dict) -> list[int]:
    return [heartbeat(b).get("global_step") or 0 for b in job["boards"]]


def pids(job: dict) -> set[int]:
    """Every process the job recorded: launchers, workers (also from their heartbeats)."""
    return {p for b in job["boards"] for p in (b["pid"], b.get("worker_pid"), heartbeat(b).get("pid")) if p}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_recorded_leftovers(d: Path) -> None:
    """Safety net for a failed test: SIGKILL exactly the process groups the latest job records."""
    job = latest_job(d)
    for pid in pids(job) if job else ():
        try:
            ours = alive(pid) and str(d).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
            if ours:
                os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def oom_kills(cgroup: str) -> int:
    """OOM kills in a board's memory cgroup (v1 memory.oom_control, v2 memory.events)."""
    for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
        path = Path(cgroup, name)
        if path.exists():
            for line in path.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    raise AssertionError(f"no OOM counter in {cgroup}")


def peak_usage(cgroup: str) -> int | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        path = Path(cgroup, name)
        if path.exists():
            return int(path.read_text())
    return None
