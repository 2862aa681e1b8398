"""`status`, `stop` and `logs` through the real entry point on jobs of real processes (`sleep`s in
sessions of their own, as torchrun and its worker run), after cluster.yaml changed under them
(issue #16) and from another directory (issue #14, the per-user job index)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import run_cli, wait_for

from dsparse_cli.contract import JobState
from dsparse_cli.inventory import load_inventory
from dsparse_cli.jobs import records
from dsparse_cli.jobs.launch import new_record
from dsparse_cli.remote.local import LocalTransport

BOARD = "  - {{name: {name}, local: true, workdir: {workdir}}}\n"


@dataclass
class Job:
    dir: Path
    id: str
    pids: dict[str, list[int]]    # board -> [agent, worker]
    transport: LocalTransport     # started them, so it reaps them too

    def record(self) -> dict:
        return json.loads((self.dir / ".dsparse" / "jobs" / f"{self.id}.json").read_text())

    def alive(self, board: str | None = None) -> list[int]:
        return [p for name, pids in self.pids.items() if board in (None, name) for p in pids
                if self.transport.alive(p)]

    def gone(self, board: str | None = None) -> bool:
        return bool(wait_for(lambda: not self.alive(board), 10))


def cluster_yaml(d: Path, names=("a", "b"), extra: str = "") -> str:
    """Local boards named `names`, each with the workdir of the board it replaces (a rename keeps it)."""
    boards = "".join(BOARD.format(name=n, workdir=d / "w" / str(i)) for i, n in enumerate(names))
    return f"name: loc2\nboards:\n{boards}{extra}"


def start_job(d: Path, yaml_text: str | None = None) -> Job:
    """A recorded, running job in `d`: per board a torchrun stand-in and a worker stand-in, each
    leading its own session, a log and a fresh heartbeat naming the worker, as `train` leaves them."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "cluster.yaml").write_text(yaml_text or cluster_yaml(d))
    inv = load_inventory(d / "cluster.yaml")
    plan = SimpleNamespace(devices=[SimpleNamespace(name=b.name, rank=i) for i, b in enumerate(inv.boards)])
    rec = new_record(inv, plan, records.new_job_id(), "planhash")
    transport = LocalTransport(inv.boards[0])
    pids = {}
    for run in rec.boards:
        Path(run.run_dir).mkdir(parents=True)
        Path(run.log_path).write_text(f"[{run.name} rank {run.rank}] epoch 1 step 1 loss 2.3\n")
        agent, worker = (transport.start_detached("exec sleep 300", log_path=run.log_path, cwd=run.run_dir)
                         for _ in range(2))
        Path(run.status_path).write_text(json.dumps({"state": "running", "time": time.time(), "pid": worker.pid,
                                                     "step": 1, "epoch": 1}))
        run.pid, run.pgid, run.started = agent.pid, agent.pgid, time.time()
        pids[run.name] = [agent.pid, worker.pid]
    rec.advance(JobState.RUNNING)
    records.save(inv.state_dir, rec)
    return Job(d, rec.id, pids, transport)


@pytest.fixture
def jobs():
    """Start jobs with `jobs(dir)`; whatever a test leaves running is killed by its exact group."""
    started: list[Job] = []

    def start(d: Path, yaml_text: str | None = None) -> Job:
        started.append(start_job(d, yaml_text))
        return started[-1]

    yield start
    for job in started:
        for pid in job.alive():
            job.transport.signal(pid, 9)
        job.gone()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- #16: a board renamed in cluster.yaml after the job started ------------------------------------
