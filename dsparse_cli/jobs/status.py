"""A job's state from its boards' heartbeats and processes (the `dsparse status` contract)."""

from __future__ import annotations

from dsparse_cli.contract import (STALE_AFTER_S, BoardStatus, ContractError, HeartbeatDoc, JobState, JobStatus,
                                  WorkerState)
from dsparse_cli.jobs.boardio import BoardState
from dsparse_cli.jobs.records import BoardRun, JobRecord, load

BOARD_KEYS = ("epoch", "step", "loss", "accuracy", "samples_per_s", "peak_memory_bytes",
              "agg_ms_per_step", "bytes_per_step")


def heartbeat_of(state: BoardState | None) -> HeartbeatDoc | None:
    """The board's heartbeat as the contract reads it; None when missing or not a heartbeat."""
    try:
        return HeartbeatDoc.from_dict(state.heartbeat) if state and state.heartbeat else None
    except ContractError:
        return None


def classify(state: BoardState | None, error: str | None,
             stale_after_s: float = STALE_AFTER_S) -> tuple[BoardStatus, str | None]:
    """(status, error) for one board. `state` None means the board could not be reached."""
    if state is None:
        return BoardStatus.UNREACHABLE, error
    hb = heartbeat_of(state)
    if hb and hb.state == WorkerState.FINISHED:
        return BoardStatus.FINISHED, None
    if hb and hb.state in (WorkerState.FAILED, WorkerState.STOPPED):
        return BoardStatus.FAILED, hb.error or f"worker reported {hb.state}"
    if state.worker_alive is False:
        return BoardStatus.FAILED, "worker process died without reporting (killed or crashed; see `dsparse logs`)"
    if state.alive is False:
        return BoardStatus.FAILED, "the launcher exited without the worker reporting (see `dsparse logs`)"
    if state.worker_stopped:
        return BoardStatus.STALE, "worker process is stopped (SIGSTOP or a debugger): it cannot take part"
    age = state.heartbeat_age_s
    if age is not None and age > stale_after_s:
        return BoardStatus.STALE, f"no heartbeat for {age:.0f}s"
    return BoardStatus.RUNNING, None


def board_row(run: BoardRun, state: BoardState | None, error: str | None,
              stale_after_s: float = STALE_AFTER_S) -> dict:
    """The `status --json` row of one board: the heartbeat's progress keys, then its state."""
    st, err = classify(state, error, stale_after_s)
    hb = (heartbeat_of(state) or HeartbeatDoc()).to_dict()
    row = {"name": run.name, "rank": run.rank, "state": st}
    row.update({k: hb[k] for k in BOARD_KEYS})
    row["heartbeat_age_s"] = round(state.heartbeat_age_s, 1) if state and state.heartbeat_age_s is not None else None
    row["error"] = err
    row.update({k: v for k, v in hb.items() if k not in row and k not in ("job", "state", "time", "name")})
    return row


def job_state(rec: JobRecord, rows: list[dict]) -> JobStatus:
    states = [r["state"] for r in rows]
    if rec.state == JobState.STOPPING:
        return JobStatus.STOPPING
    if rec.state == JobState.STOPPED and BoardStatus.RUNNING not in states:
        return JobStatus.STOPPED
    if all(s == BoardStatus.FINISHED for s in states):
        return JobStatus.FINISHED
    if any(s == BoardStatus.FAILED for s in states):
        return JobStatus.FAILED
    if any(s in (BoardStatus.STALE, BoardStatus.UNREACHABLE) for s in states):
        return JobStatus.DEGRADED
    return JobStatus.RUNNING


def stopped_on_request(state_dir, rec: JobRecord) -> bool:
    """Whether `dsparse stop` (or Ctrl-C in `train`) stopped the job, as its record says now:
    `rec.state` is refreshed from the record. The boards then report "stopped": no failure."""
    rec.state = load(state_dir, rec.id).state
    return rec.state in (JobState.STOPPING, JobState.STOPPED)
