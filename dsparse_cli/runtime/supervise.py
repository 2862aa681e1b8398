"""The light launcher: what runs the worker on a board, in the standard library only.

    python -m dsparse_cli.runtime.supervise --rank R --world N --master-addr A --master-port P \\
        -- -m dsparse_cli.runtime.worker --plan PLAN --job JOB

torchrun's agent imports torch and keeps ~290 MiB of private memory next to the worker for the
whole run; this keeps a few MiB. It does for a one-process node what torchrun does with a static
rendezvous: sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and
MASTER_PORT (the worker's env:// rendezvous then runs torch's TCPStore on rank 0), starts the
worker with this interpreter in a session of its own (so the recorded process groups, `stop` and
the follower treat both launchers alike), forwards SIGTERM/SIGINT/SIGHUP to it, and exits with
its exit status (128 + N when signal N killed it). Its last line in the log says how the worker
ended, naming the kernel's OOM killer when the board's memory cgroup counted a kill meanwhile.
The worker gets SIGKILL if the supervisor itself is killed (Linux), so it is never orphaned.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def worker_env(rank: int, world: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The environment torchrun gives the only worker of node `rank`."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the supervisor dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def memory_cgroups(text: str | None = None) -> list[tuple[int, str]]:
    """This process's memory cgroups, as /proc/self/cgroup (or `text`) names them: (1, path) for
    cgroup v1's memory controller, (2, path) for the unified hierarchy (a hybrid host lists
    both); [] if unreadable."""
    if text is None:
        try:
            with open("/proc/self/cgroup") as fh:
                text = fh.read()
        except OSError:
            return []
    entries = [e for e in (line.split(":", 2) for line in text.splitlines()) if len(e) == 3]
    # hierarchy-id:controllers:path; the unified hierarchy lists no controllers
    return [(1 if e[1] else 2, e[2]) for e in entries if not e[1] or "memory" in e[1].split(",")]


def oom_kills() -> int | None:
    """The OOM kills counted in this process's memory cgroup (v2 `memory.events`, v1
    `memory.oom_control`), if readable."""
    for version, path in memory_cgroups():
        counter = (f"/sys/fs/cgroup{path}/memory.events" if version == 2
                   else f"/sys/fs/cgroup/memory{path}/memory.oom_control")
        try:
            with open(counter) as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("oom_kill "))
        except (OSError, StopIteration, ValueError, IndexError):
            continue   # a hybrid host: the other hierarchy may hold the memory controller
    return None


def how_it_ended(status: int, oom_before: int | None, oom_after: int | None) -> str:
    if status >= 0:
        return f"worker exited with status {status}"
    name = signal.Signals(-status).name if -status in signal.valid_signals() else str(-status)
    if -status == signal.SIGKILL and oom_before is not None and oom_after is not None and oom_after > oom_before:
        return f"worker was killed by {name}: the kernel's OOM killer (the board's memory cgroup is full)"
    return f"worker was killed by {name}"


def run(worker_argv: list[str], env: dict[str, str]) -> int:
    oom_before = oom_kills()
    worker = subprocess.Popen([sys.executable, *worker_argv], env=env, start_new_session=True,
                              preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        try:
            worker.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    status = worker.wait()
    print(f"[dsparse launcher] {how_it_ended(status, oom_before, oom_kills())}", file=sys.stderr, flush=True)
    return status if status >= 0 else 128 - status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: supervise --rank R --world N --master-addr A --master-port P -- WORKER ARGS",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m dsparse_cli.runtime.supervise")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    a = p.parse_args(argv[:cut])
    return run(argv[cut + 1:], worker_env(a.rank, a.world, a.master_addr, a.master_port))


if __name__ == "__main__":
    sys.exit(main())
