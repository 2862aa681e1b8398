"""`dsparse status`, `dsparse stop` and `dsparse logs`: work from the job record alone, so they
work after the launching terminal is gone. None of them imports torch."""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.markup import escape

from dsparse_cli import render
from dsparse_cli.cli.app import JsonOpt, app, done, inventory, options, print_json
from dsparse_cli.console import console, err_console, error, success
from dsparse_cli.contract import BoardStatus, JobStatus
from dsparse_cli.errors import EXIT_BOARD_FAILED, EXIT_OK, ConfigError
from dsparse_cli.inventory import Inventory

JobOpt = typer.Option(None, "--job", help="Job id (default: the latest job started from here).")


def _job(job_id: Optional[str]):
    """The inventory and the record of the job (default: the latest one started from here)."""
    from dsparse_cli.jobs import records

    inv = inventory(quiet=True)
    return inv, records.load(inv.state_dir, job_id)


def _collect(inv: Inventory, rec, stale_after_s: float) -> dict:
    from dsparse_cli.jobs.boardio import read_state
    from dsparse_cli.jobs.status import board_row, job_state, stopped_on_request
    from dsparse_cli.remote import connect, fan_out

    by_name = {b.name: b for b in inv.boards}

    def one(target):
        run = next(r for r in rec.boards if r.name == target.name)
        with connect(target, connect_timeout=options.connect_timeout) as transport:
            return read_state(transport, run)

    results = fan_out([by_name[r.name] for r in rec.boards], one)
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
    return {"job": rec.id, "state": job_state(rec, rows), "cluster": rec.cluster,
            "failed_board": rec.failed_board, "boards": rows}


def _job_plan(inv: Inventory, rec) -> dict:
    """The plan the job runs under (for budgets), when .dsparse/plan.json is still that plan."""
    import json

    from dsparse_cli.contract import plan_hash

    path = inv.state_dir / "plan.json"
    try:
        plan = json.loads(path.read_text())
        if plan_hash(plan) == rec.plan_hash:
            return plan
    except (OSError, ValueError):
        pass
    return {"devices": [{"name": b.name} for b in rec.boards]}


@app.command()
def status(
    job: Optional[str] = JobOpt,
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the job ends (Ctrl-C to leave)."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    stale_after: float = typer.Option(60.0, "--stale-after", help="Heartbeat age that counts as stale."),
    json_out: bool = JsonOpt,
) -> None:
    """Each board's state, progress, memory and traffic. Exit 0 while the job is healthy or finished,
    1 when a board failed or cannot be reached."""
    inv, rec = _job(job)
    doc = _collect(inv, rec, stale_after)
    if watch and not json_out:
        doc = _watch(inv, rec, doc, interval, stale_after)
    if json_out:
        print_json(doc)
    else:
        console.print(render.status_table(doc))
        for b in doc["boards"]:
            if b["error"]:
                err_console.print(f"[red]{b['name']}[/]: {escape(b['error'])}", highlight=False)
    bad = any(b["state"] in (BoardStatus.FAILED, BoardStatus.UNREACHABLE) for b in doc["boards"])
    done(EXIT_BOARD_FAILED if bad else EXIT_OK)


def _watch(inv, rec, doc, interval, stale_after) -> dict:
    from rich.live import Live

    from dsparse_cli.jobs import records

    try:
        # transient: the caller prints the final table once the watch ends
        with Live(render.status_table(doc), console=console, refresh_per_second=2, transient=True) as live:
            while doc["state"] in (JobStatus.RUNNING, JobStatus.DEGRADED, JobStatus.STOPPING):
                time.sleep(interval)
                rec = records.load(inv.state_dir, rec.id)  # stop/resume change it meanwhile
                doc = _collect(inv, rec, stale_after)
                live.update(render.status_table(doc))
    except KeyboardInterrupt:
        pass
    return doc


@app.command()
def stop(
    job: Optional[str] = JobOpt,
    grace: float = typer.Option(10.0, "--grace", help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop a job: exactly the process groups it recorded on each board (SIGTERM, then SIGKILL)."""
    from dsparse_cli.jobs.stop import stop_job

    inv, rec = _job(job)
    results = stop_job(inv, rec, grace_s=grace, connect_timeout=options.connect_timeout)
    failed = False
    for r in results:
        if not r.ok:
            failed = True
            error(f"{r.name}: could not stop: {r.error}")
        elif r.value:
            failed = True
            error(f"{r.name}: processes still alive after SIGKILL: {r.value}")
    if not failed:
        success(f"job {rec.id} stopped on {len(results)} boards")
    done(EXIT_BOARD_FAILED if failed else EXIT_OK)


@app.command()
def logs(
    board: str = typer.Argument(..., help="Board name."),
    job: Optional[str] = JobOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(50, "--lines", "-n", help="Lines to show."),
) -> None:
    """Print a board's worker log (torchrun and worker output)."""
    import shlex

    from dsparse_cli.remote import connect

    inv, rec = _job(job)
    target = inv.board(board)
    run = next((r for r in rec.boards if r.name == board), None)
    if run is None:
        raise ConfigError(f"board {board!r} is not part of job {rec.id}")
    cmd = f"tail -n {int(lines)} {'-F' if follow else ''} {shlex.quote(run.log_path)}"
    with connect(target, connect_timeout=options.connect_timeout) as transport:
        try:
            for line in transport.stream(cmd, timeout=None):
                console.print(line.rstrip("\n"), highlight=False, markup=False)
        except KeyboardInterrupt:
            pass
    done(EXIT_OK)
