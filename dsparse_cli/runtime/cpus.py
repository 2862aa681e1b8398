"""How many CPUs this process may really use, and so how many threads the worker's torch runs.

torch sizes its thread pools from the CPUs in the affinity mask and ignores a cgroup's CPU quota,
so a worker in a container (or on an emulated board) allowed half a CPU of an 8-core machine
runs 8 threads and spends its steps switching between them. The rule and the cgroup readers are
the probe's (`probing/board_script.py`, standard library only, shipped with the runtime for this):
the worker sizes its threads exactly as `dsparse probe` reported, and the launcher sizes local
boards with it on the control side.
"""

from __future__ import annotations

import os

from dsparse_cli.probing.board_script import cgroup_cpu_quota as _quota_of_levels
from dsparse_cli.probing.board_script import effective_cpus, find_cgroup, locate_cgroup

THREADS_ENV = "DSPARSE_THREADS"   # the launcher's per-board thread count (cluster.yaml `threads:`)


def cgroup_cpu_quota(self_cgroup: str, mountinfo: str, fs_root: str = "") -> float | None:
    """The smallest CPU quota over our cgroup and its parents (a parent's applies to its children),
    or None. `self_cgroup`/`mountinfo`: texts of /proc/self/cgroup and /proc/self/mountinfo;
    `fs_root` prefixes mount points (tests point it at a fixture tree)."""
    return _quota_of_levels(*locate_cgroup("cpu", self_cgroup, mountinfo, fs_root))


def process_cpus() -> int:
    """The effective CPUs of this process now."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    quota = _quota_of_levels(*find_cgroup("cpu"))
    return effective_cpus(os.cpu_count(), allowed, quota) or 1


def wanted_threads(env: dict | None = None) -> int:
    """The launcher's THREADS_ENV, else this process's effective CPUs. A value that is not a
    whole number of at least 1 is a ValueError."""
    text = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
    if not text:
        return process_cpus()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{THREADS_ENV}={text!r} is not a whole number of at least 1")
    return int(text)
