"""User-facing errors. Each carries the exit code the CLI ends with.

Exit codes (documented in the README):
  0  success
  1  the command ran but some board failed (probe, train, status)
  2  usage or configuration error (bad cluster.yaml, bad option, bad plan, budget too small)
  3  a remote or runtime failure that stopped the whole command (job failed to start)
  130 interrupted by Ctrl-C, or a followed job stopped by `dsparse stop` (everything is stopped)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BOARD_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130


class DsparseError(Exception):
    """An error the user can act on: one line of what went wrong, and how to fix it."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(DsparseError):
    """Bad cluster.yaml, bad option value, bad plan file (exit 2, as every DsparseError by default)."""


class RemoteError(DsparseError):
    """A board could not be reached or refused us (auth, host key, timeout)."""

    exit_code = EXIT_BOARD_FAILED


class JobError(DsparseError):
    """A job could not be started or failed as a whole."""

    exit_code = EXIT_RUNTIME


class Interrupted(DsparseError):
    """Ctrl-C: what was stopped, and how to go on."""

    exit_code = EXIT_INTERRUPTED
