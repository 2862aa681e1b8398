"""Cgroups for emulated boards: memory limits, v1 (`memory.limit_in_bytes`) or v2 (`memory.max`),
and CPU allowances, v1 (`cpu.cfs_quota_us`) or v2 (`cpu.max`).

The testbed makes one parent `<prefix>` with a child per board (and one for the link
emulator) directly under the hierarchy root, so the cgroups outlive the shell that ran `up`.
Swap is capped too (memsw / swap.max) so the limit is real. A v1 host mounts the cpu controller
in a hierarchy of its own: the same `<prefix>/<board>` tree is made there too.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TestbedError

CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Hierarchy:
    version: int          # 1 or 2
    mountpoint: str       # where the controller's hierarchy is mounted


def mountinfo(text: str | None = None) -> list[tuple[str, str, str, str]]:
    """-> [(root, mountpoint, fstype, superoptions)] from /proc/self/mountinfo."""
    if text is None:
        text = Path("/proc/self/mountinfo").read_text()
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if sep and len(fields) >= 5 and len(rest) >= 3:
            out.append((fields[3], fields[4], rest[0], rest[2]))
    return out


def find_hierarchy(mounts=None, controller: str = "memory") -> Hierarchy:
    """The controller's hierarchy: a v1 one carrying it wins (hybrid hosts), else cgroup2."""
    mounts = mountinfo() if mounts is None else mounts
    for _, mp, fstype, opts in mounts:
        if fstype == "cgroup" and controller in opts.split(","):
            return Hierarchy(1, mp)
    for _, mp, fstype, _ in mounts:
        if fstype == "cgroup2":
            controllers = _read(Path(mp) / "cgroup.controllers").split()
            if controller in controllers:
                return Hierarchy(2, mp)
    raise TestbedError(f"no cgroup {controller} controller is mounted (need cgroup v1 '{controller}' or "
                       f"cgroup2 with the {controller} controller)")


def create_parent(h: Hierarchy, prefix: str, controllers: tuple[str, ...] = ("memory",)) -> str:
    """`<mount>/<prefix>`; on cgroup2 with `controllers` enabled for it and for its children."""
    root = Path(h.mountpoint)
    if h.version == 2:
        _enable(root, controllers)
    parent = root / prefix
    try:
        parent.mkdir()
    except FileExistsError:
        raise TestbedError(f"cgroup {parent} already exists (a testbed with this --dir is up, or a "
                           f"crashed one: run `edge-testbed down` for it, or rmdir it)") from None
    except OSError as e:
        raise TestbedError(f"cannot create cgroup {parent}: {e.strerror}") from None
    if h.version == 2:
        _enable(parent, controllers)
    return str(parent)


def create_child(h: Hierarchy, parent: str, name: str, limit: int | None) -> str:
    path = Path(parent) / name
    path.mkdir(exist_ok=True)
    if limit is not None:
        set_limit(h.version, str(path), limit)
    return str(path)


def set_limit(h_version: int, path: str, limit: int) -> None:
    """The cgroup's memory limit, swap included (no swap beyond it). v1 keeps memsw >= memory at
    every moment, so a lower limit is written memory first, a higher one memsw first."""
    p = Path(path)
    if h_version == 2:
        _write(p / "memory.max", limit)
        if (p / "memory.swap.max").exists():
            _write(p / "memory.swap.max", 0)
        return
    memsw = p / "memory.memsw.limit_in_bytes"
    names = ["memory.limit_in_bytes"] + (["memory.memsw.limit_in_bytes"] if memsw.exists() else [])
    if memsw.exists() and limit > int(_read(memsw).strip() or 0):
        names.reverse()
    for name in names:
        _write(p / name, limit)


