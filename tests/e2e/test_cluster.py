"""dsparse end to end on the emulated edge cluster (issue #6): four boards, each its own network
namespace, sshd, memory cgroup and emulated link.

1. probe -> plan --push -> train digits for 2 epochs -> status, with no board OOM-killed;
2. faults: a board's link taken down mid-training, a board's worker killed; each time the job is
   stopped and the board named within 60 s, nothing is left running, and `--resume` finishes the
   run losing at most one checkpoint interval;
3. a full update that does not fit a board's limit is refused by `dsparse plan`.

Board limits are set relative to this machine's measured process base (it moves by +-100 MiB
between environments with the same torch build), so the margins tested are the same everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_testbed import Testbed, require_testbed, running_testbed
from helpers import one_line_error, run_cli, seed_profile, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

MiB = 1 << 20
BOARDS = ("b0", "b1", "b2", "b3")
HEADROOM = 0.15                      # `dsparse plan`'s default
# Room on each board beyond what the plan counts (worker peak + its launcher): sshd, the
# shell, page cache.
ROOM_MIB = 100
ACCURACY_FLOOR = 0.30                # 2 epochs of tiny_cnn on digits reach ~0.44 here; chance is 0.10
CHECKPOINT_EVERY = 5
COLLECTIVE_TIMEOUT = 20
FAULT_RUN_STEPS = 16
FAULT_RUN = ("--epochs", "2", "--max-steps", str(FAULT_RUN_STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY))
TRAIN = ("train", "--dataset", "digits", "--batch-size", "16", "--lr", "0.1",
         "--collective-timeout", str(COLLECTIVE_TIMEOUT))


def predicted_needs(state_dir: Path, batch_size: int) -> tuple[int, int]:
    """What a board must hold for tiny_cnn (worker peak + dsparse's launcher) to train the last unit
    only, and every unit, from the profile measured here (as `dsparse plan` does; cached in
    `state_dir`)."""
    from dsparse_cli.planning.profile import get_profile, launcher_bytes

    prof = get_profile(state_dir, "tiny_cnn", batch_size=batch_size, image_size=32)
    n, launcher = prof.num_units, launcher_bytes(prof, "dsparse")
    return prof.peak_bytes([n - 1]) + launcher, prof.peak_bytes(range(n)) + launcher


def up_args(boards: int, memory_mib: int) -> list[str]:
    return ["--boards", str(boards), "--memory", f"{memory_mib}MiB", "--rate", "100mbit", "--delay", "2ms"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_cnn_profile):
    require_testbed()
    d = tmp_path_factory.mktemp("cluster4")
    seed_profile(tiny_cnn_profile, d / ".dsparse")   # measured once for the session: read here and by `plan`
    _, full = predicted_needs(d / ".dsparse", 16)
    limit_mib = int(full / MiB / (1 - HEADROOM) + ROOM_MIB)
    with running_testbed(d, *up_args(len(BOARDS), limit_mib)) as tb:
        try:
            yield tb
        finally:
            _kill_recorded_leftovers(tb.dir)


# -- helpers ----------------------------------------------------------------------------------------
def _latest_job(d: Path) -> dict | None:
    jobs = d / ".dsparse" / "jobs"
    try:
        return json.loads((jobs / f"{(jobs / 'latest').read_text().strip()}.json").read_text())
    except (OSError, ValueError):
        return None


def _heartbeat(run: dict) -> dict:
    try:  # the boards' workdirs are on this machine's filesystem (the namespaces share it)
        return json.loads(Path(run["run_dir"], "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _pids(job: dict) -> set[int]:
    return {p for b in job["boards"] for p in (b["pid"], b.get("worker_pid"), _heartbeat(b).get("pid")) if p}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_recorded_leftovers(d: Path) -> None:
    """Safety net for a failed test: SIGKILL exactly the process groups the latest job records."""
    job = _latest_job(d)
    for pid in _pids(job) if job else ():
        if _alive(pid) and str(d).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _oom_kills(cgroup: str) -> int:
    """OOM kills in a board's memory cgroup (v1 memory.oom_control, v2 memory.events)."""
    for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
        path = Path(cgroup, name)
        if path.exists():
            for line in path.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    raise AssertionError(f"no OOM counter in {cgroup}")


def _peak_usage(cgroup: str) -> int | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        path = Path(cgroup, name)
        if path.exists():
            return int(path.read_text())
    return None


def _train_until(tb: Testbed, min_step: int, *args: str) -> tuple[subprocess.Popen, dict, int]:
    """Start `dsparse train`; return it, its job and the highest step any board reached once
    every board is past `min_step`."""
    before = _latest_job(tb.dir)
    proc = subprocess.Popen([sys.executable, "-m", "dsparse_cli", *TRAIN, *args], cwd=tb.dir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})

    def ready():
        if proc.poll() is not None:
            return "exited"
        job = _latest_job(tb.dir)
        if not job or (before and job["id"] == before["id"]):
            return None
        steps = [_heartbeat(b).get("global_step") or 0 for b in job["boards"]]
        return job if min(steps) >= min_step else None
    job = wait_for(ready, 240)
    if not isinstance(job, dict):
        proc.kill()
        raise AssertionError(f"the job never got every board to step {min_step}: {proc.communicate()[1][-3000:]}")
    return proc, job, max(_heartbeat(b).get("global_step") or 0 for b in job["boards"])


