"""The light launcher (runtime/supervise.py): torchrun's environment, the worker in a session of
its own, signals forwarded, its exit status passed on and how it ended said in the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsparse_cli.runtime.supervise import how_it_ended

from helpers import REPO, wait_for

# A stand-in worker: reports its environment and session, then does what argv[1] says.
WORKER = """
import json, os, signal, sys, time
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
out = sys.argv[2]
with open(out + ".tmp", "w") as fh:
    json.dump({"env": {k: os.environ.get(k) for k in keys}, "pid": os.getpid(), "sid": os.getsid(0)}, fh)
os.replace(out + ".tmp", out)
if sys.argv[1] == "exit3":
    sys.exit(3)
if sys.argv[1] == "term":   # exit 7 on SIGTERM, like a worker that stopped at a step boundary
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))
time.sleep(60)
"""


def start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "w.py").write_text(WORKER)
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dsparse_cli.runtime.supervise", "--rank", "2", "--world", "3",
                             "--master-addr", "10.0.0.1", "--master-port", "29999", "--",
                             str(tmp_path / "w.py"), mode, str(report)],
                            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(report.exists, 20), "the worker never started"
    return proc, report


def test_the_worker_gets_torchruns_environment_and_its_exit_status_comes_back(tmp_path):
    import json

    proc, report = start(tmp_path, "exit3")
    assert proc.wait(20) == 3
    doc = json.loads(report.read_text())
    assert doc["env"] == {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                          "GROUP_RANK": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"}
    assert doc["sid"] == doc["pid"] != proc.pid          # a session of its own, as under torchrun
    assert "worker exited with status 3" in proc.stderr.read()


def test_sigterm_is_forwarded_and_the_workers_answer_is_the_exit_status(tmp_path):
    import json

    proc, report = start(tmp_path, "term")
    time.sleep(0.5)   # the stand-in installs its handler right after writing the report
    os.kill(proc.pid, signal.SIGTERM)   # only the supervisor: it must pass the signal on
    assert proc.wait(20) == 7
    assert not _alive(json.loads(report.read_text())["pid"])


def test_a_killed_worker_is_named_with_its_signal(tmp_path):
    import json

    proc, report = start(tmp_path, "sleep")
    os.kill(json.loads(report.read_text())["pid"], signal.SIGKILL)
    assert proc.wait(20) == 128 + signal.SIGKILL
    assert "worker was killed by SIGKILL" in proc.stderr.read()


def test_killing_the_supervisor_takes_the_worker_with_it(tmp_path):
    import json

    proc, report = start(tmp_path, "sleep")
    worker = json.loads(report.read_text())["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(20)
    assert wait_for(lambda: not _alive(worker), 10), "the worker outlived its supervisor"


def test_an_oom_kill_is_named_when_the_cgroup_counted_one():
    assert "OOM killer" in how_it_ended(-signal.SIGKILL, 0, 1)
    assert "OOM" not in how_it_ended(-signal.SIGKILL, 1, 1) and "OOM" not in how_it_ended(-signal.SIGKILL, None, None)
    assert how_it_ended(-signal.SIGTERM, 0, 1) == "worker was killed by SIGTERM"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_memory_cgroups_reads_v1_v2_and_hybrid_hosts():
    from dsparse_cli.runtime.supervise import memory_cgroups

    assert memory_cgroups("0::/user.slice/board\n") == [(2, "/user.slice/board")]
    hybrid = "12:memory:/testbed/b1\n4:cpu,cpuacct:/testbed/b1\n1:name=systemd:/x\n0::/x\n"
    assert memory_cgroups(hybrid) == [(1, "/testbed/b1"), (2, "/x")]
    assert memory_cgroups("") == []
