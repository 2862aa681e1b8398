"""How many CPUs this process may really use, and so how many threads the worker's torch runs.

torch sizes its thread pools from the CPUs in the affinity mask and ignores a cgroup's CPU quota,
so a worker in a container (or on an emulated board) allowed half a CPU of an 8-core machine
runs 8 threads and spends its steps switching between them. The rule is the probe's
(`probing/board_script.py: effective_cpus`), repeated here because the board script is one file
piped to boards and cannot be imported. Standard library only: the launcher sizes local boards
with it on the control side.
"""

from __future__ import annotations

import os

THREADS_ENV = "DSPARSE_THREADS"   # the launcher's per-board thread count (cluster.yaml `threads:`)


def effective_cpus(cpus: int | None, allowed: int | None, quota: float | None) -> int | None:
    """The CPUs a process may use: its affinity (else the machine's count), capped by a cgroup
    quota rounded down (1.5 CPUs keep one core busy, not two), at least 1; None if nothing is known."""
    limits = [n for n in (allowed or cpus,) if n]
    if quota:
        limits.append(max(1, int(quota)))
    return max(1, min(limits)) if limits else None


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _quota_file(directory: str, version: int) -> float | None:
    """One cgroup level's quota in CPUs: v2 `cpu.max` ("max 100000" | "150000 100000"), v1
    `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`."""
    if version == 2:
        parts = _read(os.path.join(directory, "cpu.max")).split()
        quota, period = (parts + ["100000"])[:2] if parts else ("max", "0")
    else:
        quota = _read(os.path.join(directory, "cpu.cfs_quota_us")).strip()
        period = _read(os.path.join(directory, "cpu.cfs_period_us")).strip()
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _cpu_cgroup(self_cgroup: str, mountinfo: str) -> tuple[int, str, str, str] | None:
    """-> (version, our cgroup path, its hierarchy's mount root, mount point) for the cpu
    controller; a v1 hierarchy carrying it wins (hybrid hosts mount an idle cgroup2 too)."""
    paths = {}
    for line in self_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and not controllers:
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup" and 1 in paths and "cpu" in tail[2].split(","):
            return 1, paths[1], fields[3], fields[4]
        if tail[0] == "cgroup2" and 2 in paths and 1 not in paths:
            return 2, paths[2], fields[3], fields[4]
    return None


def cgroup_cpu_quota(self_cgroup: str, mountinfo: str, fs_root: str = "") -> float | None:
    """The smallest CPU quota over our cgroup and its parents (a parent's applies to its children),
    or None. `fs_root` prefixes mount points (tests point it at a fixture tree)."""
    found = _cpu_cgroup(self_cgroup, mountinfo)
    if found is None:
        return None
    version, path, root, mount = found
    root = root.rstrip("/")
    # a container without a cgroup namespace mounts only its own subtree (root "/docker/<id>")
    rel = path[len(root):] if root and (path + "/").startswith(root + "/") else ("" if root else path)
    directory, top = os.path.normpath(fs_root + mount + "/" + rel), os.path.normpath(fs_root + mount)
    quotas = []
    while True:
        q = _quota_file(directory, version)
        if q is not None:
            quotas.append(q)
        if directory == top or not directory.startswith(top + "/"):
            return min(quotas) if quotas else None
        directory = os.path.dirname(directory)


def process_cpus() -> int:
    """The effective CPUs of this process now."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    quota = cgroup_cpu_quota(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
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
