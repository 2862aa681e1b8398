"""How a worker stops on SIGTERM/SIGINT without leaving the boards' checkpoints out of step.

The stop request is agreed by all ranks at a step boundary (a 1-element all_reduce per step,
`agree_stop`), so every rank checkpoints the same step, then exits 143. If this rank does not
reach a step boundary within `stop_grace_s` (blocked in a collective whose peer is gone), a
watchdog thread exits 143 without touching the checkpoints: the last one on disk stays valid.

A board cut off from the master (link down, rank 0 gone) ends itself once the master's store has
not answered for the job's `master_lost_s` (`MasterWatch`): no orphan waits out its collectives.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

EXIT_STOPPED = 143


class Stopped(Exception):
    """Raised at a step boundary once all ranks agreed to stop (after the checkpoint)."""


class StopControl:
    """A stop request. `requested` is set by a signal (via the watchdog) or by tests."""

    def __init__(self):
        self.requested = threading.Event()
        self.done = threading.Event()  # the main thread handled the stop (or finished)
        self.save_lock = threading.Lock()  # held while a checkpoint is being written
        self.reason = "stop requested"


class SignalWatch:
    """Turns SIGTERM/SIGINT into a stop request even while the main thread sits in a collective:
    Python runs signal handlers only between bytecodes of the main thread, which a blocked
    collective never reaches, but the C-level handler still writes the signal number to the
    wakeup fd, which a watchdog thread reads."""

    def __init__(self, stop: StopControl, grace_s: float, on_stuck):
        self.stop, self.grace_s, self.on_stuck = stop, grace_s, on_stuck
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._request(signum))
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="stop-watchdog").start()

    def _request(self, signum: int) -> None:
        self.stop.reason = f"stopped by {signal.Signals(signum).name}"
        self.stop.requested.set()

    def _watch(self, fd: int) -> None:
        while True:
            data = os.read(fd, 1)
            if not data:
                return
            if data[0] in (signal.SIGTERM, signal.SIGINT):
                break
        self._request(data[0])
        if self.stop.done.wait(self.grace_s):
            return
        with self.stop.save_lock:  # never cut a checkpoint write in half
            try:
                self.on_stuck()
            finally:
                os._exit(EXIT_STOPPED)


def agree_stop(stop: StopControl, device: torch.device) -> bool:
    """Whether any rank asked to stop; all ranks stop at the same step, so their checkpoints match."""
    mine = stop.requested.is_set()
    flag = torch.tensor([1 if mine else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not mine:
        stop.reason = "stopped because another board was stopped"
    return bool(flag.item())


class MasterWatch:
    """Calls `on_lost(silent_s)` once the rendezvous store on the master has not answered a round
    trip for `lost_s` (unless the worker is done). A pinger thread does the round trips, which
    can block on a dead link; the watching thread only reads when the last one succeeded."""

    def __init__(self, addr: str, port: int, lost_s: float, stop: StopControl, on_lost, every_s: float = 2.0):
        self.addr, self.port, self.lost_s, self.every_s = addr, port, lost_s, every_s
        self.stop, self.on_lost = stop, on_lost
        self.last_ok = time.monotonic()
        self.threads = [threading.Thread(target=target, daemon=True, name=name)
                        for target, name in ((self._ping, "master-ping"), (self._watch, "master-watch"))]
        for t in self.threads:
            t.start()

    def _ping(self) -> None:
        store = None
        while not self.stop.done.is_set():
            try:
                store = store or dist.TCPStore(self.addr, self.port, is_master=False, wait_for_workers=False,
                                               timeout=timedelta(seconds=max(self.every_s, 1.0)))
                store.check(["dsparse/alive"])   # any answer proves the master is there
                self.last_ok = time.monotonic()
            except Exception:  # refused, reset, timed out: try a fresh connection next time
                store = None
            time.sleep(self.every_s)

    def _watch(self) -> None:
        while not self.stop.done.wait(self.every_s):
            silent = time.monotonic() - self.last_ok
            if silent > self.lost_s:
                self.on_lost(silent)
                return
