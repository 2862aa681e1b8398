"""The `dsparse` entry point: the one place errors become exit codes. The app and its options are
in `cli.app`; each command module imports its heavy dependencies only when it runs, so `dsparse
--help`, `probe` and `status` never import torch."""

from __future__ import annotations

import sys

from dsparse_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DsparseError


def main() -> None:
    """Console-script entry point."""
    from dsparse_cli.cli import plan, probe, status, train  # noqa: F401  (commands register themselves)
    from dsparse_cli.cli.app import app, options

    try:
        app()  # standalone: usage errors exit 2 with a usage message; typer.Exit carries our codes
    except DsparseError as exc:
        _report(exc.one_line(), options.verbose)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _report("interrupted", False)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line unless -v
        _report(f"internal error: {type(exc).__name__}: {exc} (re-run with -v for the traceback)", options.verbose)
        sys.exit(EXIT_RUNTIME)


def _report(message: str, verbose: bool) -> None:
    from dsparse_cli.console import error

    if verbose:
        import traceback

        traceback.print_exc()
    error(message)
