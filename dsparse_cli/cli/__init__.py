"""The `dsparse` entry point: the one place errors become one line and an exit code. The app and its
options are in `cli.app`; each command module imports its heavy dependencies only when it runs, so
`dsparse --help`, `probe` and `status` never import torch, and `--help` loads little beyond typer."""

from __future__ import annotations

import sys

from dsparse_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DsparseError, Interrupted


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:] == ["--version"]:  # answered before typer loads
        from dsparse_cli import __version__

        print(f"dsparse {__version__}")
        return
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    from typer.main import get_command

    from dsparse_cli.cli import data, export, models, plan, probe, status, train  # noqa: F401  (they register themselves)
    from dsparse_cli.cli.app import app, options

    try:  # not standalone: click's errors come here, and typer.Exit's code is returned
        sys.exit(get_command(app).main(prog_name="dsparse", standalone_mode=False))
    except NoArgsIsHelpError as exc:  # plain `dsparse`: the help
        exc.show()
        sys.exit(exc.exit_code)
    except ClickException as exc:
        _report(_usage_line(exc) if isinstance(exc, UsageError) else exc.format_message(), False)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        _report(exc.one_line(), options.verbose)
        _leave_now(exc.exit_code)
    except DsparseError as exc:
        _report(exc.one_line(), options.verbose)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Abort):
        _report("interrupted", False)
        _leave_now(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line unless -v
        _report(f"internal error: {type(exc).__name__}: {exc} (re-run with -v for the traceback)", options.verbose)
        sys.exit(EXIT_RUNTIME)


def _leave_now(code: int) -> None:
    """Exit without joining worker threads: after Ctrl-C, one may still wait on a board that
    does not answer (an SSH banner, a connect timeout), and the user asked to stop now."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(message: str, verbose: bool) -> None:
    from dsparse_cli.console import error

    if verbose:
        import traceback

        traceback.print_exc()
    error(message)


# What typer's value checks (pydantic's error types) mean, as the end of "--epochs must be ...".
_RULES = {"greater_than_equal": "at least {ge}", "less_than_equal": "at most {le}", "greater_than": "more than {gt}",
          "less_than": "less than {lt}", "int_parsing": "a whole number", "int_from_float": "a whole number",
          "float_parsing": "a number"}


def _usage_line(exc) -> str:
    """A usage error as one line: what is wrong, and where the help is."""
    from typer._click.exceptions import BadParameter, MissingParameter, NoSuchOption

    if isinstance(exc, NoSuchOption):
        guess = f"; did you mean {' or '.join(sorted(exc.possibilities))}?" if exc.possibilities else ""
        what = f"unknown option {exc.option_name}{guess}"
    elif isinstance(exc, BadParameter) and not isinstance(exc, MissingParameter) and exc.param is not None:
        what = _bad_value(exc)
    else:  # e.g. "No such command 'prob'. Did you mean 'probe'?", "Option '--job' requires an argument."
        what = _phrase(exc.format_message().replace(". Did you mean", "; did you mean"))
    where = exc.ctx.command_path if exc.ctx is not None else "dsparse"
    return f"{what} (see `{where} --help`)"


def _name(param) -> str:
    """--connect-timeout for an option, BOARD for an argument."""
    return max(param.opts, key=len) if param.param_type_name == "option" else param.human_readable_name


def _bad_value(exc) -> str:
    """What a bad value should have been, in words (typer checks values with pydantic)."""
    errors = getattr(exc.__cause__, "errors", None)
    first = errors()[0] if callable(errors) and errors() else {}
    if first.get("type") in _RULES:
        rule = _RULES[first["type"]].format(**first.get("ctx", {}))
        return f"{_name(exc.param)} must be {rule}, not {first['input']!r}"
    return f"{_name(exc.param)}: {_phrase(exc.message)}"


def _phrase(sentence: str) -> str:
    """Click's "Got unexpected extra argument (x)." as part of our line: "got unexpected extra argument (x)"."""
    sentence = sentence.rstrip(".")
    return sentence[:1].lower() + sentence[1:]
