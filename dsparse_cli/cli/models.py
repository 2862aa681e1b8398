"""`dsparse models`: every model `plan --model` accepts by name, with its size and units."""

from __future__ import annotations

import typer

from dsparse_cli.cli.app import app, done, options, print_json
from dsparse_cli.errors import EXIT_OK


@app.command()
def models(
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="Classes the head predicts (changes the count)."),
) -> None:
    """List the models you can train by name: the hand-split ones, then every torchvision
    classification model (split by the generic rule). Your own model: --model FILE.py:factory
    or package.module:factory (see docs/internals.md, "Update units")."""
    from dsparse_cli.console import show, spinner
    from dsparse_cli.runtime.models import list_available

    with spinner("building every model on the meta device...", quiet=options.json):
        rows = list_available(num_classes)
    if options.json:
        print_json({"num_classes": num_classes, "models": rows})
    else:
        show(models_view(rows))
    done(EXIT_OK)


def models_view(rows: list[dict]):
    """The table; a model that cannot be built or split here says why under it."""
    from rich.console import Group

    from dsparse_cli.render import FitTable, error_lines

    t = FitTable(f"{len(rows)} models", ("name", "source", "parameters", "units"),
                 essential=("name", "units", "parameters", "source"))
    for r in rows:
        units = str(r["units"]) if r["units"] is not None else "[red]-[/]"
        t.add_row(r["name"], r["source"], format_count(r["parameters"]), units)
    # "cannot split vit_b_16: ..." under the table already starts with the name
    errors = ((r["name"], r["error"].replace(f"cannot split {r['name']}: ", "")) for r in rows if r["error"])
    return Group(t, *error_lines(errors))


def format_count(n: int | None) -> str:
    """3504872 -> "3.5 M"; 6418 -> "6.4 k"."""
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"
