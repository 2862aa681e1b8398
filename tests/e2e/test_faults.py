"""The fault suite (issue #16): one job on a three-board emulated cluster, broken eight ways in turn.

After each fault dsparse must name the board (the seconds from the fault to the name on stderr go
into the table), leave no process of the job anywhere, and the next `dsparse train --resume` must
continue from a checkpoint at most one interval back. The rows run in order on the same job: each
row's resume is the next row's run, and the last test resumes the job to its end. The table is
printed at the end of the run (tests/e2e/conftest.py); docs/faults.md keeps a copy.

Detection figures are reported, not asserted (the issue's 10 s for a dead link, a killed or a hung
worker is a target); the tests assert a bound far from the 30-minute gloo default.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_testbed import Testbed, require_testbed, running_testbed, ssh_argv
from fault_table import FAULTS, ROWS, Row
from helpers import run_cli, seed_profile, wait_for
from testbed_jobs import (HEADROOM, MiB, alive, board_run, heartbeat, kill_recorded_leftovers, latest_job,
                          oom_kills, pids, predicted_needs, steps, up_args)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

CHECKPOINT_EVERY = 4
COLLECTIVE_TIMEOUT = 15
NAMED_WITHIN_S = 30          # a functional bound (gloo's default would be 30 minutes); figures go to the table
TRAIN = ("train", "--dataset", "digits", "--batch-size", "16", "--lr", "0.05", "--epochs", "20",
         "--checkpoint-every", str(CHECKPOINT_EVERY), "--collective-timeout", str(COLLECTIVE_TIMEOUT))
ROOM_MIB = 150               # per board beyond the plan's figures: sshd, shells, page cache
DISK = "96m"                 # b1's workdir is a filesystem of its own, this big, for the full-disk row
# Takes memory in the board's cgroup until the kernel's OOM killer has killed once (its counter, the
# argument, grows), then holds it. Checking the victim's pid instead races its exit: a second OOM
# kill would take the hog.
HOG = """import os, sys, time
def kills():
    return int(next(l.split()[1] for l in open(sys.argv[1]) if l.startswith("oom_kill ")))
before, held = kills(), []
print(os.getpid(), flush=True)
while kills() == before:
    held.append(b"x" * (4 << 20))
    time.sleep(0.01)
