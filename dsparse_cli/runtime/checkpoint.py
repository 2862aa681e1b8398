"""Per-rank checkpoints: `workdir/checkpoints/latest.pt`, replaced atomically.

A checkpoint holds everything a rank needs to continue exactly where it stopped: model state,
optimizer state, the position in the data (epoch, step in epoch, global step), RNG states,
aggregator state (compression residuals) and the hash of the plan it was made under. A crash
during a save leaves the previous checkpoint intact (tmp file + fsync + `os.replace`), and the
one before is kept as `previous.pt`, so the ranks can agree on a step they all have.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from dsparse_cli.contract import plan_hash  # noqa: F401  (the hash a checkpoint carries)

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says why and what to do."""


def checkpoint_path(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints", "latest.pt")


def previous_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), "previous.pt")


def candidate_paths(workdir: str) -> list[str]:
    """latest.pt, then previous.pt (the one before), whichever exist."""
    latest = checkpoint_path(workdir)
    return [p for p in (latest, previous_path(latest)) if os.path.isfile(p)]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` (plain containers of tensors and numbers) atomically; the checkpoint it
    replaces is kept as previous.pt (a fallback when another rank died mid-save)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT_VERSION, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(path):
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:   # torch reports a full disk as a RuntimeError
        free = shutil.disk_usage(d).free
        raise CheckpointError(f"could not write checkpoint {path} ({free >> 20} MiB free there: "
                              f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]}); "
                              "the previous checkpoint is intact") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str, expected_plan_hash: str, rank: int | None = None) -> dict:
    """Load a checkpoint, refusing one made under another plan or for another rank."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint to resume from at {path}; start the job without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                              "start the job without --resume") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}, expected "
                              f"{FORMAT_VERSION}; start the job without --resume")
    if state.get("plan_hash") != expected_plan_hash:
        raise CheckpointError(f"checkpoint {path} was made under plan {state.get('plan_hash')}, not the current "
                              f"plan {expected_plan_hash}; resume with the same plan or start without --resume")
    if rank is not None and state.get("rank") != rank:
        raise CheckpointError(f"checkpoint {path} belongs to rank {state.get('rank')}, not rank {rank}")
    return state


def agreed_checkpoint(workdir: str, expected_plan_hash: str, rank: int, world: int) -> dict | None:
    """The newest checkpoint step that every rank has (latest.pt or previous.pt), so a crash
    during one rank's save cannot leave the boards resuming from different steps. None when no
    rank has any: the job stopped before its first checkpoint and starts again from step 0."""
    states, problems = {}, []
    for path in candidate_paths(workdir):
        try:
            st = load_checkpoint(path, expected_plan_hash, rank)
            states[int(st["global_step"])] = st
        except CheckpointError as exc:
            problems.append(str(exc))
    mine = {"steps": sorted(states), "problem": problems[0] if problems and not states else None}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    if not any(e["steps"] or e["problem"] for e in every):
        return None
    common = set(every[0]["steps"]).intersection(*(set(e["steps"]) for e in every[1:]))
    if not common:
        bad = next((r for r, e in enumerate(every) if e["problem"]), None)
        detail = (f"rank {bad}: {every[bad]['problem']}" if bad is not None else
                  "checkpointed steps per rank: " + ", ".join(f"{r}:{e['steps']}" for r, e in enumerate(every)))
        raise CheckpointError(f"no checkpoint step common to all boards ({detail}); "
                              "start the job without --resume")
    return states[max(common)]
