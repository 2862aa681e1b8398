"""Stop a job: exactly the process groups it recorded, SIGTERM first, SIGKILL after a grace period.

A job is `stopped` only once every recorded process is gone: a board that cannot be reached, or
whose processes survive, leaves the job `stopping` and is named in the results.
"""

from __future__ import annotations

import signal
import time

from dsparse_cli.contract import JobState
from dsparse_cli.errors import RemoteError
from dsparse_cli.inventory import Inventory, Target
from dsparse_cli.jobs import records
from dsparse_cli.jobs.boardio import read_state
from dsparse_cli.jobs.reach import each_board
from dsparse_cli.jobs.records import BoardRun, JobRecord
from dsparse_cli.remote import BoardResult, connect
from dsparse_cli.remote.base import Transport

GRACE_S = 10.0
ANSWER_S = 8.0   # a board that does not answer a no-op this fast is not waited for (link down)


def _learn_worker_pid(transport: Transport, run: BoardRun) -> None:
    """The worker's pid is in its heartbeat; needed because the launcher gives it its own session."""
    if run.worker_pid:
        return
    try:
        hb = read_state(transport, run).heartbeat
    except Exception:
        return
    if hb and isinstance(hb.get("pid"), int):
        run.worker_pid = hb["pid"]


def stop_board(transport: Transport, run: BoardRun, grace_s: float = GRACE_S) -> list[int]:
    """Signal the board's recorded groups; return the pids still alive afterwards (should be none)."""
    if transport.run("true", timeout=ANSWER_S).rc != 0:
        raise RemoteError(f"{run.name} did not answer within {ANSWER_S:g}s, so its processes could not be "
                          "signalled; its worker gives up by itself after the collective timeout")
    _learn_worker_pid(transport, run)
    groups = run.process_groups()
    for g in groups:
        transport.signal(g, signal.SIGTERM)
        transport.signal(g, signal.SIGCONT)   # a stopped (hung) worker handles SIGTERM only once resumed
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(transport.alive(g) for g in groups):
        time.sleep(0.2)
    for g in groups:
        if transport.alive(g):
            transport.signal(g, signal.SIGKILL)
    time.sleep(0.2)
    return [g for g in groups if transport.alive(g)]


def stop_job(inv: Inventory, rec: JobRecord, *, transports: dict[str, Transport] | None = None,
             grace_s: float = GRACE_S, connect_timeout: float = 10.0,
             state: JobState = JobState.STOPPED) -> list[BoardResult]:
    """Stop every board that recorded a process, in parallel, reaching each through `transports`
    or `inv` (for `dsparse stop`: the job's recorded targets, see `reach.open_job`). The job moves
    to `state` only when every recorded process is gone; unreachable boards are results, not errors."""
    transports = transports or {}

    def one(run: BoardRun, target: Target) -> list[int]:
        if run.name in transports:
            return stop_board(transports[run.name], run, grace_s)
        with connect(target, connect_timeout=connect_timeout) as transport:
            return stop_board(transport, run, grace_s)

    if rec.state in (JobState.STARTING, JobState.RUNNING):
        rec.advance(JobState.STOPPING)  # so `status` reads the boards' "stopped" heartbeats as asked for
        records.save(inv.state_dir, rec)
    results = each_board(inv, [r for r in rec.boards if r.process_groups()], one)
    if rec.state == JobState.STOPPING and all(r.ok and not r.value for r in results):
        rec.advance(state)
    records.save(inv.state_dir, rec)
    return results


def outcome(result: BoardResult) -> dict:
    """One board of `stop --json`: `stopped`, `alive` (pids that survived SIGKILL) or `unreachable`."""
    if not result.ok:
        return {"name": result.name, "state": "unreachable", "alive": None, "error": result.error}
    if result.value:
        return {"name": result.name, "state": "alive", "alive": result.value,
                "error": f"processes still alive after SIGKILL: {result.value}"}
    return {"name": result.name, "state": "stopped", "alive": [], "error": None}
