"""Stop a job: exactly the process groups it recorded, SIGTERM first, SIGKILL after a grace period."""

from __future__ import annotations

import signal
import time

from dsparse_cli.contract import JobState
from dsparse_cli.errors import RemoteError
from dsparse_cli.inventory import Inventory
from dsparse_cli.jobs import records
from dsparse_cli.jobs.boardio import read_state
from dsparse_cli.jobs.records import BoardRun, JobRecord
from dsparse_cli.remote import BoardResult, connect, fan_out
from dsparse_cli.remote.base import Transport

GRACE_S = 10.0
ANSWER_S = 8.0   # a board that does not answer a no-op this fast is not waited for (link down)


def _learn_worker_pid(transport: Transport, run: BoardRun) -> None:
    """The worker's pid is in its heartbeat; needed because torchrun gives it its own session."""
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
    """Stop every board of the job in parallel. Boards that cannot be reached are results, not errors."""
    transports = transports or {}
    by_name = {b.name: b for b in inv.boards}

    def one(target):
        run = next(r for r in rec.boards if r.name == target.name)
        transport = transports.get(run.name) or connect(target, connect_timeout=connect_timeout)
        return stop_board(transport, run, grace_s)

    if rec.state in (JobState.STARTING, JobState.RUNNING):
        rec.advance(JobState.STOPPING)  # so `status` reads the boards' "stopped" heartbeats as asked for
        records.save(inv.state_dir, rec)
    results = fan_out([by_name[r.name] for r in rec.boards if r.process_groups() and r.name in by_name], one)
    if rec.state == JobState.STOPPING:
        rec.advance(state)
    records.save(inv.state_dir, rec)
    return results
