"""Job records, the board-state read (against real processes and files), and status rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dsparse_cli.errors import ConfigError
from dsparse_cli.inventory import Target
from dsparse_cli.jobs import records
from dsparse_cli.jobs.boardio import read_state
from dsparse_cli.jobs.records import BoardRun, JobRecord
from dsparse_cli.jobs.status import board_row, classify, job_state
from dsparse_cli.remote.local import LocalTransport


def local_target(tmp_path) -> Target:
    return Target("here", "127.0.0.1", 22, None, [], None, sys.executable, str(tmp_path), True, None, None, "auto")


def test_record_round_trip_and_latest(tmp_path):
    rec = JobRecord("j1", "c", None, "abc", "127.0.0.1", 29500, [BoardRun("b0", 0, True, str(tmp_path / "r"), 11, 11)])
    records.save(tmp_path, rec)
    rec2 = JobRecord("j2", "c", None, "abc", "127.0.0.1", 29500, [])
    records.save(tmp_path, rec2)
    assert records.load(tmp_path).id == "j2"            # latest
    loaded = records.load(tmp_path, "j1")
    assert loaded.boards[0].pgid == 11 and loaded.boards[0].process_groups() == [11]
    with pytest.raises(ConfigError, match="no job 'nope'"):
        records.load(tmp_path, "nope")


def test_no_job_yet(tmp_path):
    with pytest.raises(ConfigError, match="no job has been started"):
        records.load(tmp_path)


def test_read_state_of_live_then_dead_process(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "worker.log").write_text("line one\nline two\n")
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "time": time.time() - 5, "step": 3}))
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    run = BoardRun("here", 0, True, str(run_dir), proc.pid, proc.pid)
    transport = LocalTransport(local_target(tmp_path))
    try:
        st = read_state(transport, run)
        assert st.alive is True and st.worker_alive is None
        assert st.heartbeat["step"] == 3 and 4 <= st.heartbeat_age_s < 60
        assert st.new_log == "line one\nline two\n" and st.log_size == len(st.new_log)
        assert read_state(transport, run, log_offset=9).new_log == "line two\n"
        assert classify(st, None) == ("running", None)
        assert classify(st, None, stale_after_s=1)[0] == "stale"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    st = read_state(transport, run)
    assert st.alive is False
    state, err = classify(st, None)
    assert state == "failed" and "without the worker reporting" in err


def test_a_stopped_worker_is_named_at_once_not_after_the_stale_timeout(tmp_path):
    """SIGSTOP (a hung worker): alive to kill -0 and to stop's process check, but stale at the
    first poll, with a fresh heartbeat and long before STALE_AFTER_S."""
    import signal

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "time": time.time()}))
    launcher = subprocess.Popen(["sleep", "30"], start_new_session=True)
    worker = subprocess.Popen(["sleep", "30"], start_new_session=True)
    run = BoardRun("here", 0, True, str(run_dir), launcher.pid, launcher.pid, worker_pid=worker.pid)
    transport = LocalTransport(local_target(tmp_path))
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        st = read_state(transport, run)
        assert st.worker_alive is True and st.worker_stopped and transport.alive(worker.pid) is True
        state, err = classify(st, None)
        assert state == "stale" and "stopped (SIGSTOP" in err
        os.kill(worker.pid, signal.SIGCONT)
        assert not read_state(transport, run).worker_stopped
    finally:
        for p in (launcher, worker):
            os.killpg(p.pid, 9)
            p.wait()


def test_dead_worker_is_failed_even_when_agent_lives(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "time": time.time()}))
    agent = subprocess.Popen(["sleep", "30"], start_new_session=True)
    worker = subprocess.Popen(["true"])
    worker.wait()
    run = BoardRun("here", 0, True, str(run_dir), agent.pid, agent.pid, worker_pid=worker.pid)
    try:
        st = read_state(LocalTransport(local_target(tmp_path)), run)
        assert st.alive and st.worker_alive is False
        assert classify(st, None)[0] == "failed"
    finally:
        os.killpg(agent.pid, 9)
        agent.wait()


@pytest.mark.parametrize("reported,expected", [("finished", "finished"), ("failed", "failed"), ("stopped", "failed")])
def test_reported_states_win(reported, expected, tmp_path):
    from dsparse_cli.jobs.boardio import BoardState

    st = BoardState({"state": reported, "time": 0, "error": "boom"}, now=10_000, alive=False, log_size=0, new_log="")
    assert classify(st, None)[0] == expected


def test_unreachable_and_job_state():
    run = BoardRun("b", 1, False, "/w/runs/x")
    row = board_row(run, None, "connection refused on h:22")
    assert row["state"] == "unreachable" and row["error"] == "connection refused on h:22"
    for key in ("name", "rank", "state", "epoch", "step", "loss", "accuracy", "samples_per_s",
                "peak_memory_bytes", "agg_ms_per_step", "bytes_per_step", "heartbeat_age_s", "error"):
        assert key in row
    rec = JobRecord("j", "c", None, "h", "a", 1, [run])
    assert job_state(rec, [{"state": "finished"}, {"state": "finished"}]) == "finished"
    assert job_state(rec, [{"state": "finished"}, {"state": "failed"}]) == "failed"
    assert job_state(rec, [{"state": "running"}, {"state": "unreachable"}]) == "degraded"


def _follower(names):
    from dsparse_cli.jobs.follow import Follower

    rec = JobRecord("j", "c", None, "abc", "127.0.0.1", 29500,
                    [BoardRun(n, i, True, f"/r/{n}", 10 + i, 10 + i) for i, n in enumerate(names)])
    return Follower(None, rec, {"devices": [{"name": n} for n in names]}, {}, live=False)


def _row(name, state, error=None):
    return {"name": name, "state": state, "error": error}


def test_blame_prefers_a_root_cause_over_peer_errors_and_the_silent_board_over_its_peers():
    from dsparse_cli.jobs.follow import PEER_WAIT_S, UNREACHABLE_S

    f = _follower(["b0", "b1", "b2"])
    peer = "DistBackendError: Timed out waiting 30000ms for send operation to complete"
    running = [_row("b0", "running"), _row("b1", "running"), _row("b2", "running")]
    assert f.failure(running) is None
    # b2 misses a poll: not yet lost on its own...
    assert f.failure([_row("b0", "running"), _row("b1", "running"), _row("b2", "unreachable", "timeout")]) is None
    # ...but once its peers fail on a lost peer, the silent board is the cause.
    rows = [_row("b0", "failed", peer), _row("b1", "failed", peer), _row("b2", "unreachable", "timeout")]
    assert f.failure(rows)["name"] == "b2"
    # A board silent for UNREACHABLE_S is lost even while the others still wait in a collective.
    f.last_contact["b1"] -= UNREACHABLE_S + 1
    assert f.failure([_row("b0", "running"), _row("b1", "unreachable", "timeout"), _row("b2", "running")])["name"] == "b1"
    # A board with an error of its own beats everything else.
    rows = [_row("b0", "failed", peer), _row("b1", "unreachable", "t"), _row("b2", "failed", "CUDA out of memory")]
    assert f.failure(rows)["name"] == "b2"
    # Only peer errors, every board answering: the cause may show on the next poll (a killed worker
    # is seen dead a poll after its peers fail on it)...
    only_peers = [_row("b0", "running"), _row("b1", "failed", peer), _row("b2", "failed", peer)]
    assert f.failure(only_peers) is None
    assert f.failure([_row("b0", "failed", "worker process died without reporting"), *only_peers[1:]])["name"] == "b0"
    # ...and when it does not within PEER_WAIT_S, the first of them is named.
    assert f.failure(only_peers) is None
    f.peer_errors_since -= PEER_WAIT_S
    assert f.failure(only_peers)["name"] == "b1"


def test_a_silent_board_is_polled_with_what_is_left_of_its_silence_budget(monkeypatch):
    """A dead link is named UNREACHABLE_S after the last answer, not a whole poll timeout later."""
    from dsparse_cli.jobs import follow

    f = _follower(["b0", "b1"])
    f.transports = {"b0": None, "b1": None}
    asked = {}
    monkeypatch.setattr(follow, "read_state", lambda t, run, offset, timeout: asked.__setitem__(run.name, timeout))
    f.last_contact["b1"] -= follow.UNREACHABLE_S - 2.5
    f.poll()
    assert asked["b0"] == follow.POLL_TIMEOUT_S and asked["b1"] == pytest.approx(2.5, abs=0.1)
    f.last_contact["b1"] -= 10
    f.poll()
    assert asked["b1"] == 1.0     # still asked, briefly: it may be back


def test_board_table_follower_budgets_and_status_title():
    """The follower's live table takes budgets from the plan; `status` from its rows, under a title
    that counts the boards in each state."""
    from rich.console import Console

    from dsparse_cli.render import board_table, status_table

    rows = [{**_row("b0", "running"), "epoch": 1, "epochs": 2, "global_step": 3, "total_steps": 8,
             "peak_process_bytes": 1024**3, "budget_bytes": 2 * 1024**3},
            {**_row("b1", "failed", "boom"), "step": 4}, _row("b2", "failed")]
    console = Console(width=200, record=True, no_color=True)
    console.print(board_table("job j", rows, {"b0": 1536 * 1024**2}))
    console.print(status_table({"job": "j", "state": "failed", "boards": rows}))
    text = console.export_text()
    assert "1.0 GiB / 1.5 GiB" in text and "1.0 GiB / 2.0 GiB" in text
    assert "1/2" in text and "3/8" in text and "job j: failed (2 failed, 1 running)" in text


def test_stopped_on_request_refreshes_the_record_state(tmp_path):
    from dsparse_cli.jobs.status import stopped_on_request

    rec = JobRecord("j", "c", None, "abc", "127.0.0.1", 29500, [])
    records.save(tmp_path, rec)
    assert not stopped_on_request(tmp_path, rec)
    records.save(tmp_path, JobRecord("j", "c", None, "abc", "127.0.0.1", 29500, [], state="stopping"))
    assert stopped_on_request(tmp_path, rec) and rec.state == "stopping"


# -- self-contained records: each board's target, checked against cluster.yaml ---------------------
def _recorded_job(tmp_path, yaml_text: str):
    """A saved job of every board in `yaml_text` (written as tmp_path/cluster.yaml), no processes."""
    from types import SimpleNamespace

    from dsparse_cli.inventory import load_inventory
    from dsparse_cli.jobs.launch import new_record

    (tmp_path / "cluster.yaml").write_text(yaml_text)
    inv = load_inventory(tmp_path / "cluster.yaml")
    plan = SimpleNamespace(devices=[SimpleNamespace(name=b.name, rank=i) for i, b in enumerate(inv.boards)])
    rec = new_record(inv, plan, "j1", "h")
    records.save(inv.state_dir, rec)
    return inv, rec


def test_record_keeps_each_boards_target(tmp_path):
    key = tmp_path / "id_b0"
    key.write_text("not really a key")
    inv, rec = _recorded_job(tmp_path, f"boards:\n  - {{name: b0, host: 127.0.0.1, port: 2222, user: u, "
                                       f"identity_file: {key}, workdir: /w}}\n")
    assert rec.inventory == str(tmp_path / "cluster.yaml")   # absolute: found from any directory
    loaded = records.load(inv.state_dir, "j1").boards[0].target
    assert loaded == inv.board("b0") and loaded.identity_files == [str(key)]
    doc = json.loads((inv.state_dir / "jobs" / "j1.json").read_text())
    assert doc["boards"][0]["target"]["port"] == 2222
    doc["boards"][0]["target"]["from_a_newer_version"] = 1   # keys a Target lacks are left out
    (inv.state_dir / "jobs" / "j1.json").write_text(json.dumps(doc))
    assert records.load(inv.state_dir, "j1").boards[0].target == loaded


def test_reach_warns_about_changes_and_uses_the_recorded_target(tmp_path, capsys):
    from dsparse_cli.jobs.reach import job_inventory

    inv, rec = _recorded_job(tmp_path, "boards:\n  - {name: b0, host: 127.0.0.1, port: 2222, workdir: /w}\n"
                                       "  - {name: b1, local: true, workdir: /l}\n")
    (tmp_path / "cluster.yaml").write_text("boards:\n  - {name: b0, host: 127.0.0.2, port: 2223, workdir: /w}\n")
    job_inv = job_inventory(rec, inv.state_dir)
    assert job_inv.board("b0").host == "127.0.0.1" and job_inv.board("b1").workdir == "/l"
    err = capsys.readouterr().err
    assert "board b0 changed in" in err and "host '127.0.0.1' -> '127.0.0.2', port 2222 -> 2223" in err
    assert "board b1 is no longer in" in err

    (tmp_path / "cluster.yaml").write_text("boards: [\n")   # unreadable: the record is enough
    assert [b.name for b in job_inventory(rec, inv.state_dir).boards] == ["b0", "b1"]
    assert "cannot be used" in capsys.readouterr().err



def test_reach_warns_when_the_jobs_own_board_is_now_broken(tmp_path, capsys):
    """Needs inventory's per-board errors (`Target.error`): the file still loads, the board carries
    why it cannot be used, and the job's recorded target is used with a warning."""
    from dsparse_cli.jobs.reach import job_inventory

    key = tmp_path / "id_b0"
    key.write_text("not really a key")
    inv, rec = _recorded_job(tmp_path, f"boards:\n  - {{name: b0, host: 127.0.0.1, identity_file: {key}}}\n")
    key.unlink()
    assert job_inventory(rec, inv.state_dir).board("b0").identity_files == [str(key)]
    assert "board b0 is broken in" in capsys.readouterr().err

