"""Processes the testbed started: identified by PID *and* a marker in their command line."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def is_ours(pid: int | None, marker: str) -> bool:
    """Alive (not a zombie) and its command line mentions `marker` (guards against PID reuse)."""
    if not pid:
        return False
    for _ in range(3):       # the command line reads empty for a moment while a process execs
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state == "Z":
            _reap(pid)
            return False
        if cmdline:
            return marker in cmdline
        time.sleep(0.01)
    return False


def stop(pid: int | None, marker: str, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only if the PID is still ours."""
    if not is_ours(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_ours(pid, marker):
            return
        time.sleep(0.05)
    if is_ours(pid, marker):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Our own child (when up/down run in one process, e.g. a failed up): collect it."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
