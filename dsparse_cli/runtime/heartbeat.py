"""`status.json`: what a worker tells `dsparse status` / the follower about itself.

The document is `contract.HeartbeatDoc`. Written atomically (tmp file + `os.replace`) so a reader
never sees half a file; at most every `interval` seconds while running, and at once on every
state change.
"""

from __future__ import annotations

import json
import os
import threading
import time

from dsparse_cli.contract import (HEARTBEAT_EXTRA_KEYS, HEARTBEAT_KEYS, WORKER_TRANSITIONS, HeartbeatDoc, JobSpec,
                                  check_transition)


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Heartbeat:
    def __init__(self, workdir: str, job_id: str, rank: int, name: str, interval: float = JobSpec.heartbeat_s):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "status.json")
        self.interval = float(interval)
        self.record = HeartbeatDoc(job=job_id, rank=rank, name=name, pid=os.getpid())
        self._last_write = float("-inf")
        self._lock = threading.Lock()  # the stop watchdog may write from its own thread
        self.write()

    @property
    def state(self) -> str:
        return self.record.state

    def due(self) -> bool:
        """Whether `update` would write now even without a state change."""
        return time.monotonic() - self._last_write >= self.interval

    def update(self, **fields) -> bool:
        """Merge `fields`; write if the state changed or `interval` has passed. -> written?"""
        changed = "state" in fields and fields["state"] != self.record.state
        self._merge(fields)
        if changed or self.due():
            self.write()
            return True
        return False

    def set_state(self, state: str, error: str | None = None, **fields) -> None:
        self._merge({**fields, "state": state, "error": error})
        self.write()

    def _merge(self, fields: dict) -> None:
        unknown = set(fields) - set(HEARTBEAT_KEYS) - set(HEARTBEAT_EXTRA_KEYS)
        if unknown:
            raise KeyError(f"unknown heartbeat keys: {sorted(unknown)}")
        if "state" in fields:   # an unknown state is a ValueError too
            check_transition(WORKER_TRANSITIONS, self.record.state, fields["state"])
            fields["state"] = str(fields["state"])
        for key, value in fields.items():
            setattr(self.record, key, value)

    def write(self) -> None:
        with self._lock:
            self.record.time = time.time()
            write_json_atomic(self.path, self.record.to_dict())
            self._last_write = time.monotonic()
