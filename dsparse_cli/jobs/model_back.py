"""The trained model back on this machine: rank 0's model.pt and model.json, copied into
`<state dir>/jobs/<id>/` (with the user's model file, so the model can be rebuilt here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsparse_cli.contract import MODEL_FILE, MODEL_SIDECAR as SIDECAR
from dsparse_cli.errors import ConfigError, RemoteError
from dsparse_cli.inventory import Inventory
from dsparse_cli.jobs import records
from dsparse_cli.jobs.records import JobRecord
from dsparse_cli.remote import connect
from dsparse_cli.remote.base import Transport


def model_dir(state_dir: Path, job_id: str) -> Path:
    return records.jobs_dir(state_dir) / job_id


def fetch_model(inv: Inventory, rec: JobRecord, transports: dict[str, Transport] | None = None,
                connect_timeout: float = 10.0) -> Path:
    """Copy the finished job's model from its rank-0 board -> the local model.pt. A RemoteError
    when the board has none (the job did not finish) or cannot be reached."""
    run = next(b for b in rec.boards if b.rank == 0)
    dest = model_dir(inv.state_dir, rec.id)
    dest.mkdir(parents=True, exist_ok=True)
    own = transports.get(run.name) if transports else None
    transport = own or connect(run.target or inv.board(run.name), connect_timeout=connect_timeout)
    try:
        for name in (SIDECAR, MODEL_FILE):   # model.pt last: its presence means the copy is whole
            transport.get(f"{run.run_dir}/{name}", str(dest / name))
    finally:
        if own is None:
            transport.close()
    _keep_model_file(dest)
    return dest / MODEL_FILE


def _keep_model_file(dest: Path) -> None:
    """A user model's .py next to its weights: `export` rebuilds the model from it."""
    from dsparse_cli import modelspec

    spec = json.loads((dest / SIDECAR).read_text())["model"]
    kind, location, _ = modelspec.parse(spec)
    src = Path(location).expanduser()
    if kind == "file" and src.is_file() and not (dest / src.name).exists():
        shutil.copyfile(src, dest / src.name)


def local_model(inv: Inventory, rec: JobRecord, connect_timeout: float) -> Path:
    """The job's model.pt here, fetched from its board first if it is not here yet."""
    path = model_dir(inv.state_dir, rec.id) / MODEL_FILE
    if path.exists():
        return path
    try:   # a detached job's record may not know yet that it finished: ask its board
        return fetch_model(inv, rec, connect_timeout=connect_timeout)
    except RemoteError as exc:
        raise ConfigError(f"job {rec.id} ({rec.state}) has no trained model to copy: {exc}",
                          "a job hands back its model when it finishes (`dsparse train --resume`)",
                          exit_code=1) from None
