"""The transport interface every board is reached through (SSH or local subprocess).

Conventions shared by both implementations:

* ``cmd`` strings run under ``/bin/sh -c`` on the board.
* ``run`` never raises for a slow command: on timeout it kills what it started and returns
  ``rc == TIMEOUT_RC`` (124, like coreutils ``timeout``) with a note appended to stderr.
  It raises ``RemoteError`` only when the board itself cannot be talked to.
* ``stream`` yields output lines (stdout and stderr merged); on timeout it kills the command
  and raises ``RemoteError`` (a generator has no result object to carry an rc).
* ``start_detached`` puts the command in its own session, so ``pid == pgid`` and
  ``signal(pgid, ...)`` reaches every process it spawned (torchrun and its workers).
"""

from __future__ import annotations

import base64
import os
from abc import ABC, abstractmethod
from shlex import quote as shlex_quote
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from dsparse_cli.errors import RemoteError
from dsparse_cli.remote.shell import alive_check, sh_path

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

TIMEOUT_RC = 124
OP_TIMEOUT = 30.0  # small housekeeping commands (signal, alive, start_detached)


def timeout_note(timeout: float) -> str:
    return f"\n[dsparse] command timed out after {timeout:g}s and was killed\n"


class LineSplitter:
    """Turns a byte stream that arrives in arbitrary chunks into decoded lines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        return [_decode_line(line) for line in lines]

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, b""
        return [_decode_line(rest)] if rest else []


def _decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def timed_out(self) -> bool:
        return self.rc == TIMEOUT_RC

    def last_error(self, default: str = "") -> str:
        """The last line of stderr, for a one-line error; else `default` (else the exit status)."""
        return (self.stderr.strip().splitlines() or [default or f"exit status {self.rc}"])[-1]


@dataclass
class Detached:
    pid: int
    pgid: int


class Transport(ABC):
    target: "Target"

    @abstractmethod
    def run(self, argv_or_cmd: str, *, timeout: float, input: bytes | None = None) -> RunResult:
        """Run a shell command to completion; capture stdout/stderr and the exit status."""

    @abstractmethod
    def stream(self, cmd: str, *, timeout: float | None) -> Iterator[str]:
        """Yield output lines (without the newline) as the command prints them."""

    @abstractmethod
    def put(self, local_path: str, remote_path: str) -> None:
        """Copy a local file to the board, creating parent directories."""

    def get(self, remote_path: str, local_path: str, *, timeout: float = 300) -> None:
        """Copy a file from the board (what SSH does when it has no SFTP): the board's python
        prints it base64-encoded; written beside `local_path`, then renamed."""
        script = "import base64,sys; sys.stdout.write(base64.b64encode(open(sys.argv[1], 'rb').read()).decode())"
        r = self.run(f"{sh_path(self.target.python)} -c {shlex_quote(script)} {sh_path(remote_path)}",
                     timeout=timeout)
        if r.rc != 0:
            raise RemoteError(f"cannot read {remote_path} on {self.target.name}: {r.last_error()}")
        tmp = f"{local_path}.part"
        with open(tmp, "wb") as fh:
            fh.write(base64.b64decode(r.stdout))
        os.replace(tmp, local_path)

    @abstractmethod
    def start_detached(self, cmd: str, *, log_path: str, env: dict[str, str] | None = None,
                       cwd: str | None = None) -> Detached:
        """Start ``cmd`` in its own session, output appended to ``log_path``; don't wait."""

    @abstractmethod
    def signal(self, pgid: int, sig: int) -> None:
        """Send ``sig`` to the whole process group; a group that is gone is not an error."""

    def alive(self, pid: int) -> bool:
        """True while the process exists and is not a zombie, stopped or not (one shell check for all)."""
        r = self.run(alive_check(pid), timeout=OP_TIMEOUT)
        if r.stdout.strip() not in ("alive", "stopped", "dead"):
            raise RemoteError(f"{self.target.name}: cannot check process {pid}: "
                              f"{(r.stderr or r.stdout).strip()}")
        return r.stdout.strip() != "dead"   # a stopped process still holds what it holds

    @abstractmethod
    def close(self) -> None:
        """Release the connection. Detached processes keep running."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
