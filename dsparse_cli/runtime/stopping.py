"""How a worker stops on SIGTERM/SIGINT without leaving the boards' checkpoints out of step.

The stop request is agreed by all ranks at a step boundary (a 1-element all_reduce per step,
`agree_stop`), so every rank checkpoints the same step, then exits 143. If this rank does not
reach a step boundary within `stop_grace_s` (blocked in a collective whose peer is gone), a
watchdog thread exits 143 without touching the checkpoints: the last one on disk stays valid.
"""

from __future__ import annotations

import os
import signal
import threading

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
    """Turns SIGTERM/SIGINT into a stop request even while the main thread sits in a collective.

    Python runs signal handlers only between bytecodes of the main thread, which a blocked
    collective never reaches; the C-level handler still writes the signal number to the wakeup
    fd, which a watchdog thread reads."""

    def __init__(self, stop: StopControl, grace_s: float, on_stuck):
        self.stop, self.grace_s, self.on_stuck = stop, grace_s, on_stuck
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="stop-watchdog").start()

    def _handler(self, signum, frame) -> None:
        self._request(signum)

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