def set_cpus(h_version: int, path: str, cpus: float) -> None:
    """A CPU allowance of `cpus` CPUs per CPU_PERIOD_US (the usual 100 ms)."""
    quota = max(1000, round(cpus * CPU_PERIOD_US))
    if h_version == 1:
        _write(Path(path) / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(Path(path) / "cpu.cfs_quota_us", quota)
    else:
        _write(Path(path) / "cpu.max", f"{quota} {CPU_PERIOD_US}")


def cpus_of(h_version: int, path: str) -> float | None:
    """The allowance `set_cpus` wrote, in CPUs; None when unlimited or unreadable."""
    if h_version == 1:
        quota, period = _read(Path(path) / "cpu.cfs_quota_us"), _read(Path(path) / "cpu.cfs_period_us")
    else:
        quota, _, period = _read(Path(path) / "cpu.max").strip().partition(" ")
    quota, period = quota.strip(), period.strip()
    return int(quota) / int(period) if quota.isdigit() and period.isdigit() and int(period) else None


def limit_of(h_version: int, path: str) -> int | None:
    name = "memory.limit_in_bytes" if h_version == 1 else "memory.max"
    text = _read(Path(path) / name).strip()
    return int(text) if text.isdigit() else None


def usage_of(h_version: int, path: str) -> int | None:
    name = "memory.usage_in_bytes" if h_version == 1 else "memory.current"
    text = _read(Path(path) / name).strip()
    return int(text) if text.isdigit() else None


def procs(path: str) -> list[int]:
    return [int(p) for p in _read(Path(path) / "cgroup.procs").split() if p.isdigit()]


def anon_bytes(path: str) -> int:
    """Private (anonymous) resident memory of the processes in the cgroup now: what the board's
    own system (its sshd) holds, page cache left out (the kernel reclaims it under the limit)."""
    total = 0
    for pid in procs(path):
        status = _read(Path(f"/proc/{pid}/status"))
        total += next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("RssAnon:")), 0)
    return total


def kill_all(paths: list[str], timeout: float = 10.0) -> None:
    """SIGKILL every process in the testbed's own cgroups until they are empty (board power-off)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for p in paths for pid in procs(p)]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove(paths: list[str], timeout: float = 10.0) -> list[str]:
    """rmdir each cgroup (children first); -> those that could not be removed."""
    left = []
    for p in paths:
        deadline = time.monotonic() + timeout
        while os.path.isdir(p):
            try:
                os.rmdir(p)
            except OSError as e:
                if time.monotonic() > deadline:
                    left.append(f"{p} ({e.strerror})")
                    break
                time.sleep(0.1)
    return left


def replicate_mounts_script(h: Hierarchy, mounts=None, also: tuple[str, ...] = ()) -> str:
    """Shell lines that re-create the host's /sys/fs/cgroup mounts.

    `ip netns exec` mounts a fresh sysfs on /sys (so /sys/class/net shows the board's own
    interfaces), which hides the cgroup filesystems below it. Without them the probe on the
    board could not read its memory limit, so the board's sshd mounts them again first.
    """
    mounts = mountinfo() if mounts is None else mounts
    lines = []
    for _, mp, fstype, opts in mounts:
        if not (mp == "/sys/fs/cgroup" or mp.startswith("/sys/fs/cgroup/")):
            continue
        if fstype == "tmpfs":
            lines.append(f"mount -t tmpfs -o mode=755 cgroup_root {mp}")
            lines += _symlinks(mp)
        elif fstype in ("cgroup", "cgroup2"):
            must = mp == h.mountpoint or mp in also    # the hierarchies the boards are limited in
            tail = "" if must else " 2>/dev/null || true"
            lines.append(f"mkdir -p {mp} && mount -t {fstype} -o {opts} {fstype} {mp}{tail}")
    return "\n".join(lines)


def _symlinks(mp: str) -> list[str]:
    """Hybrid hosts link e.g. cpu -> cpu,cpuacct inside the tmpfs: keep those links."""
    out = []
    try:
        for entry in os.scandir(mp):
            if entry.is_symlink():
                out.append(f"ln -s {os.readlink(entry.path)} {entry.path}")
    except OSError:
        pass
    return out


def _enable(path: Path, controllers: tuple[str, ...]) -> None:
    control = path / "cgroup.subtree_control"
    for controller in controllers:
        if controller in _read(control).split():
            continue
        try:
            _write(control, f"+{controller}")
        except TestbedError as e:
            raise TestbedError(f"cannot enable the {controller} controller in {control} ({e}); on a "
                               f"cgroup2 host run the testbed from a delegated cgroup or as real root") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise TestbedError(f"cannot write {value} to {path}: {e.strerror}") from None
