"""Local job records: `.dsparse/jobs/<id>.json`, one per job, and `.dsparse/jobs/latest`.

A record is everything `status`, `stop` and `logs` need after the launching terminal is gone:
which boards, where their files are, and exactly which process groups were started.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsparse_cli.contract import JOB_TRANSITIONS, ContractError, JobState, check_transition
from dsparse_cli.errors import ConfigError


@dataclass
class BoardRun:
    name: str
    rank: int
    local: bool
    run_dir: str                 # on the board: job.json, plan.json, status.json, worker.log, checkpoints/
    pid: int | None = None       # torchrun's pid == pgid (own session)
    pgid: int | None = None
    worker_pid: int | None = None  # torchrun starts the worker in a session of its own (pid == pgid)
    started: float | None = None

    def process_groups(self) -> list[int]:
        """Every process group of this board's part of the job: torchrun's and its worker's."""
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


@dataclass
class JobRecord:
    id: str
    cluster: str
    inventory: str | None
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict) -> "JobRecord":
        boards = [BoardRun(**b) for b in doc.pop("boards")]
        rec = cls(boards=boards, **doc)
        rec.state = JobState(rec.state)
        return rec


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def jobs_dir(state_dir: Path) -> Path:
    return state_dir / "jobs"


def save(state_dir: Path, rec: JobRecord) -> Path:
    d = jobs_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{rec.id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rec.to_json())
    os.replace(tmp, path)
    (d / "latest.tmp").write_text(rec.id)
    os.replace(d / "latest.tmp", d / "latest")
    return path


def load(state_dir: Path, job_id: str | None = None) -> JobRecord:
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
