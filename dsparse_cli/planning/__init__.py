"""Planning: measured profile -> per-device sparse-update plan -> aggregation groups -> plan file.

`plan_cluster` plans from given budgets (`planning.make` finds them for the CLI). Nothing here imports
torch at module level (profiling runs in a subprocess; `importance=grad` imports torch when used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from dsparse_cli.planning.compute import BoardCompute, cpu_share
from dsparse_cli.planning.objective import DEFAULT_OBJECTIVE, plan_for_time, resolve_objective
from dsparse_cli.planning.planfile import DEFAULT_HEADROOM, budget_bytes, build_plan, load_plan, write_plan
from dsparse_cli.planning.planner import CostTable, Device, PlanResult, depth_order, plan_devices
from dsparse_cli.planning.profile import Profile, check_args, get_profile, launcher_bytes, peak_bytes, training_bytes
from dsparse_cli.planning.schedule import build_groups

__all__ = ["CostTable", "Device", "PlanResult", "Profile", "budget_bytes", "build_groups", "build_plan",
           "check_plan_options", "depth_order", "get_profile", "load_plan", "peak_bytes", "plan_cluster",
           "plan_devices", "training_bytes", "write_plan"]


def plan_cluster(*, cluster: str, boards: Sequence[tuple[str, Mapping]], state_dir: str | Path,
                 model: str = "mobilenet_v2", num_classes: int = 10, image_size: int = 32, batch_size: int = 64,
                 optimizer: str = "sgd-momentum", dtype: str = "float32", headroom: float = DEFAULT_HEADROOM,
                 sync_every: int = 1, importance: str = "depth", allow_frozen: bool = False,
                 exclude_small: bool = False, refresh_profile: bool = False, launcher: str = "dsparse",
                 objective: str = DEFAULT_OBJECTIVE) -> dict:
    """Profile (cached), rank units, plan every board, and return the plan document (not written;
    call `write_plan(state_dir / "plan.json", doc)`).

    `boards`: (name, facts) in inventory order; facts hold `usable_memory_bytes` and/or
    `training_allowance_bytes` (see `board_budget`) and are recorded in the plan's `probe` section
    as given (torch, cuda, source, ...). `launcher`: what starts the worker on each board
    ("dsparse" or "torchrun"); its memory is in every budget. `objective`: see `objective.py`;
    facts' `link_bytes_per_s` are the boards' link rates, `cpu_quota` their CPU quotas (`compute.py`)."""
    from dsparse_cli.planning.importance import importance_order

    check_plan_options(model=model, num_classes=num_classes, image_size=image_size, batch_size=batch_size,
                       optimizer=optimizer, dtype=dtype, headroom=headroom, sync_every=sync_every,
                       importance=importance)
    link_of = {name: facts.get("link_bytes_per_s") for name, facts in boards}
    objective = resolve_objective(objective, list(link_of.values()), list(link_of))
    prof = get_profile(state_dir, model, num_classes=num_classes, image_size=image_size,
                       batch_size=batch_size, dtype=dtype, optimizer=optimizer, refresh=refresh_profile,
                       launcher=launcher)
    order = importance_order(importance, prof.num_units, model=model, num_classes=num_classes,
                             image_size=image_size, batch_size=batch_size)
    launcher_mem = launcher_bytes(prof, launcher)
    allocators = {name: facts.get("allocator", "lean") for name, facts in boards}
    if "fast" in allocators.values() and prof.fast_allocator_bytes is None:   # measured once, kept with the profile
        from dsparse_cli.planning.profile import profile_path, save_profile
        from dsparse_cli.planning.step import fast_allocator_bytes

        prof.fast_allocator_bytes = fast_allocator_bytes(prof)
        save_profile(prof, profile_path(state_dir, prof.key))
    extra = {name: (prof.fast_allocator_bytes or 0) if a == "fast" else 0 for name, a in allocators.items()}
    devices = [Device(name, board_budget(facts, headroom, prof.base_bytes + launcher_mem), extra[name])
               for name, facts in boards]
    result = plan_devices(devices, prof, order, allow_frozen=allow_frozen, exclude_small=exclude_small,
                          launcher_bytes=launcher_mem)
    rates = [link_of[d.name] for d in result.devices]
    compute = None
    if objective == "time":
        facts_of = dict(boards)
        compute = BoardCompute([_unit_seconds(prof, allocators[d.name], state_dir) for d in result.devices],
                               [cpu_share(facts_of[d.name].get("cpu_quota")) for d in result.devices])
        result = plan_for_time(result, prof, rates, [u.param_bytes for u in prof.units],
                               [u.buffer_bytes for u in prof.units], sync_every, allow_frozen, compute)
    return build_plan(cluster=cluster, profile=prof, result=result, sync_every=sync_every,
                      probe={name: facts for name, facts in boards}, importance=importance,
                      headroom=headroom, allow_frozen=allow_frozen, launcher=launcher, objective=objective,
                      rates=rates, allocators=allocators, compute=compute)


def _unit_seconds(prof: Profile, allocator: str, state_dir: str | Path) -> dict:
    """The profile's unit timings under `allocator`, measured once (~10 s) and kept with it."""
    if allocator not in prof.unit_seconds:
        from dsparse_cli.planning.compute import measure_seconds
        from dsparse_cli.planning.profile import profile_path, save_profile

        prof.unit_seconds[allocator] = measure_seconds(
            prof.model, num_classes=prof.num_classes, image_size=prof.image_size, batch_size=prof.batch_size,
            dtype=prof.dtype, optimizer=prof.optimizer, allocator=allocator)
        save_profile(prof, profile_path(state_dir, prof.key))
    return prof.unit_seconds[allocator]


def board_budget(facts: Mapping, headroom: float, base_and_launcher: int) -> int:
    """Usable memory less the headroom; a simulated board's training allowance instead gives the
    measured base + launcher + the allowance (the lower of the two when it has both)."""
    budgets = []
    if facts.get("usable_memory_bytes"):
        budgets.append(budget_bytes(int(facts["usable_memory_bytes"]), headroom))
    if facts.get("training_allowance_bytes"):
        budgets.append(base_and_launcher + int(facts["training_allowance_bytes"]))
    return min(budgets)


def check_plan_options(*, model: str, num_classes: int, image_size: int, batch_size: int, optimizer: str,
                       dtype: str = "float32", headroom: float, sync_every: int, importance: str) -> None:
    """Every option of `dsparse plan`, checked before torch is imported or the model measured."""
    from dsparse_cli.errors import ConfigError
    from dsparse_cli.planning.importance import KINDS

    check_args(model, batch_size, image_size, dtype, optimizer)
    budget_bytes(1, headroom)   # its range check
    if sync_every < 1:
        raise ConfigError(f"--sync-every {sync_every} must be at least 1")
    if num_classes < 2:
        raise ConfigError(f"--num-classes {num_classes} must be at least 2")
    if importance not in KINDS:
        raise ConfigError(f"unknown importance {importance!r}", f"choose one of {', '.join(KINDS)}")