def test_a_record_without_targets_falls_back_to_cluster_yaml(tmp_path):
    """Records written before targets were kept (relative cluster path, no `target`) still load."""
    from dsparse_cli.jobs.reach import job_inventory

    inv, rec = _recorded_job(tmp_path, "name: old\nboards:\n  - {name: b0, local: true, workdir: /l}\n")
    doc = json.loads(rec.to_json())
    doc["inventory"] = "cluster.yaml"
    for b in doc["boards"]:
        del b["target"]
    (inv.state_dir / "jobs" / "j1.json").write_text(json.dumps(doc))
    old = records.load(inv.state_dir, "j1")
    assert old.boards[0].target is None
    assert job_inventory(old, inv.state_dir).board("b0").workdir == "/l"
    (tmp_path / "cluster.yaml").write_text("boards: [\n")
    with pytest.raises(ConfigError, match="predates recorded board targets"):
        job_inventory(old, inv.state_dir)


def test_the_index_orders_jobs_by_their_last_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARSE_STATE_HOME", str(tmp_path / "home"))
    rec = JobRecord("j1", "c", None, "abc", "127.0.0.1", 29500, [])
    records.save(tmp_path / "s1", rec)
    records.save(tmp_path / "s2", JobRecord("j2", "c", None, "abc", "127.0.0.1", 29500, []))
    assert records.indexed()[1].id == "j2"
    records.save(tmp_path / "s1", rec)            # saved again (stop, status): stays older
    assert records.indexed()[1].id == "j2"
    rec.attempts += 1                             # resumed: the newest
    records.save(tmp_path / "s1", rec)
    state_dir, latest = records.indexed()
    assert latest.id == "j1" and state_dir == (tmp_path / "s1").resolve()
    assert records.indexed("nope") is None
    assert set(json.loads((tmp_path / "home" / "jobs.json").read_text())["jobs"]) == {"j1", "j2"}
