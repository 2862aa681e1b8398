"""Follow a running job: live table, log lines prefixed with the board name, fail fast.

The follower polls every board (one round trip each, in parallel). As soon as one board has
failed — its worker reported an error, its process vanished, or its heartbeat went stale — it
stops every other board rather than letting them wait out a collective timeout, and names the
board that failed first with its last log lines.

A board that stops answering (link down, powered off) is blamed once it has been silent for
UNREACHABLE_S, or at once when the others fail with errors about a lost peer. Polls time out after
POLL_TIMEOUT_S, so one silent board cannot hold up the view of the others for long, and its last
log lines are the ones already streamed (reading them would need the board).
"""

from __future__ import annotations

import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from rich.live import Live
from rich.markup import escape

from dsparse_cli.console import console, err_console
from dsparse_cli.contract import BoardStatus, JobState
from dsparse_cli.inventory import Inventory
from dsparse_cli.jobs import records
from dsparse_cli.jobs.boardio import BoardState, last_log_lines, read_state
from dsparse_cli.jobs.records import JobRecord
from dsparse_cli.jobs.status import STALE_AFTER_S, board_row
from dsparse_cli.remote.base import Transport
from dsparse_cli.remote.parallel import results_of
from dsparse_cli.render import board_table

# Errors a worker reports when *another* board went away: not the root cause.
_PEER_ERROR = re.compile(r"peer|connection|broken pipe|timed? ?out|gloo|nccl|DistBackendError|"
                         r"aborted|store|socket|lost the master", re.I)
POLL_TIMEOUT_S = 4.0   # one board's state read
UNREACHABLE_S = 8.0    # silent this long: the board is lost (a dead link is named within 10 s)
LOG_TAIL = 12
EXIT_WAIT_S = 20.0   # after every board reported finished: how long the launcher may take to exit
SETTLE_S = 5.0       # a failed board's launcher gets this long to exit and log why, before we stop it
PEER_WAIT_S = 3.0    # only peer errors seen: how long to wait for the board that caused them


@dataclass
class Outcome:
    state: JobState                     # finished | failed
    rows: list[dict]
    failed_board: str | None = None
    error: str | None = None
    last_lines: list[str] = field(default_factory=list)
    lingering: bool = False             # finished, but some process had not exited yet


