"""The `dsparse` command: app wiring, shared options, and the one place errors become exit codes.

Command modules are imported lazily by name so `dsparse --help`, `probe` and `status` never
import torch.
"""

from __future__ import annotations

import sys
import typer

from dsparse_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DsparseError

app = typer.Typer(
    name="dsparse",
    help="Train PyTorch models across heterogeneous edge boards with sparse updates.\n\n"
    "Exit codes: 0 ok, 1 a board failed, 2 usage or configuration error, "
    "3 the job failed to start or failed as a whole, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Options shared by every command (Typer has no per-group options, so each command declares them).
ClusterOpt = typer.Option(
    None, "--cluster", "-c", help="Inventory file (default ./cluster.yaml; built-in demo cluster if absent).",
    dir_okay=False,
)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON to stdout.")


def done(code: int) -> None:
    """End a command with an exit code (Typer's standalone mode ignores return values)."""
    raise typer.Exit(code)


def _register() -> None:
    from dsparse_cli.cli import plan, probe, status, train  # noqa: F401  (commands register themselves)


def main() -> None:
    """Console-script entry point."""
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    _register()
    try:
        app()  # standalone: usage errors exit 2 with a usage message; typer.Exit carries our codes
    except DsparseError as exc:
        _report(exc.one_line(), verbose)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _report("interrupted", False)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line unless -v
        _report(f"internal error: {type(exc).__name__}: {exc} (re-run with -v for the traceback)", verbose)
        sys.exit(EXIT_RUNTIME)


def _report(message: str, verbose: bool) -> None:
    from dsparse_cli.console import error

    if verbose:
        import traceback

        traceback.print_exc()
    error(message)
