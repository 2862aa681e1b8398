"""Find a job and reach its boards the way the job recorded them (`status`, `stop`, `logs`).

Which job: `--job ID` (the per-user index, else the cluster's own records), else the latest job
of an explicit `--cluster`, else the job whose last attempt started last wherever it was started,
else the latest job of ./cluster.yaml (or the built-in demo cluster).

How to reach a board: the `Target` the record holds. When cluster.yaml no longer says the same
(a board renamed, removed, moved, or broken) that is a warning and the recorded target is used;
a record made before targets were recorded falls back to cluster.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from dsparse_cli.console import warning
from dsparse_cli.errors import ConfigError, DsparseError
from dsparse_cli.inventory import Inventory, Target, builtin_cluster, load_inventory
from dsparse_cli.jobs import records
from dsparse_cli.jobs.records import BoardRun, JobRecord
from dsparse_cli.remote import BoardResult, fan_out

T = TypeVar("T")

# What it takes to reach a board and find its files; python, memory_limit, iface or kind do not matter here.
REACH_FIELDS = ("host", "port", "user", "identity_files", "proxy_command", "known_hosts", "local", "workdir")


def open_job(job_id: str | None, cluster: Path | None) -> tuple[Inventory, JobRecord]:
    """The job (see the module's lookup order) and an inventory of exactly its boards as it
    recorded them, with the job's state dir. Warns about every board cluster.yaml now describes
    differently."""
    state_dir, rec = find_job(job_id, cluster)
    return job_inventory(rec, state_dir), rec


def find_job(job_id: str | None, cluster: Path | None) -> tuple[Path, JobRecord]:
    """(state dir, record) of the job to report on."""
    found = records.indexed(job_id) if job_id or cluster is None else None
    if found:
        return found
    inv = load_inventory(cluster)   # its errors are the user's to fix: --cluster named it, or it is ./cluster.yaml
    try:
        return inv.state_dir, records.load(inv.state_dir, job_id)
    except ConfigError as exc:
        if job_id or cluster:
            raise
        raise ConfigError(f"no job has been started from here or anywhere else ({records.index_path()} "
                          f"lists none, {records.jobs_dir(inv.state_dir)} has none)", exc.hint) from None


def job_inventory(rec: JobRecord, state_dir: Path) -> Inventory:
    """An inventory of the job's boards as recorded, checked against the job's cluster file."""
    current, problem = _current_inventory(rec, state_dir)
    if problem:
        if any(run.target is None for run in rec.boards):
            raise ConfigError(f"job {rec.id} predates recorded board targets, and {problem}",
                              "fix the cluster file the job was started from")
        warning(f"{problem}; job {rec.id} is reached the way it recorded its boards")
    boards = []
    for run in rec.boards:
        if run.target is None:   # an older record: cluster.yaml is all there is (each_board names a missing board)
            boards += [t for t in current.boards if t.name == run.name]
            continue
        boards.append(run.target)
        change = _change(run.target, current) if current else None
        if change:
            warning(f"board {run.name} {change} since job {rec.id} started; using the target the job recorded")
    path = Path(rec.inventory) if rec.inventory else None
    return Inventory(rec.cluster, boards, rec.master_addr, rec.master_port, path, builtin=path is None,
                     state_dir=state_dir, master_explicit=True)


def _current_inventory(rec: JobRecord, state_dir: Path) -> tuple[Inventory | None, str | None]:
    """The job's cluster file as it is now, or why it cannot be read."""
    if rec.inventory is None:
        return builtin_cluster(state_dir), None
    path = Path(rec.inventory)
    if not path.is_absolute():   # older records: relative to where `train` ran; the state dir sits next to it
        path = state_dir.parent / path.name
    try:
        return load_inventory(path), None
    except DsparseError as exc:
        return None, f"cluster file {path} cannot be used ({exc.one_line()})"


def _change(recorded: Target, current: Inventory) -> str | None:
    """How cluster.yaml's entry for the board differs from the recorded target, or None."""
    now = next((t for t in current.boards if t.name == recorded.name), None)
    if now is None:
        return f"is no longer in {current.path or 'the built-in demo cluster'} (renamed or removed)"
    if getattr(now, "error", None):
        return f"is broken in {current.path} ({now.error})"
    changed = [f"{f} {getattr(recorded, f)!r} -> {getattr(now, f)!r}"
               for f in REACH_FIELDS if getattr(recorded, f) != getattr(now, f)]
    return f"changed in {current.path} ({', '.join(changed)})" if changed else None


def each_board(inv: Inventory, runs: list[BoardRun], fn: Callable[[BoardRun, Target], T]) -> list[BoardResult[T]]:
    """`fn(run, target)` for every run in parallel, in order; a board `inv` lacks is a failed result."""
    return fan_out(runs, lambda run: fn(run, inv.board(run.name)))