class Follower:
    def __init__(self, inv: Inventory, rec: JobRecord, plan: dict, transports: dict[str, Transport], *,
                 show_logs: bool = True, live: bool = True, poll_s: float = 0.5,
                 stale_after_s: float = STALE_AFTER_S):
        self.inv, self.rec, self.plan, self.transports = inv, rec, plan, transports
        self.show_logs, self.live, self.poll_s, self.stale_after_s = show_logs, live, poll_s, stale_after_s
        self.offsets = {r.name: 0 for r in rec.boards}
        self.partial = {r.name: "" for r in rec.boards}
        self.last_contact = {r.name: time.monotonic() for r in rec.boards}
        self.peer_errors_since: float | None = None   # when only peer errors were first seen
        self.tail = {r.name: deque(maxlen=LOG_TAIL) for r in rec.boards}
        self.alive = {r.name: True for r in rec.boards}  # any of the board's processes, last poll
        self.budgets = {d["name"]: d.get("budget_bytes") for d in plan["devices"]}
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(rec.boards)))

    def _poll_one(self, run) -> tuple[BoardState | None, str | None]:
        # A board already silent gets only what is left of UNREACHABLE_S: it is named on time,
        # not a whole poll timeout later.
        silent = time.monotonic() - self.last_contact[run.name]
        timeout = max(1.0, min(POLL_TIMEOUT_S, UNREACHABLE_S - silent))
        try:
            return read_state(self.transports[run.name], run, self.offsets[run.name], timeout=timeout), None
        except Exception as exc:  # one board's trouble is that board's row
            return None, f"{type(exc).__name__}: {exc}"

    def poll(self) -> list[dict]:
        results = results_of([self.pool.submit(self._poll_one, run) for run in self.rec.boards])
        rows, changed = [], False
        for run, (state, err) in zip(self.rec.boards, results):
            if state is not None:
                self.last_contact[run.name] = time.monotonic()
                self.alive[run.name] = bool(state.alive or state.worker_alive)
                self._emit_log(run.name, state)
                pid = (state.heartbeat or {}).get("pid")
                if isinstance(pid, int) and run.worker_pid != pid:
                    run.worker_pid, changed = pid, True
            rows.append(board_row(run, state, err, self.stale_after_s))
            if state is None:
                silent = time.monotonic() - self.last_contact[run.name]
                rows[-1]["error"] = f"did not answer for {silent:.0f}s ({err})"
        if changed:
            records.save(self.inv.state_dir, self.rec)
        return rows

    def _emit_log(self, name: str, state: BoardState) -> None:
        self.offsets[name] += len(state.new_log.encode())
        text = self.partial[name] + state.new_log
        *lines, self.partial[name] = text.split("\n")
        for line in filter(str.strip, lines):
            self.tail[name].append(line)
            if self.show_logs:
                err_console.print(f"[cyan]{name}[/] | " + escape(line), highlight=False)

    def failure(self, rows: list[dict]) -> dict | None:
        """The board to blame, if any: one whose own error is not about a vanished peer, else a
        board that stopped answering, else (after PEER_WAIT_S) the first with a peer error."""
        bad = [r for r in rows if r["state"] in (BoardStatus.FAILED, BoardStatus.STALE)]
        root = [r for r in bad if not _PEER_ERROR.search(r["error"] or "")]
        silent = [r for r in rows if r["state"] == BoardStatus.UNREACHABLE]
        lost = [r for r in silent if time.monotonic() - self.last_contact[r["name"]] >= UNREACHABLE_S]
        if root or lost:
            return (root or lost)[0]
        if bad and silent:   # only peer errors: a board that stopped answering is the lost peer
            return silent[0]
        if not bad:
            self.peer_errors_since = None
            return None
        # Every board answers and the only errors are about a lost peer: the board that caused them
        # (a killed worker) may show it only on the next poll, so give it PEER_WAIT_S to.
        self.peer_errors_since = self.peer_errors_since or time.monotonic()
        return bad[0] if time.monotonic() - self.peer_errors_since >= PEER_WAIT_S else None

    def run(self) -> Outcome:
        try:
            if self.live:
                view = partial(board_table, f"job {self.rec.id}", budgets=self.budgets)
                with Live(view([]), console=console, refresh_per_second=2, transient=False) as live:
                    return self._loop(lambda rows: live.update(view(rows)))
            return self._loop(lambda rows: None)
        finally:
            self.pool.shutdown(wait=False)

    def _loop(self, show) -> Outcome:
        finished_at = None
        while True:
            rows = self.poll()
            show(rows)
            if all(r["state"] == BoardStatus.FINISHED for r in rows):
                # Wait for the launcher to exit too: until then rank 0 holds the rendezvous port.
                finished_at = finished_at or time.monotonic()
                lingering = any(self.alive.values())
                if not lingering or time.monotonic() - finished_at > EXIT_WAIT_S:
                    return Outcome(JobState.FINISHED, rows, lingering=lingering)
                time.sleep(self.poll_s)
                continue
            culprit = self.failure(rows)
            if culprit:
                if culprit["state"] == BoardStatus.UNREACHABLE:
                    lines = list(self.tail[culprit["name"]])
                else:
                    lines = self._last_lines(culprit["name"])
                return Outcome(JobState.FAILED, rows, culprit["name"], culprit["error"], lines)
            time.sleep(self.poll_s)

    def _last_lines(self, name: str) -> list[str]:
        """The failed board's last log lines, once its launcher had a moment to notice its dead worker
        and log the cause (exit code, signal): otherwise our stop would cut it short, leaving nothing to show."""
        run = next(r for r in self.rec.boards if r.name == name)
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            state, _ = self._poll_one(run)
            if state is None or not state.alive or state.worker_stopped:   # a stopped worker logs nothing
                break
            time.sleep(0.5)
        try:
            return last_log_lines(self.transports[name], run)
        except Exception as exc:
            return [f"(could not read the log: {exc})"]