def _assert_failed_on(tb: Testbed, proc: subprocess.Popen, cut: float, board: str, job_id: str) -> str:
    _, err = proc.communicate(timeout=120)
    reported = time.monotonic() - cut
    print(f"{board}: the failure was reported {reported:.1f}s after the fault")
    assert proc.returncode == 1, err[-3000:]
    assert reported < 60, f"reported {reported:.1f}s after the fault"
    assert f"board {board} failed" in err, err[-3000:]
    job = _latest_job(tb.dir)
    assert job["id"] == job_id and job["state"] == "failed" and job["failed_board"] == board
    return err


def _assert_resume_finishes(tb: Testbed, job_id: str, step_at_fault: int, total_steps: int) -> None:
    proc = run_cli("train", "--resume", "--json", cwd=tb.dir, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["job"] == job_id and summary["state"] == "finished"
    job = _latest_job(tb.dir)
    assert job["attempts"] == 2 and job["state"] == "finished"
    for b in job["boards"]:
        assert list(Path(b["run_dir"]).glob("worker.log.*")), "the first attempt's log was kept"
        done = json.loads(Path(b["run_dir"], "summary.json").read_text())
        assert done["steps"] == total_steps
        # no more than one checkpoint interval lost
        assert done["resumed_from_step"] >= step_at_fault - CHECKPOINT_EVERY, (done["resumed_from_step"], step_at_fault)


# -- the tests (module order matters: the first one probes and plans) ---------------------------------
def test_probe_plan_train_status_without_oom(cluster):
    tb = cluster
    proc = run_cli("probe", "--json", cwd=tb.dir, timeout=240)
    assert proc.returncode == 0, proc.stderr
    probed = {b["name"]: b for b in json.loads(proc.stdout)["boards"]}
    assert sorted(probed) == list(BOARDS)
    assert len({b["hostname"] for b in probed.values()}) == 4      # four distinct hosts
    for name, b in probed.items():
        limit = tb.board(name)["memory"]
        assert b["ok"] and b["usable_memory_source"] == "cgroup", b
        assert b["cgroup_limit_bytes"] == limit
        assert abs(b["usable_memory_bytes"] - limit) / limit < 0.03, (name, b["usable_memory_bytes"], limit)

    proc = run_cli("plan", "--model", "tiny_cnn", "--batch-size", "16", "--push", "--json", cwd=tb.dir, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert [d["name"] for d in plan["devices"]] == list(BOARDS)
    assert plan["launcher"] == "dsparse" and 0 < plan["launcher_bytes"] < 20 * MiB   # the supervisor, in every budget
    for d in plan["devices"]:
        assert d["predicted_peak_bytes"] + plan["launcher_bytes"] <= d["budget_bytes"]
        pushed = json.loads(Path(tb.board(d["name"])["workdir"], "plan.json").read_text())
        assert pushed["profile_key"] == plan["profile_key"]

    proc = run_cli(*TRAIN, "--epochs", "2", "--json", cwd=tb.dir, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["state"] == "finished" and summary["accuracy"] >= ACCURACY_FLOOR, summary["accuracy"]
    for name in BOARDS:
        cg = tb.board(name)["cgroup"]
        assert _oom_kills(cg) == 0, f"{name} was OOM-killed"
        peak = _peak_usage(cg)
        print(f"{name}: cgroup peak {peak and peak / MiB:.0f} MiB of {tb.board(name)['memory'] / MiB:.0f} MiB")
        assert peak is None or peak < tb.board(name)["memory"]

    proc = run_cli("status", "--json", cwd=tb.dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["job"] == summary["job"] and status["state"] == "finished"
    assert [b["state"] for b in status["boards"]] == ["finished"] * 4
    assert not [p for p in _pids(_latest_job(tb.dir)) if _alive(p)]


def test_link_down_is_named_then_resume_finishes(cluster):
    tb = cluster
    proc, job, step = _train_until(tb, 7, *FAULT_RUN)
    try:
        assert tb.cli("link", "down", "b2").returncode == 0
        cut = time.monotonic()
        _assert_failed_on(tb, proc, cut, "b2", job["id"])
        # The launcher cannot signal b2 through a dead link; b2's worker gives up on its own at the
        # collective timeout, and its torchrun follows. Everything else was stopped already.
        pids = _pids(_latest_job(tb.dir))
        left = wait_for(lambda: not [p for p in pids if _alive(p)], COLLECTIVE_TIMEOUT + 40)
        assert left, f"still running: {[p for p in pids if _alive(p)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        tb.cli("link", "up", "b2")
    _assert_resume_finishes(tb, job["id"], step, FAULT_RUN_STEPS)


def test_killed_worker_is_named_then_resume_finishes(cluster):
    tb = cluster
    proc, job, step = _train_until(tb, 7, *FAULT_RUN)
    try:
        os.kill(_heartbeat(next(b for b in job["boards"] if b["name"] == "b1"))["pid"], signal.SIGKILL)
        cut = time.monotonic()
        err = _assert_failed_on(tb, proc, cut, "b1", job["id"])
        assert "b1 |" in err and "SIGKILL" in err  # its last log lines: torchrun's report of the kill
        assert not [p for p in _pids(_latest_job(tb.dir)) if _alive(p)]   # every board reachable: all stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_resume_finishes(tb, job["id"], step, FAULT_RUN_STEPS)


def test_full_update_that_does_not_fit_is_refused(spare_testbed):
    """One board whose limit is between what the top unit alone and what a full update need:
    `dsparse plan` refuses the full update (nothing written), `--allow-frozen` gives it what fits."""
    tb = spare_testbed
    state = tb.dir / ".dsparse"
    smallest, full = predicted_needs(state, 1024)      # batch 1024: a ~80 MiB gap between the two
    budget = (smallest + full) / 2
    res = tb.cli("up", *up_args(1, int(budget / (1 - HEADROOM) / MiB) + 16))  # (+ sshd and the probe's shell)
    assert res.returncode == 0, f"edge-testbed up failed:\n{res.stdout}\n{res.stderr}"
    old_plan = b'{"kept": true}'
    (state / "plan.json").write_bytes(old_plan)

    assert run_cli("probe", cwd=tb.dir, timeout=240).returncode == 0
    proc = run_cli("plan", "--model", "tiny_cnn", "--batch-size", "1024", cwd=tb.dir, timeout=240)
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc)
    assert "no board can train every unit: the largest, b0" in err and "a full update needs" in err, err
    assert (state / "plan.json").read_bytes() == old_plan                  # nothing lost

    proc = run_cli("plan", "--model", "tiny_cnn", "--batch-size", "1024", "--allow-frozen", "--json",
                   cwd=tb.dir, timeout=240)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    dev = doc["devices"][0]
    assert 0 < len(dev["units"]) < 4 and dev["predicted_peak_bytes"] + doc["launcher_bytes"] <= dev["budget_bytes"] < full
    shutil.rmtree(state / "profiles", ignore_errors=True)