def test_stop_after_a_board_was_renamed_stops_it_too(tmp_path, jobs):
    job = jobs(tmp_path / "c")
    (job.dir / "cluster.yaml").write_text(cluster_yaml(job.dir, names=("a", "b-renamed")))
    proc = run_cli("stop", "--grace", "5", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert f"job {job.id} stopped on 2 boards (cluster loc2 ({job.dir / 'cluster.yaml'}))" in proc.stdout
    assert "warning: board b is no longer in" in proc.stderr and "renamed or removed" in proc.stderr
    assert job.gone(), f"still running: {job.alive()}"
    assert job.record()["state"] == "stopped"


def test_status_and_logs_after_a_board_was_renamed(tmp_path, jobs):
    job = jobs(tmp_path / "c")
    (job.dir / "cluster.yaml").write_text(cluster_yaml(job.dir, names=("a", "b-renamed")))
    proc = run_cli("status", "--json", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [(b["name"], b["state"]) for b in doc["boards"]] == [("a", "running"), ("b", "running")]
    assert "warning: board b is no longer in" in proc.stderr and "internal error" not in proc.stderr
    proc = run_cli("status", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert f"job {job.id}: running (2 running)" in proc.stdout and "cluster loc2 (" in proc.stdout
    proc = run_cli("logs", "b", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert "[b rank 1] epoch 1" in proc.stdout and "cluster loc2" in proc.stderr


def test_a_changed_board_is_reached_as_recorded(tmp_path, jobs):
    """A board whose entry now points elsewhere (another workdir) is named with what changed."""
    job = jobs(tmp_path / "c")
    text = cluster_yaml(job.dir).replace(str(job.dir / "w" / "1"), str(job.dir / "elsewhere"))
    (job.dir / "cluster.yaml").write_text(text)
    proc = run_cli("status", "--json", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert f"board b changed in {job.dir / 'cluster.yaml'} (workdir" in proc.stderr
    assert [b["state"] for b in json.loads(proc.stdout)["boards"]] == ["running", "running"]


# -- #16: a board the job does not use, with a missing identity file, added to cluster.yaml ---------
def test_a_broken_new_board_blocks_nothing_of_a_job_without_it(tmp_path, jobs):
    job = jobs(tmp_path / "c")
    broken = f"  - {{name: extra, host: 127.0.0.1, identity_file: {job.dir / 'no-such-key'}}}\n"
    (job.dir / "cluster.yaml").write_text(cluster_yaml(job.dir, extra=broken))
    proc = run_cli("status", "--json", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert [b["name"] for b in json.loads(proc.stdout)["boards"]] == ["a", "b"]
    proc = run_cli("logs", "a", "--json", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["boards"][0]["lines"] == ["[a rank 0] epoch 1 step 1 loss 2.3"]
    proc = run_cli("stop", "--grace", "5", cwd=job.dir)
    assert proc.returncode == 0, proc.stderr
    assert f"job {job.id} stopped on 2 boards" in proc.stdout
    assert job.gone(), f"still running: {job.alive()}"


# -- #16: stop succeeds only when every recorded process is gone -----------------------------------
def test_stop_with_an_unreachable_board_fails_naming_it_and_the_job_stays_stopping(tmp_path, jobs):
    d = tmp_path / "c"
    port = closed_port()   # nothing listens: connecting is refused at once, and only on loopback
    ssh_b = f"  - {{name: b, host: 127.0.0.1, port: {port}, workdir: {d / 'w' / '1'}}}\n"
    job = jobs(d, cluster_yaml(d, names=("a",), extra=ssh_b))   # b's processes run, but b cannot be reached
    proc = run_cli("stop", "--grace", "5", "--connect-timeout", "3", cwd=d)
    assert proc.returncode == 1, proc.stderr
    assert job.record()["state"] == "stopping"   # not "stopped": b's worker may still run
    assert job.gone("a") and len(job.alive("b")) == 2
    assert "error: b: could not stop:" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert f"job {job.id} of cluster loc2 ({d / 'cluster.yaml'}) is not stopped: its processes may still run on b" \
        in proc.stderr
    assert "stopped on" not in proc.stdout

    proc = run_cli("stop", "--json", "--connect-timeout", "3", cwd=d)   # again: the same, as a document
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["job"], doc["cluster"], doc["inventory"]) == (job.id, "loc2", str(d / "cluster.yaml"))
    assert doc["stopped"] is False and doc["state"] == "stopping"
    boards = {b["name"]: b for b in doc["boards"]}
    assert boards["a"]["state"] == "stopped" and boards["b"]["state"] == "unreachable"
    assert f"127.0.0.1:{port}" in boards["b"]["error"]


# -- #14: the per-user job index -----------------------------------------------------------------
def test_status_logs_stop_from_another_directory_find_the_latest_job(tmp_path, jobs):
    job = jobs(tmp_path / "cluster-dir")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("status", "--json", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["job"], doc["cluster"], doc["inventory"]) == (job.id, "loc2", str(job.dir / "cluster.yaml"))
    assert [b["state"] for b in doc["boards"]] == ["running", "running"]

    proc = run_cli("logs", "--json", cwd=elsewhere)   # every board's lines, per board
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["job"] == job.id and doc["cluster"] == "loc2"
    assert {b["name"]: b["lines"] for b in doc["boards"]} == {
        "a": ["[a rank 0] epoch 1 step 1 loss 2.3"], "b": ["[b rank 1] epoch 1 step 1 loss 2.3"]}

    proc = run_cli("stop", "--json", "--grace", "5", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["stopped"] is True and doc["state"] == "stopped" and doc["job"] == job.id
    assert [(b["name"], b["state"]) for b in doc["boards"]] == [("a", "stopped"), ("b", "stopped")]
    assert job.gone()


def test_lookup_order(tmp_path, monkeypatch):
    """--job ID from anywhere; --cluster: its own latest; else the newest job in the index."""
    from dsparse_cli.jobs.reach import find_job

    def saved(d: Path, job_id: str):
        d.mkdir()
        (d / "cluster.yaml").write_text(cluster_yaml(d))
        inv = load_inventory(d / "cluster.yaml")
        plan = SimpleNamespace(devices=[SimpleNamespace(name="a", rank=0)])
        records.save(inv.state_dir, new_record(inv, plan, job_id, "h"))

    saved(tmp_path / "one", "j-old")
    saved(tmp_path / "two", "j-new")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert find_job(None, None)[1].id == "j-new"
    assert find_job("j-old", None)[1].id == "j-old"
    state_dir, rec = find_job(None, tmp_path / "one" / "cluster.yaml")
    assert rec.id == "j-old" and state_dir == (tmp_path / "one" / ".dsparse").resolve()
    # a resumed attempt of the older job makes it the newest
    rec.attempts += 1
    records.save(state_dir, rec)
    assert find_job(None, None)[1].id == "j-old"
    # a record that was deleted drops out of the index
    (state_dir / "jobs" / "j-old.json").unlink()
    assert find_job(None, None)[1].id == "j-new"


def test_no_job_anywhere_says_so(tmp_path):
    proc = run_cli("status", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no job has been started from here or anywhere else" in proc.stderr
