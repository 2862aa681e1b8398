"""Transport for ``local: true`` boards: plain subprocesses on this machine."""

from __future__ import annotations

import os
import selectors
import shutil
import signal as _signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Iterator

from dsparse_cli.errors import RemoteError
from dsparse_cli.remote.base import (
    TIMEOUT_RC, Detached, LineSplitter, RunResult, Transport, timeout_note,
)

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

SH = "/bin/sh"
# Detached children we started, kept so alive() can reap them (no zombies, no
# "still running" ResourceWarnings). Module-level: they outlive the transport object.
_DETACHED: dict[int, subprocess.Popen] = {}
_DETACHED_LOCK = threading.Lock()


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, _signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class LocalTransport(Transport):
    def __init__(self, target: "Target"):
        self.target = target

    # -- commands -------------------------------------------------------------------------
    def run(self, argv_or_cmd: str, *, timeout: float, input: bytes | None = None) -> RunResult:
        # Own session, so a timeout kills the command's children too, not just the shell.
        proc = subprocess.Popen(
            [SH, "-c", argv_or_cmd], start_new_session=True,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self._kill_and_collect(proc)
            return RunResult(TIMEOUT_RC, _decode(out), _decode(err) + timeout_note(timeout))
        except BaseException:  # Ctrl-C: leave nothing behind
            self._kill_and_collect(proc)
            raise
        return RunResult(proc.returncode, _decode(out), _decode(err))

    @staticmethod
    def _kill_and_collect(proc: subprocess.Popen) -> tuple[bytes, bytes]:
        _kill_group(proc.pid)
        try:
            return proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # A grandchild escaped the group (setsid) and still holds the pipes: give up on them.
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
            proc.wait()
            return b"", b""

    def stream(self, cmd: str, *, timeout: float | None) -> Iterator[str]:
        proc = subprocess.Popen([SH, "-c", cmd], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = None if timeout is None else time.monotonic() + timeout
        lines = LineSplitter()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        raise RemoteError(f"{self.target.name}: command timed out after "
                                          f"{timeout:g}s: {cmd}")
                    if not sel.select(wait):
                        continue
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    yield from lines.feed(chunk)
            yield from lines.flush()
        finally:
            # Early exit (timeout, consumer stopped iterating, Ctrl-C): stop the command.
            if proc.poll() is None:
                _kill_group(proc.pid)
            proc.stdout.close()
            proc.wait()

    # -- files ----------------------------------------------------------------------------
    def put(self, local_path: str, remote_path: str) -> None:
        src, dst = os.path.expanduser(local_path), os.path.expanduser(remote_path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            shutil.copyfile(src, dst)
            shutil.copymode(src, dst)
        except OSError as e:
            raise RemoteError(f"cannot copy {src} to {dst}: {e.strerror or e}") from e

    def get(self, remote_path: str, local_path: str, *, timeout: float = 300) -> None:
        self.put(remote_path, local_path)   # both ends are this machine

    # -- detached processes ---------------------------------------------------------------
    def start_detached(self, cmd: str, *, log_path: str, env: dict[str, str] | None = None,
                       cwd: str | None = None) -> Detached:
        log = os.path.expanduser(log_path)
        workdir = os.path.expanduser(cwd) if cwd else None
        if workdir and not os.path.isdir(workdir):
            raise RemoteError(f"{self.target.name}: working directory {cwd} does not exist")
        try:
            os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [SH, "-c", cmd], cwd=workdir, env={**os.environ, **(env or {})},
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)  # setsid in the child: pid == pgid == sid
        except OSError as e:
            raise RemoteError(f"{self.target.name}: cannot start {cmd!r}: {e}") from e
        with _DETACHED_LOCK:
            _DETACHED[proc.pid] = proc
        return Detached(pid=proc.pid, pgid=proc.pid)

    def signal(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            raise RemoteError(f"not allowed to signal process group {pgid}: {e.strerror}") from e

    def alive(self, pid: int) -> bool:
        # Reap our own children first (a zombie of ours would linger); anything else gets the
        # shared shell check.
        with _DETACHED_LOCK:
            proc = _DETACHED.get(pid)
            if proc is not None:
                if proc.poll() is None:
                    return True
                del _DETACHED[pid]
                return False
        if pid > 0:  # waitpid would mean "any child" / "my process group"
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return False  # our child, now reaped
            except ChildProcessError:
                pass  # not our child: its parent (or init) reaps it
        return super().alive(pid)

    def close(self) -> None:
        pass
