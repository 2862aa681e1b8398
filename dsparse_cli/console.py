"""The one Rich console, and the helpers every command uses to talk to the user."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    err_console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


def success(message: str) -> None:
    console.print(f"[green]{message}[/]", highlight=False, soft_wrap=True)