print("killed", flush=True)
time.sleep(600)
"""


class Attempt:
    """One `dsparse train` run; its stderr lines are kept with the time each arrived."""

    def __init__(self, tb: Testbed, args: tuple[str, ...]):
        self.proc = subprocess.Popen([sys.executable, "-m", "dsparse_cli", *args], cwd=tb.dir, encoding="utf-8",
                                     errors="replace",   # a bad byte must not end the reader, and the lines
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        for t, line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return t, m
        return None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc


@dataclass
class Suite:
    tb: Testbed
    attempts: int = 0                       # `dsparse train` runs of the job so far
    current: Attempt | None = None          # the one running, if any
    pending: list = field(default_factory=list)   # [row, step at the fault]: waiting for its resume

    def running(self, past: int = CHECKPOINT_EVERY + 2, extra: tuple[str, ...] = ()) -> tuple[Attempt, dict]:
        """The job running, every board `past` steps beyond where this attempt began (so it
        checkpointed on the way): the attempt still running, else the job resumed (or started)."""
        if self.current is None or self.current.proc.poll() is not None:
            self.current = Attempt(self.tb, TRAIN + (("--resume",) if self.attempts else ()) + extra)
            self.attempts += 1
        att, began = self.current, self._began(self.current)

        def ready():
            if att.proc.poll() is not None:
                return "exited"
            job = latest_job(self.tb.dir)
            fresh = job and job["attempts"] == self.attempts and job["state"] in ("running", "finished")
            return job if fresh and min(steps(job)) >= began + past else None
        job = wait_for(ready, 180)
        assert isinstance(job, dict), f"the job never got {past} steps along:\n{att.text()[-3000:]}"
        return att, job

    def _began(self, att: Attempt) -> int:
        """Where the attempt started: 0, or the step it resumed from (its first log line says). A
        resume confirms the previous row: at most one checkpoint interval was lost."""
        if self.attempts == 1:
            return 0
        found = wait_for(lambda: att.first(r"resumed from step (\d+)") or att.proc.poll() is not None, 120)
        assert found and found is not True, f"the resume did not start:\n{att.text()[-3000:]}"
        step = int(found[1].group(1))
        if self.pending:
            row, at_fault = self.pending
            row.resumed = f"from step {step} (fault near step {at_fault})"
            self.pending = []
            assert step >= at_fault - CHECKPOINT_EVERY, (row.fault, step, at_fault)
        return step

    def failed(self, att: Attempt, row: Row, fault_at: float, step: int, left_within: float = 15) -> str:
        """The attempt ended naming `row.board`; fill the row: seconds to the name, processes left."""
        ROWS.append(row)
        rc = att.wait(timeout=180)
        err = att.text()
        named = att.first(r"board (\S+) failed")
        if named:
            row.named, row.detected_s = named[1].group(1), named[0] - fault_at
        job = latest_job(self.tb.dir)
        left = wait_for(lambda: not [p for p in pids(job) if alive(p)], left_within)
        row.left = 0 if left else len([p for p in pids(job) if alive(p)])
        self.pending = [row, step]
        assert rc == 1, err[-3000:]
        assert row.named == row.board and job["state"] == "failed" and job["failed_board"] == row.board, err[-3000:]
        assert row.detected_s < NAMED_WITHIN_S, row
        assert row.left == 0, f"still running: {[p for p in pids(job) if alive(p)]}"
        return err


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_cnn_profile):
    require_testbed()
    d = tmp_path_factory.mktemp("faults")
    seed_profile(tiny_cnn_profile, d / ".dsparse")
    _, full = predicted_needs(d / ".dsparse", 16)
    # Mounted before `up`: each board's mount namespace is a copy of this one made then.
    disk = d / "boards" / "b1"
    disk.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "dsparse-faults", str(disk)], check=True)
    try:
        with running_testbed(d, *up_args(3, int(full / MiB / (1 - HEADROOM) + ROOM_MIB), delay="5ms")) as tb:
            assert tb.board("b1")["workdir"] == str(disk)
            try:
                assert run_cli("probe", cwd=d, timeout=240).returncode == 0
                proc = run_cli("plan", "--model", "tiny_cnn", "--batch-size", "16", cwd=d, timeout=240)
                assert proc.returncode == 0, proc.stderr[-3000:]
                yield Suite(tb)
            finally:
                kill_recorded_leftovers(d)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _worker_pid(job: dict, board: str) -> int:
    return heartbeat(board_run(job, board))["pid"]


# -- the rows, in order ------------------------------------------------------------------------------
def test_link_flapping_is_ridden_out(suite):
    tb = suite.tb
    att, job = suite.running()
    row = Row(FAULTS[0], "b2", note="2 × (3 s down, 3 s up): shorter than the 8 s a silent board gets")
    ROWS.append(row)
    for _ in range(2):
        assert tb.cli("link", "down", "b2").returncode == 0
        time.sleep(3)
        assert tb.cli("link", "up", "b2").returncode == 0
        time.sleep(3)
    after = max(steps(latest_job(tb.dir)))
    moved = wait_for(lambda: att.proc.poll() is not None or min(steps(latest_job(tb.dir))) >= after + 3, 90)
    row.named = "none" if att.first(r"board \S+ failed") is None else att.first(r"board (\S+) failed")[1].group(1)
    assert moved and att.proc.poll() is None, att.text()[-3000:]
    assert row.named == "none"
    row.resumed = "not needed: the job went on"


def test_killed_worker(suite):
    att, job = suite.running()
    step = max(steps(job))
    os.kill(_worker_pid(job, "b1"), signal.SIGKILL)
    err = suite.failed(att, Row(FAULTS[1], "b1"), time.monotonic(), step)
    assert "b1 |" in err and "SIGKILL" in err     # its last log lines: the launcher's report of the kill


def test_hung_worker(suite):
    att, job = suite.running()
    step = max(steps(job))
    os.kill(_worker_pid(job, "b2"), signal.SIGSTOP)
    suite.failed(att, Row(FAULTS[2], "b2", note="`stop` resumes it (SIGCONT) to end it"), time.monotonic(), step)


def test_link_down(suite):
    tb = suite.tb
    att, job = suite.running()
    step = max(steps(job))
    assert tb.cli("link", "down", "b2").returncode == 0
    cut = time.monotonic()
    try:
        # b2 cannot be signalled through a dead link: its worker gives up by itself at the
        # collective timeout, and its launcher follows.
        row = Row(FAULTS[3], "b2")
        suite.failed(att, row, cut, step, left_within=COLLECTIVE_TIMEOUT + 45)
        row.note = f"b2's own processes ended {time.monotonic() - cut:.0f} s after the cut, by themselves"
    finally:
        tb.cli("link", "up", "b2")


def test_oom_kill(suite):
    tb = suite.tb
    att, job = suite.running()
    step, cgroup = max(steps(job)), tb.board("b1")["cgroup"]
    kills = oom_kills(cgroup)
    # Which process the kernel picks is not under test, what dsparse does when it is the worker is:
    # the worker is made the first choice (raising a score needs no privilege; exempting the hog,
    # as a system daemon would be, needs CAP_SYS_RESOURCE, which containers often lack).
    worker = _worker_pid(job, "b1")
    Path(f"/proc/{worker}/oom_score_adj").write_text("1000")
    counter = next(str(p) for p in (Path(cgroup, "memory.oom_control"), Path(cgroup, "memory.events")) if p.exists())
    hog = subprocess.Popen(ssh_argv(tb.dir, tb.board("b1")["addr"]) + [
        shlex.join(["exec", sys.executable, "-c", HOG, counter])], stdout=subprocess.PIPE, text=True)
    hog_pid = int(hog.stdout.readline())
    try:
        # "killed", or nothing: the kernel may take the hog too while the worker's memory is still
        # being freed (seen on a loaded machine); the worker was taken first either way.
        hog.stdout.readline()
        err = suite.failed(att, Row(FAULTS[4], "b1", note="another process filled the board's memory"),
                           time.monotonic(), step)
        assert oom_kills(cgroup) > kills and "OOM killer" in err, err[-3000:]
    finally:
        if alive(hog_pid):
            os.kill(hog_pid, signal.SIGKILL)
        hog.wait(timeout=30)


def test_reboot(suite):
    tb = suite.tb
    att, job = suite.running()
    step = max(steps(job))
    cut = time.monotonic()
    res = tb.cli("reboot", "b2", "--down-for", "3")
    assert res.returncode == 0, res.stderr
    suite.failed(att, Row(FAULTS[5], "b2", note="off for 3 s: sshd, launcher and worker killed"), cut, step)


def test_disk_full_during_a_checkpoint(suite):
    tb = suite.tb
    att, job = suite.running()
    step = max(steps(job))
    run_dir = Path(board_run(job, "b1")["run_dir"])
    size = (run_dir / "checkpoints" / "latest.pt").stat().st_size
    filler = Path(tb.board("b1")["workdir"]) / "filler"
    free = os.statvfs(filler.parent).f_bavail * os.statvfs(filler.parent).f_frsize
    with open(filler, "wb") as fh:            # leaves half a checkpoint free
        fh.write(b"\0" * max(0, free - size // 2))
    try:
        err = suite.failed(att, Row(FAULTS[6], "b1", note=f"{size // 2 >> 10} KiB left for a "
                                    f"{size >> 10} KiB checkpoint"), time.monotonic(), step)
        assert "could not write checkpoint" in err and "the previous checkpoint is intact" in err, err[-3000:]
    finally:
        filler.unlink()


def test_ctrl_c_during_the_launch(suite):
    tb = suite.tb
    row = Row(FAULTS[7], "-", note="SIGINT once the first board's launcher is recorded")
    ROWS.append(row)
    att = suite.current = Attempt(tb, TRAIN + ("--resume",))
    suite.attempts += 1

    def launching():
        job = latest_job(tb.dir)
        return job if job and job["attempts"] == suite.attempts and job["state"] == "starting" and \
            any(b.get("pid") for b in job["boards"]) else None
    job = wait_for(launching, 120, step=0.01)
    assert job, att.text()[-3000:]
    att.proc.send_signal(signal.SIGINT)
    rc = att.wait(timeout=120)
    job = latest_job(tb.dir)
    left = wait_for(lambda: not [p for p in pids(job) if alive(p)], 15)
    row.left = 0 if left else len([p for p in pids(job) if alive(p)])
    row.named = "none (interrupted)"
    assert rc == 130, att.text()[-3000:]
    assert "interrupted during the launch" in att.text(), (att.reader.is_alive(), att.text()[-3000:])
    assert job["state"] == "stopped" and row.left == 0


def test_resume_finishes_the_job(suite):
    """The last resume (it confirms the last two rows) runs the job to its end."""
    tb = suite.tb
    end = suite.pending[1] + 2 * CHECKPOINT_EVERY
    att, job = suite.running(past=1, extra=("--max-steps", str(end)))
    if ROWS and ROWS[-1].fault == FAULTS[7]:
        ROWS[-1].resumed = ROWS[-2].resumed
    assert att.wait(timeout=240) == 0, att.text()[-3000:]
    job = latest_job(tb.dir)
    assert job["state"] == "finished" and job["attempts"] == suite.attempts == 8
    assert [heartbeat(b).get("global_step") for b in job["boards"]] == [end] * 3
    assert not [p for p in pids(job) if alive(p)]
