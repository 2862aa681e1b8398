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
    from dsparse_cli.jobs.follow import UNREACHABLE_S

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
    # Only peer errors, every board answering: the first of them.
    assert f.failure([_row("b0", "running"), _row("b1", "failed", peer), _row("b2", "failed", peer)])["name"] == "b1"


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
