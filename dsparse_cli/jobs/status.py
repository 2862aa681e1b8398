"""A job's state from its boards' heartbeats and processes (the `dsparse status` contract)."""

from __future__ import annotations

from dsparse_cli.jobs.boardio import BoardState
from dsparse_cli.jobs.records import BoardRun, JobRecord

STALE_AFTER_S = 60.0   # a heartbeat older than this on a live process: stuck (e.g. a hung collective)

BOARD_KEYS = ("epoch", "step", "loss", "accuracy", "samples_per_s", "peak_memory_bytes",
              "agg_ms_per_step", "bytes_per_step")


def classify(state: BoardState | None, error: str | None, stale_after_s: float = STALE_AFTER_S) -> tuple[str, str | None]:
    """(state, error) for one board. `state` None means the board could not be reached."""
    if state is None:
        return "unreachable", error
    hb = state.heartbeat or {}
    reported = hb.get("state")
    if reported == "finished":
        return "finished", None
    if reported in ("failed", "stopped"):
        return "failed", hb.get("error") or f"worker reported {reported}"
    if state.worker_alive is False:
        return "failed", "worker process died without reporting (killed or crashed; see `dsparse logs`)"
    if state.alive is False:
        return "failed", "torchrun exited without the worker reporting (see `dsparse logs`)"
    age = state.heartbeat_age_s
    if age is not None and age > stale_after_s:
        return "stale", f"no heartbeat for {age:.0f}s"
    return "running", None


def board_row(run: BoardRun, state: BoardState | None, error: str | None,
              stale_after_s: float = STALE_AFTER_S) -> dict:
    st, err = classify(state, error, stale_after_s)
    hb = (state.heartbeat if state else None) or {}
    row = {"name": run.name, "rank": run.rank, "state": st}
    row.update({k: hb.get(k) for k in BOARD_KEYS})
    row["heartbeat_age_s"] = round(state.heartbeat_age_s, 1) if state and state.heartbeat_age_s is not None else None
    row["error"] = err
    for extra in ("epochs", "steps_per_epoch", "global_step", "total_steps", "bytes_sent_per_step",
                  "bytes_recv_per_step", "dense_bytes_per_step", "compression_ratio", "compress_ms_per_step",
                  "base_memory_bytes", "peak_process_bytes", "updated_units", "pid"):
        if extra in hb:
            row[extra] = hb[extra]
    return row


def job_state(rec: JobRecord, rows: list[dict]) -> str:
    states = [r["state"] for r in rows]
    if rec.state == "stopping":
        return "stopping"
    if rec.state == "stopped" and "running" not in states:
        return "stopped"
    if all(s == "finished" for s in states):
        return "finished"
    if any(s == "failed" for s in states):
        return "failed"
    if any(s in ("stale", "unreachable") for s in states):
        return "degraded"
    return "running"
