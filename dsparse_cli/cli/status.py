"""`dsparse status`, `dsparse stop` and `dsparse logs`: work from the job record alone, so they
work after the launching terminal is gone, from any directory (the per-user job index finds the
latest job whichever `--cluster` started it), and reach each board as the job recorded it even
when cluster.yaml changed since. None of them imports torch."""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Optional

import typer

from dsparse_cli.cli.app import app, done, options, print_json
from dsparse_cli.contract import STALE_AFTER_S, BoardStatus, JobStatus
from dsparse_cli.errors import EXIT_BOARD_FAILED, EXIT_OK, ConfigError

if TYPE_CHECKING:  # rich, render and the inventory load when a command runs: --help stays quick
    from dsparse_cli.inventory import Inventory

JobOpt = typer.Option(None, "--job", help="Job id (default: the latest job of --cluster if given, else the "
                                            "latest job started anywhere).")


def _job(job_id: Optional[str]):
    """The job's inventory of recorded boards and its record (lookup order: `jobs.reach`)."""
    from dsparse_cli.jobs.reach import open_job

    return open_job(job_id, options.cluster)


def _job_doc(rec) -> dict:
    """What every --json document of a job starts with: the job and the cluster it belongs to."""
    return {"job": rec.id, "cluster": rec.cluster, "inventory": rec.inventory}


def _collect(inv: Inventory, rec, stale_after_s: float) -> dict:
    from dsparse_cli.jobs.boardio import read_state
    from dsparse_cli.jobs.reach import each_board
    from dsparse_cli.jobs.status import board_row, job_state, stopped_on_request
    from dsparse_cli.remote import connect

    def one(run, target):
        with connect(target, connect_timeout=options.connect_timeout) as transport:
            return read_state(transport, run)

    results = each_board(inv, rec.boards, one)
    rows = [board_row(run, res.value if res.ok else None, res.error, stale_after_s)
            for run, res in zip(rec.boards, results)]
    # Read the record after the boards: `stop` records "stopping" before it signals anything, so a
    # board seen stopped here is always matched by a record that says so.
    if stopped_on_request(inv.state_dir, rec):
        for row in rows:
            if row["state"] == BoardStatus.FAILED:
                row["state"] = BoardStatus.STOPPED
    devices = {d["name"]: d for d in _job_plan(inv, rec)["devices"]}
    for row in rows:  # peak memory vs plan
        d = devices.get(row["name"], {})
        row["budget_bytes"], row["predicted_peak_bytes"] = d.get("budget_bytes"), d.get("predicted_peak_bytes")
    return {**_job_doc(rec), "state": job_state(rec, rows), "failed_board": rec.failed_board, "boards": rows}


def _job_plan(inv: Inventory, rec) -> dict:
    """The plan the job runs under (for budgets), when .dsparse/plan.json is still that plan."""
    import json

    from dsparse_cli.contract import plan_hash

    try:
        plan = json.loads((inv.state_dir / "plan.json").read_text())
        if plan_hash(plan) == rec.plan_hash:
            return plan
    except (OSError, ValueError):
        pass
    return {"devices": [{"name": b.name} for b in rec.boards]}


@app.command()
def status(
    job: Optional[str] = JobOpt,
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the job ends (Ctrl-C to leave)."),
    interval: float = typer.Option(2.0, "--interval", min=0.1, metavar="<seconds>",
                                   help="Seconds between refreshes with --watch."),
    stale_after: float = typer.Option(STALE_AFTER_S, "--stale-after", min=1.0, metavar="<seconds>",
                                      help="Heartbeat age that counts as stale."),
) -> None:
    """Each board's state, progress, memory and traffic. Exit 0 while the job is healthy or finished,
    1 when a board failed or cannot be reached."""
    from rich.markup import escape

    from dsparse_cli.console import console, err_console, show

    inv, rec = _job(job)
    as_json = options.json
    doc = _collect(inv, rec, stale_after)
    if watch and not as_json:
        doc = _watch(inv, rec, doc, interval, stale_after)
    if as_json:
        print_json(doc)
    else:
        print_table = show if options.wide else console.print   # show: soft wrap, the table is not cropped
        print_table(_table(doc, rec))
        for b in doc["boards"]:
            if b["error"]:
                err_console.print(f"[red]{b['name']}[/]: {escape(b['error'])}", highlight=False, soft_wrap=True)
    bad = any(b["state"] in (BoardStatus.FAILED, BoardStatus.UNREACHABLE) for b in doc["boards"])
    done(EXIT_BOARD_FAILED if bad else EXIT_OK)


def _table(doc: dict, rec):
    """The status table, captioned with the cluster the job belongs to."""
    from dsparse_cli import render

    table = render.status_table(doc)
    table.caption = f"cluster {rec.where}"
    return table


