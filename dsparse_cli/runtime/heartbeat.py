"""`status.json`: what a worker tells `dsparse status` / the follower about itself.

Written atomically (tmp file + `os.replace`) so a reader never sees half a file; at most every
`interval` seconds while running, and at once on every state change. `time` is the board's own
clock (the reader compares it with the board's clock, so skew between machines does not matter).
"""

from __future__ import annotations

import json
import os
import threading
import time

STATES = ("starting", "running", "finished", "failed", "stopped")
KEYS = ("job", "rank", "name", "state", "epoch", "epochs", "step", "steps_per_epoch", "loss", "accuracy",
        "samples_per_s", "peak_memory_bytes", "base_memory_bytes", "agg_ms_per_step", "bytes_sent_per_step",
        "bytes_recv_per_step", "bytes_per_step", "dense_bytes_per_step", "compression_ratio",
        "compress_ms_per_step", "updated_units", "pid", "time", "error")
# Beyond the contract: whole-process peak, steps done over all epochs and the run's total.
EXTRA_KEYS = ("peak_process_bytes", "global_step", "total_steps")


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Heartbeat:
    def __init__(self, workdir: str, job_id: str, rank: int, name: str, interval: float = 2.0):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "status.json")
        self.interval = float(interval)
        self.doc: dict = {k: None for k in KEYS + EXTRA_KEYS}
        self.doc.update(job=job_id, rank=rank, name=name, state="starting", pid=os.getpid())
        self._last_write = float("-inf")
        self._lock = threading.Lock()  # the stop watchdog may write from its own thread
        self.write()

    def due(self) -> bool:
        """Whether `update` would write now even without a state change."""
        return time.monotonic() - self._last_write >= self.interval

    def update(self, **fields) -> bool:
        """Merge `fields`; write if the state changed or `interval` has passed. -> written?"""
        unknown = set(fields) - set(self.doc)
        if unknown:
            raise KeyError(f"unknown heartbeat keys: {sorted(unknown)}")
        changed = "state" in fields and fields["state"] != self.doc["state"]
        self.doc.update(fields)
        if changed or self.due():
            self.write()
            return True
        return False

    def set_state(self, state: str, error: str | None = None, **fields) -> None:
        if state not in STATES:
            raise ValueError(f"unknown worker state {state!r}")
        self.doc.update(fields, state=state, error=error)
        self.write()

    def write(self) -> None:
        with self._lock:
            self.doc["time"] = time.time()
            write_json_atomic(self.path, self.doc)
            self._last_write = time.monotonic()
