"""Read a running job's files and processes on a board: heartbeat, liveness, log tail.

One round trip per board per poll: a single shell command prints the heartbeat, the board's
clock (heartbeat age is measured on the board's own clock, so clock skew does not matter),
whether the recorded process is alive (a zombie counts as dead) and the new log bytes.
Local boards take the same path through the local transport.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from dsparse_cli.jobs.records import BoardRun
from dsparse_cli.remote.base import Transport
from dsparse_cli.remote.shell import alive_check

_SEP = "@@dsparse@@"


@dataclass
class BoardState:
    heartbeat: dict | None
    now: float                # the board's clock
    alive: bool | None        # the launcher; None when no pid was recorded
    log_size: int
    new_log: str
    worker_alive: bool | None = None   # the worker (pid from its heartbeat); None when unknown
    worker_stopped: bool = False       # it exists but is stopped (SIGSTOP): hung, not working

    @property
    def heartbeat_age_s(self) -> float | None:
        if not self.heartbeat or "time" not in self.heartbeat:
            return None
        return max(0.0, self.now - float(self.heartbeat["time"]))


def state_command(run: BoardRun, log_offset: int) -> str:
    status, log = shlex.quote(run.status_path), shlex.quote(run.log_path)
    # Liveness first, heartbeat after: a process found dead wrote its last heartbeat before, so
    # "died without reporting" is never a final heartbeat that landed between the two reads.
    agent, worker = (alive_check(pid) if pid else "echo none" for pid in (run.pid, run.worker_pid))
    return "; ".join([
        f"a=$({agent})", f"w=$({worker})",
        f"cat {status} 2>/dev/null", f"echo {_SEP}", "date +%s.%N", f"echo {_SEP}",
        'echo "$a"', f"echo {_SEP}",
        'echo "$w"', f"echo {_SEP}",
        f"wc -c < {log} 2>/dev/null || echo 0", f"echo {_SEP}",
        f"tail -c +{log_offset + 1} {log} 2>/dev/null | head -c 65536",
    ])


def parse_state(out: str) -> BoardState:
    parts = out.split(_SEP + "\n")
    if len(parts) < 6:
        raise ValueError("unexpected output from the board's state command")
    hb_text, now, agent, worker, size = parts[:5]
    try:
        heartbeat = json.loads(hb_text) if hb_text.strip() else None
    except ValueError:  # a torn read cannot happen (atomic replace), but a bad file can
        heartbeat = None
    return BoardState(heartbeat, float(now.strip() or 0), _alive(agent), int(size.strip() or 0),
                      _SEP.join(parts[5:]), _alive(worker), worker.strip() == "stopped")


def _alive(text: str) -> bool | None:
    text = text.strip()
    return None if text == "none" else text in ("alive", "stopped")


def read_state(transport: Transport, run: BoardRun, log_offset: int = 0, timeout: float = 20.0) -> BoardState:
    return parse_state(transport.run(state_command(run, log_offset), timeout=timeout).stdout)


def last_log_lines(transport: Transport, run: BoardRun, n: int = 12) -> list[str]:
    result = transport.run(f"tail -n {int(n)} {shlex.quote(run.log_path)} 2>/dev/null", timeout=20.0)
    return [line for line in result.stdout.splitlines() if line.strip()]
