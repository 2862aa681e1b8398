"""The plan file (`.dsparse/plan.json`): build, write (atomic, deterministic), load (checked).

The format is pinned in docs/internals.md ("Plan file"). Budgets and peaks are whole-process
bytes (`"memory_meaning": "process"`): the measured process base plus training bytes. Same inputs
give a byte-identical file: no timestamps, sorted keys, fixed separators.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from dsparse_cli.contract import PLAN_VERSION, ContractError, Plan
from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.compute import BoardCompute
from dsparse_cli.planning.planner import PlanResult
from dsparse_cli.planning.profile import Profile
from dsparse_cli.planning.replay import breakdown, plan_comm
from dsparse_cli.planning.schedule import build_groups
from dsparse_cli.planning.wire import ddp_seconds, loads, step_seconds

DEFAULT_HEADROOM = 0.15
RERUN = "re-run dsparse plan"


def budget_bytes(usable_memory_bytes: int, headroom: float = DEFAULT_HEADROOM) -> int:
    """Whole-process budget: usable memory minus the headroom fraction."""
    if not 0 <= headroom < 1:
        raise ConfigError(f"headroom {headroom} is out of range", "use a fraction in [0, 1), e.g. 0.15")
    return int(usable_memory_bytes * (1 - headroom))


def build_plan(*, cluster: str, profile: Profile, result: PlanResult, objective: str, sync_every: int = 1,
               probe: Mapping[str, Mapping] | None = None, importance: str = "depth",
               headroom: float = DEFAULT_HEADROOM, allow_frozen: bool = False, launcher: str = "dsparse",
               rates: Sequence[float | None] | None = None, allocators: Mapping[str, str] | None = None,
               compute: BoardCompute | None = None) -> dict:
    """The plan document (see docs/internals.md) from a profile and the planner's result, made for
    `objective` (memory or time, as resolved by `plan_cluster`).
    `rates[rank]`: each planned board's link (bytes/s, None unknown), for roots and the wire model.
    `allocators[name]`: a board's allocator (lean when missing); a fast one's figures hold the
    profile's `fast_allocator_bytes` too. `compute`: each board's predicted compute per step goes in
    (time plans)."""
    allocator = {d.name: (allocators or {}).get(d.name, "lean") for d in result.devices}
    rates = list(rates) if rates else [None] * len(result.devices)
    groups = build_groups([d.units for d in result.devices], [u.param_bytes for u in profile.units],
                          [u.buffer_bytes for u in profile.units], sync_every,
                          rates if None not in rates else None, "wire" if objective == "time" else "fixed")
    wire = loads(groups, rates)
    compute_s = compute.per_board([d.units for d in result.devices]) if compute else None
    agg_s = step_seconds(groups, rates)
    units = [{"index": u.index, "name": u.name, "modules": list(u.modules), "param_bytes": u.param_bytes,
              "buffer_bytes": u.buffer_bytes, "grad_bytes": u.grad_bytes, "optimizer_bytes": u.optimizer_bytes}
             for u in profile.units]
    # The planner sized each board for any groups (`replay.upper_comm`); now that the groups exist,
    # each board's figures count what its own aggregation holds (never more than it was sized for).
    parts = {d.rank: breakdown(profile, d.units, plan_comm(profile, groups, d.rank)) for d in result.devices}
    fast_extra = profile.fast_allocator_bytes or 0
    extra = {d.name: fast_extra if allocator[d.name] == "fast" else 0 for d in result.devices}
    for d in result.devices:
        if extra[d.name]:
            parts[d.rank]["allocator"] = extra[d.name]
    devices = [{"name": d.name, "rank": d.rank, "budget_bytes": d.budget_bytes,
                "predicted_peak_bytes": profile.base_bytes + sum(parts[d.rank].values()),
                "predicted_training_bytes": sum(parts[d.rank].values()),
                "predicted_breakdown": parts[d.rank],
                "full_update_peak_bytes": result.full_update_peak_bytes + extra[d.name],
                "full_update_training_bytes": result.full_update_training_bytes + extra[d.name],
                "link_bytes_per_s": wire[d.rank].rate, "predicted_sent_bytes_per_step": wire[d.rank].sent,
                "predicted_recv_bytes_per_step": wire[d.rank].recv, "predicted_link_s_per_step": wire[d.rank].seconds,
                "units": list(d.units), "allocator": allocator[d.name]}
               | ({"predicted_compute_s_per_step": compute_s[d.rank]} if compute_s else {})
               for d in result.devices]
    return {
        "version": PLAN_VERSION, "cluster": cluster, "model": profile.model, "num_classes": profile.num_classes,
        "image_size": profile.image_size, "batch_size": profile.batch_size, "optimizer": profile.optimizer,
        "dtype": profile.dtype, "sync_every": sync_every, "memory_meaning": "process",
        "base_bytes": profile.base_bytes, "headroom": headroom, "importance": importance,
        "importance_order": list(result.order), "allow_frozen": allow_frozen,
        "frozen_units": list(result.frozen_units), "min_peak_bytes": result.min_peak_bytes,
        "launcher": launcher, "launcher_bytes": result.launcher_bytes, "objective": objective,
        "predicted_agg_s_per_step": agg_s,
        "predicted_step_s": max(compute_s) + agg_s if compute_s and agg_s is not None else None,
        "ddp_agg_s_per_step": ddp_seconds(sum(u.param_bytes for u in profile.units), rates),
        "units": units, "devices": devices, "groups": groups,
        "excluded": [{"name": e.name, "budget_bytes": e.budget_bytes, "needed_bytes": e.needed_bytes,
                      "reason": e.reason} for e in result.excluded],
        "probe": {name: dict(facts) for name, facts in (probe or {}).items()},
        "profile_key": profile.key, "torch": profile.torch,
    }


def plan_json(doc: dict) -> str:
    return json.dumps(doc, indent=1, sort_keys=True, separators=(",", ": ")) + "\n"


def write_plan(path: str | Path, doc: dict) -> Path:
    """Write atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(plan_json(doc))
    os.replace(tmp, path)
    return path


def load_plan(path: str | Path, inventory_board_names: Iterable[str] | None = None) -> dict:
    """Read a plan and check it against `contract.Plan`; ConfigError (one line) when missing,
    unreadable, of another version, not following the contract, or made for other boards than
    `inventory_board_names`. Returns the document as written (it is what a job hashes)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no plan at {path}", "run `dsparse plan`")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"plan {path} is not valid JSON ({str(exc).splitlines()[0]})", RERUN) from None
    try:
        plan = Plan.from_dict(doc, where=f"plan {path}")
    except ContractError as exc:
        raise ConfigError(str(exc), RERUN) from None
    if inventory_board_names is not None:
        have = list(inventory_board_names)
        made_for = plan.boards()
        if sorted(made_for) != sorted(have):
            raise ConfigError(f"plan was made for boards [{', '.join(made_for)}] but cluster has "
                              f"[{', '.join(have)}]", RERUN)
    return doc
