"""`dsparse data push DIR`: put an image folder on the boards, each board only its shard."""

from __future__ import annotations

import contextlib

import typer
from typer.core import TyperGroup

from dsparse_cli.cli.app import AcceptNewOpt, app, done, inventory, options, print_json
from dsparse_cli.contract import JobSpec
from dsparse_cli.errors import EXIT_BOARD_FAILED, EXIT_OK


class _Sub(TyperGroup):
    """The app's options (which the app gives this group) are its commands' too:
    `dsparse data push DIR --json` as well as `dsparse data --json push DIR`."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            have = {p.name for p in command.params}
            command.params.extend(p for p in self.params if p.name not in have)
        return command


data = typer.Typer(cls=_Sub, help="Put datasets on the boards.", no_args_is_help=True, add_completion=False,
                   rich_markup_mode=None)
app.add_typer(data, name="data")


@data.command("push")
def push(
    directory: str = typer.Argument(..., metavar="DIR", help="An image folder: DIR/<class>/<image> or "
                                     "DIR/train/<class>/... with DIR/val/<class>/...", show_default=False),
    val_fraction: float = typer.Option(JobSpec.val_fraction, "--val-fraction",
                                       help="Share of each class held out for validation (DIR/<class> layout)."),
    skip_bad_images: bool = typer.Option(JobSpec.skip_bad_images, "--skip-bad-images",
                                         help="Leave out (and count) images that do not decode, instead of failing."),
    accept_new_host_keys: bool = AcceptNewOpt,
) -> None:
    """Copy each planned board only its shard of DIR (train and val), into its data_dir (else
    <workdir>/data/<DIR's name>). Files already there with the same size are not sent again.

    Needs a plan (`dsparse plan`): it gives each board its rank. Exit 0 when every board has its
    shard, 1 when any failed, 2 when DIR is not a usable image folder (nothing is copied then)."""
    from dsparse_cli.jobs import datapush

    inv = inventory()
    prepared = datapush.prepare(inv, directory, val_fraction=val_fraction, skip_bad_images=skip_bad_images)
    if not options.json:
        _notes(prepared)
    with contextlib.nullcontext() if options.json else _Progress(prepared) as report:
        results = datapush.push(prepared, connect_timeout=options.connect_timeout,
                                accept_new_host_keys=accept_new_host_keys, on_progress=report)
    if options.json:
        print_json(_document(prepared, results))
    else:
        _show(prepared, results)
    done(EXIT_OK if all(r.ok for r in results) else EXIT_BOARD_FAILED)


def _notes(prepared) -> None:
    from dsparse_cli.console import info, warning

    index = prepared.index
    info(f"{prepared.root}: {len(index.classes)} classes, {index.total_train} train and {index.total_val} val "
         f"images, for {len(prepared.boards)} boards")
    if prepared.bad:
        warning(f"{len(prepared.bad)} image(s) do not decode and are left out (first: {prepared.bad[0]})")
    if len(index.classes) > prepared.num_classes:
        warning(f"{len(index.classes)} classes but the plan's model predicts {prepared.num_classes}: "
                f"re-run `dsparse plan --num-classes {len(index.classes)}` before training")


class _Progress:
    """A byte progress bar per board on stderr; `report(board, sent, total)` moves it."""

    def __init__(self, prepared):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        from dsparse_cli.console import err_console

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             console=err_console, transient=True, disable=not err_console.is_terminal)
        self.tasks = {t.name: self.bars.add_task(t.name, total=None) for t, _, _ in prepared.boards}

    def __enter__(self):
        self.bars.start()
        return self.report

    def __exit__(self, *exc):
        self.bars.stop()

    def report(self, board: str, sent: int, total: int) -> None:
        self.bars.update(self.tasks[board], completed=sent, total=total)


def _planned(prepared) -> dict:
    """board -> (rank, files of its shard, data dir): what a failed board's row still shows."""
    return {t.name: (s.rank, len(s.train) + len(s.val), d) for t, s, d in prepared.boards}


def _show(prepared, results) -> None:
    from dsparse_cli import render
    from dsparse_cli.console import show
    from dsparse_cli.sizes import format_size

    table = render.FitTable("data push", ("board", "rank", "files", "sent", "already there", "bytes sent",
                                          "data dir"), ("board", "sent", "already there", "data dir"))
    planned = _planned(prepared)
    for r in results:
        rank, files, data_dir = planned[r.name]
        p = r.value
        cells = (str(p.sent), str(p.skipped), format_size(p.bytes_sent)) if r.ok else ("failed", "-", "-")
        table.add_row(r.name, str(rank), str(files), *cells, data_dir)
    show(table)
    for line in render.error_lines((r.name, r.error) for r in results if not r.ok):
        show(line)


def _document(prepared, results) -> dict:
    index, planned = prepared.index, _planned(prepared)

    def board(r) -> dict:
        rank, files, data_dir = planned[r.name]
        row = {"name": r.name, "ok": r.ok, "error": r.error, "rank": rank, "data_dir": data_dir, "files": files}
        if r.ok:
            row.update(sent=r.value.sent, skipped=r.value.skipped, bytes_sent=r.value.bytes_sent)
        return row

    return {"dir": str(prepared.root), "classes": index.classes, "train": index.total_train, "val": index.total_val,
            "bad_images": len(prepared.bad), "boards": [board(r) for r in results]}