def _watch(inv, rec, doc, interval, stale_after) -> dict:
    from rich.live import Live

    from dsparse_cli.console import console
    from dsparse_cli.jobs import records

    try:
        # transient: the caller prints the final table once the watch ends
        with Live(_table(doc, rec), console=console, refresh_per_second=2, transient=True) as live:
            while doc["state"] in (JobStatus.RUNNING, JobStatus.DEGRADED, JobStatus.STOPPING):
                time.sleep(interval)
                rec = records.load(inv.state_dir, rec.id)  # stop/resume change it meanwhile
                doc = _collect(inv, rec, stale_after)
                live.update(_table(doc, rec))
    except KeyboardInterrupt:
        pass
    return doc


@app.command()
def stop(
    job: Optional[str] = JobOpt,
    grace: float = typer.Option(10.0, "--grace", min=0.0, metavar="<seconds>",
                                help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop a job: exactly the process groups it recorded on each board (SIGTERM, then SIGKILL).
    Exit 0 once every recorded process is gone; 1 naming each board that still has one or cannot
    be reached (the job then stays `stopping`: run `dsparse stop` again)."""
    from dsparse_cli.console import error, success
    from dsparse_cli.jobs.stop import outcome, stop_job

    inv, rec = _job(job)
    boards = [outcome(r) for r in stop_job(inv, rec, grace_s=grace, connect_timeout=options.connect_timeout)]
    left = [b["name"] for b in boards if b["state"] != "stopped"]
    if options.json:
        print_json({**_job_doc(rec), "state": rec.state, "stopped": not left, "boards": boards})
    elif left:
        for b in boards:
            if b["error"]:
                error(f"{b['name']}: could not stop: {b['error']}")
        error(f"job {rec.id} of cluster {rec.where} is not stopped: its processes may still run on "
              f"{', '.join(left)} (run `dsparse stop` again once reachable)")
    elif boards:
        success(f"job {rec.id} stopped on {len(boards)} boards (cluster {rec.where})")
    else:
        success(f"job {rec.id} of cluster {rec.where} recorded no process to stop")
    done(EXIT_BOARD_FAILED if left else EXIT_OK)


@app.command()
def logs(
    board: Optional[str] = typer.Argument(None, help="Board name (default: every board of the job)."),
    job: Optional[str] = JobOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (one BOARD, no --json)."),
    lines: int = typer.Option(50, "--lines", "-n", min=0, metavar="<int>", help="Lines to show."),
) -> None:
    """Print a board's worker log (launcher and worker output), or the last lines of every board's.
    With --json: the lines as a list per board. Exit 1 when a log cannot be read."""
    from dsparse_cli.console import console, error, info
    from dsparse_cli.jobs.reach import each_board

    inv, rec = _job(job)
    as_json = options.json
    if follow and (as_json or board is None):
        raise ConfigError("--follow follows one board's log as text", "name the BOARD and leave out --json")
    runs = rec.boards if board is None else [_run_of(rec, board)]
    if not as_json:
        info(f"job {rec.id} of cluster {rec.where}")
    if follow:
        _follow_log(inv.board(board), runs[0], lines)
        done(EXIT_OK)
    results = each_board(inv, runs, lambda run, target: _tail(target, run, lines))
    if as_json:
        print_json({**_job_doc(rec), "boards": [{"name": r.name, "lines": r.value, "error": r.error} for r in results]})
    else:
        for r in results:
            if not r.ok:
                error(f"{r.name}: {r.error}")
            for line in r.value or []:
                console.print(line if board else f"{r.name} | {line}", highlight=False, markup=False)
    done(EXIT_BOARD_FAILED if any(not r.ok for r in results) else EXIT_OK)


def _run_of(rec, board: str):
    run = next((r for r in rec.boards if r.name == board), None)
    if run is None:
        raise ConfigError(f"board {board!r} is not part of job {rec.id}",
                          f"its boards: {', '.join(r.name for r in rec.boards)}")
    return run


def _tail(target, run, lines: int) -> list[str]:
    """The last `lines` lines of the board's worker log."""
    from dsparse_cli.errors import RemoteError
    from dsparse_cli.remote import connect

    with connect(target, connect_timeout=options.connect_timeout) as transport:
        result = transport.run(f"tail -n {int(lines)} {shlex.quote(run.log_path)}", timeout=30)
    if result.rc != 0:
        raise RemoteError(f"cannot read {run.log_path}: {result.last_error('no output')}")
    return result.stdout.splitlines()


def _follow_log(target, run, lines: int) -> None:
    """`tail -F` the board's worker log until Ctrl-C."""
    from dsparse_cli.console import console
    from dsparse_cli.remote import connect

    with connect(target, connect_timeout=options.connect_timeout) as transport:
        try:
            for line in transport.stream(f"tail -n {int(lines)} -F {shlex.quote(run.log_path)}", timeout=None):
                console.print(line.rstrip("\n"), highlight=False, markup=False)
        except KeyboardInterrupt:
            pass
