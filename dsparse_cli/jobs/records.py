"""Job records: `<state dir>/jobs/<id>.json`, one per job, `<state dir>/jobs/latest`, and the
per-user job index that finds a job whichever cluster file started it.

A record is everything `status`, `stop` and `logs` need after the launching terminal is gone:
which boards, how to reach each of them (its `Target` as resolved at start), where their files
are, and exactly which process groups were started.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dsparse_cli.console import warning
from dsparse_cli.contract import JOB_TRANSITIONS, ContractError, JobState, check_transition
from dsparse_cli.errors import ConfigError
from dsparse_cli.inventory import Target


@dataclass
class BoardRun:
    name: str
    rank: int
    local: bool
    run_dir: str                 # on the board: job.json, plan.json, status.json, worker.log, checkpoints/
    pid: int | None = None       # the launcher's pid == pgid (own session)
    pgid: int | None = None
    worker_pid: int | None = None  # the launcher starts the worker in a session of its own (pid == pgid)
    started: float | None = None
    target: Target | None = None   # how the board was reached at start; None in records made before it was kept

    def process_groups(self) -> list[int]:
        """Every process group of this board's part of the job: the launcher's and its worker's."""
        return [g for g in (self.pgid, self.worker_pid) if g]

    @property
    def workdir(self) -> str:
        """The board's workdir (run dirs are `<workdir>/runs/<job id>`)."""
        return self.run_dir.rsplit("/runs/", 1)[0]

    @property
    def status_path(self) -> str:
        return f"{self.run_dir}/status.json"

    @property
    def log_path(self) -> str:
        return f"{self.run_dir}/worker.log"

    @classmethod
    def from_dict(cls, doc: dict) -> "BoardRun":
        target = doc.pop("target", None)
        if target is not None:  # keys a newer or older Target lacks are left out
            known = {f.name for f in fields(Target)}
            target = Target(**{k: v for k, v in target.items() if k in known})
        return cls(target=target, **doc)


@dataclass
class JobRecord:
    id: str
    cluster: str
    inventory: str | None        # the cluster file (absolute since targets are recorded); None: built-in demo
    plan_hash: str
    master_addr: str
    master_port: int
    boards: list[BoardRun]
    created: float = field(default_factory=time.time)
    state: str = JobState.STARTING   # a JobState; change it with `advance`
    failed_board: str | None = None
    error: str | None = None
    summary: dict | None = None
    attempts: int = 1
    options: dict | None = None  # the TrainOptions it was started with (what --resume reuses)

    def advance(self, state: str) -> None:
        """Move to `state` along `contract.JOB_TRANSITIONS` (ContractError otherwise)."""
        check_transition(JOB_TRANSITIONS, self.state, state)
        self.state = JobState(state)

    @property
    def where(self) -> str:
        """Which cluster the job belongs to, for messages: `name (file)`."""
        return f"{self.cluster} ({self.inventory or 'the built-in demo cluster'})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict) -> "JobRecord":
        boards = [BoardRun.from_dict(b) for b in doc.pop("boards")]
        rec = cls(boards=boards, **doc)
        rec.state = JobState(rec.state)
        return rec


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def jobs_dir(state_dir: Path) -> Path:
    return state_dir / "jobs"


def save(state_dir: Path, rec: JobRecord) -> Path:
    """Write the record, point `latest` at it and enter it in the job index."""
    d = jobs_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{rec.id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rec.to_json())
    os.replace(tmp, path)
    (d / "latest.tmp").write_text(rec.id)
    os.replace(d / "latest.tmp", d / "latest")
    _index_job(path.resolve(), rec)
    return path


def load(state_dir: Path, job_id: str | None = None) -> JobRecord:
    """The record of `job_id` under `state_dir`, or of the latest job saved there."""
    d = jobs_dir(state_dir)
    if job_id is None:
        latest = d / "latest"
        if not latest.exists():
            raise ConfigError(f"no job has been started from here ({d} is empty)", "start one with `dsparse train`")
        job_id = latest.read_text().strip()
    path = d / f"{job_id}.json"
    if not path.exists():
        known = sorted(p.stem for p in d.glob("*.json")) if d.exists() else []
        raise ConfigError(f"no job {job_id!r} under {d}", f"known jobs: {', '.join(known[-5:]) or 'none'}")
    try:
        return JobRecord.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, ContractError) as exc:
        raise ConfigError(f"job record {path} is unreadable ({exc})") from None


# --- the per-user job index: job id -> its record, cluster and when its last attempt started ----

def index_path() -> Path:
    """`$DSPARSE_STATE_HOME/jobs.json`, else `$XDG_STATE_HOME/dsparse/jobs.json` (~/.local/state)."""
    if os.environ.get("DSPARSE_STATE_HOME"):
        return Path(os.environ["DSPARSE_STATE_HOME"]) / "jobs.json"
    xdg = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(xdg) / "dsparse" / "jobs.json"


def read_index() -> dict[str, dict]:
    """Every indexed job whose record still exists: id -> {record, cluster, inventory, started, attempt}."""
    try:
        jobs = json.loads(index_path().read_text()).get("jobs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {i: e for i, e in jobs.items()
            if isinstance(e, dict) and isinstance(e.get("record"), str) and Path(e["record"]).is_file()}


def indexed(job_id: str | None = None) -> tuple[Path, JobRecord] | None:
    """(state dir, record) of `job_id`, or of the job whose last attempt started last; None if not indexed."""
    jobs = read_index()
    if job_id is None and jobs:
        job_id = max(jobs, key=lambda i: jobs[i].get("started", 0))
    if job_id not in jobs:
        return None
    state_dir = Path(jobs[job_id]["record"]).parent.parent   # records live in <state dir>/jobs/
    return state_dir, load(state_dir, job_id)


def _index_job(record: Path, rec: JobRecord) -> None:
    """Enter the job in the index (under a lock: several `train`s may save at once). A job's
    `started` changes only when it is new or a new attempt began, so stop/status leave the order."""
    path = index_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            jobs = read_index()
            old = jobs.get(rec.id, {})
            same_attempt = old.get("attempt") == rec.attempts and "started" in old
            if same_attempt and old.get("record") == str(record):
                return
            jobs[rec.id] = {"record": str(record), "cluster": rec.cluster, "inventory": rec.inventory,
                            "attempt": rec.attempts, "started": old["started"] if same_attempt else time.time()}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": 1, "jobs": jobs}, indent=1, sort_keys=True))
            os.replace(tmp, path)
    except OSError as exc:  # the job itself is recorded; only finding it from elsewhere suffers
        warning(f"could not update the job index {path}: {exc.strerror or exc}")
