"""The one Rich console, and the helpers every command uses to talk to the user. Commands import
this when they run, not at import time: rich is too slow to load for `dsparse --help`."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

# Messages are plain text (they quote board errors, paths and logs, which may contain "[...]"):
# only the prefix and the colour are markup.


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


def success(message: str) -> None:
    console.print(f"[green]{escape(message)}[/]", highlight=False, soft_wrap=True)


def show(renderable) -> None:
    """Print a table or view on stdout; soft wrap: a `--wide` table is not cropped at the terminal's edge."""
    console.print(renderable, soft_wrap=True)


def spinner(message: str, quiet: bool = False):
    """A spinner while a slow step runs; none when quiet (--json keeps stdout for the document)."""
    return contextlib.nullcontext() if quiet else console.status(message, spinner="dots")
