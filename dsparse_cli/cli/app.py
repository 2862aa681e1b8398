"""The `dsparse` Typer app and what its commands share: the app's options, loading the inventory,
JSON output, and ending with an exit code. Command modules import this; it imports none of them.
It imports typer and nothing heavy: `dsparse --help` must answer at once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional

import typer
from typer.core import TyperGroup

from dsparse_cli import __version__

if TYPE_CHECKING:
    from dsparse_cli.inventory import Inventory

# The app's own options, as parsed (one command per process); main() reads `verbose` after an error.
options = SimpleNamespace(cluster=None, connect_timeout=10.0, verbose=False, json=False, wide=False)


class _App(TyperGroup):
    """The app's own options are every command's too: `dsparse -v probe` and `dsparse probe -v`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            command.params.extend(self.params)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:   # typer would end with 130 and say nothing
            from dsparse_cli.errors import Interrupted

            raise Interrupted("interrupted") from None


app = typer.Typer(
    cls=_App,
    name="dsparse",
    help="Train PyTorch models across heterogeneous edge boards with sparse updates.\n\n"
    "Exit codes: 0 ok, 1 a board failed, 2 usage or configuration error, "
    "3 the job failed to start or failed as a whole, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags shown as flags, and rich is not imported for --help
)


def _keep(ctx: typer.Context, param: typer.CallbackParam, value) -> None:
    """Keep an app option where it was given, before or after the verb (the other side has its default);
    --wide also tells the tables."""
    if ctx.get_parameter_source(param.name).name != "DEFAULT":
        setattr(options, param.name, value)
    if param.name == "wide" and options.wide:
        from dsparse_cli import render

        render.wide = True


def _version(value: bool) -> None:
    if value:
        print(f"dsparse {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    cluster: Optional[Path] = typer.Option(
        None, "--cluster", "-c", help="Inventory file (default ./cluster.yaml; built-in demo cluster if absent).",
        dir_okay=False, callback=_keep, expose_value=False),
    connect_timeout: float = typer.Option(options.connect_timeout, "--connect-timeout", min=0.1, metavar="<seconds>",
                                          help="Seconds to wait for each board.", callback=_keep, expose_value=False),
    json: bool = typer.Option(False, "--json", help="Print machine-readable JSON to stdout.",
                              callback=_keep, expose_value=False),
    wide: bool = typer.Option(False, "--wide", help="Show every table column, even past the terminal's width.",
                              callback=_keep, expose_value=False),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.",
                                 callback=_keep, expose_value=False),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_version, expose_value=False),
) -> None:
    """Declares the app's options; `_keep` stores each in `options` under its parameter's name (they
    are never passed here)."""


AcceptNewOpt = typer.Option(False, "--accept-new-host-keys",
                            help="Record host keys of boards not yet in ~/.ssh/known_hosts.")


def done(code: int) -> None:
    """End a command with an exit code (Typer's standalone mode ignores return values)."""
    raise typer.Exit(code)


def inventory() -> Inventory:
    """Load --cluster (or ./cluster.yaml) and print its warnings; say so when falling back to the
    built-in demo cluster (unless --json)."""
    from dsparse_cli.console import info, warning
    from dsparse_cli.inventory import load_inventory

    inv = load_inventory(options.cluster)
    for message in inv.warnings:
        warning(message)
    if inv.builtin and not options.json:
        info("no cluster.yaml here: using the built-in demo cluster of "
             f"{len(inv.boards)} local simulated boards (see cluster.yaml.example)")
    return inv


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()
