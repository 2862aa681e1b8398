"""The worker's torch threads: cluster.yaml's `threads:` reaches the board in the launcher's
environment (jobs/launch.py: worker_env), else the worker takes the CPUs it may really use
(runtime/cpus.py, the probe's rule), which torch alone would not (it ignores CPU quotas)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _runtime_helpers import free_port, make_job, make_plan
from dsparse_cli.inventory import load_inventory
from dsparse_cli.jobs.launch import worker_env
from dsparse_cli.probing import board_script as bs
from dsparse_cli.runtime import cpus

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "probe"
TASKSET = shutil.which("taskset")


@pytest.mark.parametrize("args, expected", [
    ((8, 4, 1.5), 1), ((8, 4, None), 4), ((8, 4, 0.5), 1), ((8, None, None), 8), ((8, 2, 3.0), 2),
    ((None, None, 2.5), 2), ((None, None, None), None),
])
def test_the_runtime_rule_is_the_probes(args, expected):
    assert cpus.effective_cpus(*args) == expected == bs.effective_cpus(*args)


def _tree(root: Path, files: dict[str, str]) -> str:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    return str(root)


def test_cgroup_quota_is_the_smallest_on_the_way_up(tmp_path):
    text = lambda name: (FIX / name).read_text()  # noqa: E731
    # cgroup2: user.slice has 2 CPUs, our scope none (the probe reads the same fixture)
    assert cpus.cgroup_cpu_quota(text("proc_self_cgroup_v2.txt"), text("mountinfo_v2.txt"),
                                 str(FIX / "tree_v2")) == 2.0
    # hybrid v1: the cpu,cpuacct hierarchy wins over the idle cgroup2 mount
    v1 = _tree(tmp_path / "v1", {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1",
                                 "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
                                 "sys/fs/cgroup/cpu,cpuacct/user.slice/cpu.cfs_quota_us": "50000",
                                 "sys/fs/cgroup/cpu,cpuacct/user.slice/cpu.cfs_period_us": "100000"})
    assert cpus.cgroup_cpu_quota(text("proc_self_cgroup_v1.txt"), text("mountinfo_v1.txt"), v1) == 0.5
    # a container mounting only its own subtree: its quota is at the mount point
    docker = _tree(tmp_path / "docker", {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "150000",
                                         "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cpus.cgroup_cpu_quota(text("proc_self_cgroup_docker_v1.txt"), text("mountinfo_docker_v1.txt"),
                                 docker) == 1.5
    assert cpus.cgroup_cpu_quota("0::/\n", "", str(tmp_path)) is None


def test_the_launchers_number_wins_and_a_bad_one_is_refused():
    assert cpus.wanted_threads({cpus.THREADS_ENV: "3"}) == 3
    assert cpus.wanted_threads({}) == cpus.process_cpus()
    with pytest.raises(ValueError, match="DSPARSE_THREADS"):
        cpus.wanted_threads({cpus.THREADS_ENV: "0"})


def test_threads_travel_in_the_launchers_environment(tmp_path):
    (tmp_path / "cluster.yaml").write_text("boards:\n  - {name: a, host: 10.0.0.1, threads: 3}\n"
                                           "  - {name: b, host: 10.0.0.2}\n"
                                           "  - {name: c, local: true}\n  - {name: d, local: true}\n")
    inv = load_inventory(tmp_path / "cluster.yaml")
    env = {b.name: worker_env(b, inv, "/pkg").get(cpus.THREADS_ENV) for b in inv.boards}
    share = str(max(1, cpus.process_cpus() // 2))       # local boards share this machine's CPUs
    assert env == {"a": "3", "b": None, "c": share, "d": share}


def _worker_threads(tmp: Path, env: dict, prefix: tuple = ()) -> subprocess.Popen:
    """Start a real one-rank worker (2 steps) whose torch would take 2 threads by itself."""
    (tmp / "plan.json").write_text(json.dumps(make_plan([[0, 1, 2, 3]])))
    job = make_job(str(tmp), dataset="synthetic", synthetic_samples=64, max_steps=2, heartbeat_s=0.0)
    (tmp / "job.json").write_text(json.dumps(job))
    base = {k: v for k, v in os.environ.items() if k != cpus.THREADS_ENV}
    env = {**base, **env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    argv = [*prefix, sys.executable, "-m", "dsparse_cli.runtime.worker", "--plan", str(tmp / "plan.json"),
            "--job", str(tmp / "job.json")]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _reported(tmp: Path, proc: subprocess.Popen) -> tuple[int, int]:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp / "summary.json").read_text())
    status = json.loads((tmp / "status.json").read_text())
    return summary["threads"], status["threads"]


@pytest.mark.slow
@pytest.mark.skipif(not TASKSET, reason="taskset (util-linux) is not installed")
def test_a_real_worker_sets_the_boards_threads_or_its_effective_cpus(tmp_path):
    (tmp_path / "cluster.yaml").write_text("boards:\n  - {name: b0, host: 10.0.0.1, threads: 1}\n"
                                           "  - {name: b1, host: 10.0.0.2}\n")
    inv = load_inventory(tmp_path / "cluster.yaml")
    told, free = tmp_path / "told", tmp_path / "free"
    told.mkdir()
    free.mkdir()
    # both at once (they are independent one-rank jobs): b0 as cluster.yaml says, b1 pinned to one CPU
    procs = [_worker_threads(told, worker_env(inv.boards[0], inv, str(REPO))),
             _worker_threads(free, worker_env(inv.boards[1], inv, str(REPO)), prefix=(TASKSET, "-c", "0"))]
    assert _reported(told, procs[0]) == (1, 1)
    assert _reported(free, procs[1]) == (1, 1)     # its effective CPUs, not OMP_NUM_THREADS' 2
