"""Training memory of a plan, replayed from a measured `profile.Profile` (pure python, no torch).

What "training bytes" means
---------------------------
The worker's meter (`runtime/memory.py`) takes its base point right before the first training
step, after the model, the data, the optimizer and the process groups exist, and reports the
peak of private memory above it. The profile uses the same split: `base_bytes` is the measuring
process at that point (interpreter, torch, the model's weights) with the code pages its first
steps map, and

    training_bytes(S) = first_step(S) + Σ_{u∈S} O_u
                        + max(step(S), after_step(S), evaluation(S))

* first_step(S): what the first training step adds for good. Measured (`measure._first_steps`)
  as the growth of private memory in the first step of ever larger suffixes of units, each with
  its optimizer and gradients freed again: the Python heap, allocator and kernel caches (the code
  pages it maps are file-backed: in the base, see `runtime/memory.py`). A plan pays the units
  from its first updated one on (those run backward), plus the first evaluation's.
* step(S): the peak over one step of batch + live activations + gradients, replayed from the
  measured per-unit terms (below), plus the aggregator's gradient buckets: a bucket is a float32
  copy of its gradients, made when backward has produced them and freed after the step's
  all-reduces (`runtime/aggregate.py`), so during the backward of unit v the copies of every
  shared unit after v are live.
* after_step(S): batch + gradients + the largest payload the board flattens for a broadcast
  (a group's parameters and buffers; also the buffer broadcast before a forward, while the
  previous step's gradients still exist).
* evaluation(S): gradients (kept until the next step's zero_grad) + the no-grad forward
  (`live_peak_bytes(profile, ∅)`).
O_u is the optimizer state of an updated unit (resident between steps). The weights are in the
base, not here: they exist before the worker's base point.

`Comm` says which of a board's units are all-reduced and the largest broadcast payload; the
planner, which sizes a board before the groups exist, uses `upper_comm` (every updated unit
shared, the larger of the two sides of the model flattened), which is never below what the plan's
groups then give (`planfile.build_plan` writes the latter).

The step replay: region *u* (a unit, and the functional ops up to the next unit) peaks during the
forward at (saved bytes kept by earlier regions + its entering activation + its measured forward
peak); during the backward at (saved bytes of regions <= u still held + gradients and bucket copies
of updated units after it + the gradient flowing in + its measured backward peak); the optimizer
step at (Σ_{u∈S} G_u + its transient). Units before the earliest updated unit run in "frozen" mode
(nothing saved), later units that are not updated in "passthrough" mode. This is the design's
Σ(G+O) + A(S) + work with the sum replaced by the maximum over time that a process really reaches
(gradients of early units do not exist yet when the saved activations peak; the frozen forward's
working set is gone before the backward). The step replay is within 2 % of measured steps
(`Profile.checks`, `dsparse plan --verify`); whole runs on local boards within 10 %
(`bench/memory_check.py`, BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

UPDATED, PASSTHROUGH, FROZEN = "updated", "passthrough", "frozen"


@dataclass(frozen=True)
class Comm:
    """What one board's aggregation holds besides its gradients (from the plan's groups)."""
    shared: frozenset = frozenset()   # units whose gradients it all-reduces with other boards
    flat_bytes: int = 0               # the largest tensor set it flattens for a broadcast


def state_bytes(profile, units: Iterable[int]) -> int:
    return sum(profile.units[u].param_bytes + profile.units[u].buffer_bytes for u in units)


def weight_bytes(profile) -> int:
    return state_bytes(profile, range(profile.num_units))


def upper_comm(profile, updated: Iterable[int]) -> Comm:
    """The most a board updating `updated` can hold, whatever the other boards train: every unit
    shared, and it roots the broadcast of its units or receives the others."""
    s = set(updated)
    rest = set(range(profile.num_units)) - s
    return Comm(frozenset(s), max(state_bytes(profile, s), state_bytes(profile, rest)))


def plan_comm(profile, groups: list[dict], rank: int) -> Comm:
    """A board's `Comm` from the plan file's groups (see `schedule.build_groups`): it all-reduces
    the units of its allreduce groups and first broadcasts their buffers; it flattens every
    broadcast group's parameters and buffers, as root or receiver."""
    shared, flat = set(), 0
    for g in groups:
        if rank not in g["ranks"] or len(g["ranks"]) < 2:
            continue
        if g["op"] == "allreduce":
            shared.update(g["units"])
            flat = max(flat, sum(profile.units[u].buffer_bytes for u in g["units"]))
        else:
            flat = max(flat, state_bytes(profile, g["units"]))
    return Comm(frozenset(shared), flat)


def _modes(n: int, updated: set[int]) -> list[str]:
    first = min(updated) if updated else n
    return [FROZEN if v < first else (UPDATED if v in updated else PASSTHROUGH) for v in range(n)]


def _kept_by_region(units: list, modes: list[str]) -> list[int]:
    """Bytes each region leaves saved for backward under these modes; each entering activation
    is counted once, by the region that saves it first."""
    kept = [0] * len(units)
    for v, (u, m) in enumerate(zip(units, modes)):
        if m == FROZEN:
            continue
        prev_keeps = v > 0 and modes[v - 1] != FROZEN and units[v - 1].saves_output[modes[v - 1]]
        kept[v] = u.saved[m] + (u.input_bytes if u.saves_input[m] and not prev_keeps else 0)
        if v + 1 < len(units) and u.saves_output[m]:
            kept[v] += units[v + 1].input_bytes
    return kept


def live_peak_bytes(profile, updated: Iterable[int], shared: Iterable[int] = ()) -> int:
    """Peak over one step of batch + activations + gradients + the bucket copies of the `shared`
    units' gradients (everything but the optimizer state and the one-time first-step bytes)."""
    units, updated, shared = profile.units, set(updated), set(shared)
    n = len(units)
    modes = _modes(n, updated)
    kept = _kept_by_region(units, modes)
    peak, held = profile.batch_bytes, 0
    for v, (u, m) in enumerate(zip(units, modes)):                      # forward
        in_kept = v == 0 or (modes[v - 1] != FROZEN and units[v - 1].saves_output[modes[v - 1]])
        start = profile.batch_bytes + held + (0 if in_kept else u.input_bytes)
        peak = max(peak, start + u.forward_peak[m])
        held += kept[v]
    grads = copies = 0
    for v in range(n - 1, -1, -1):                                        # backward
        m = modes[v]
        if m == FROZEN:
            break
        grad_in = units[v + 1].input_bytes if v + 1 < n else 0
        peak = max(peak, profile.batch_bytes + held + grads + copies + grad_in + units[v].backward_peak[m])
        held -= kept[v]
        if m == UPDATED:
            grads += units[v].grad_bytes
            copies += units[v].grad_bytes if v in shared else 0
    peak = max(peak, profile.batch_bytes + grads + copies)                # all buckets in flight
    if updated:                                                            # optimizer step
        g_all = sum(u.grad_bytes for u in units) or 1
        peak = max(peak, profile.batch_bytes + grads + profile.step_peak_bytes * grads // g_all)
    return peak


def first_step_bytes(profile, updated: Iterable[int]) -> int:
    """One-time bytes of the first step: those of every unit from the first updated one on."""
    s = set(updated)
    return sum(u.first_step_bytes for u in profile.units[min(s):]) if s else 0


def terms(profile, updated: Iterable[int], comm: Comm | None = None) -> dict[str, int]:
    """The points of a run whose maximum is the training peak (see the module doc)."""
    s = set(updated)
    comm = upper_comm(profile, s) if comm is None else comm
    grads = sum(profile.units[v].grad_bytes for v in s)
    return {"first_step": first_step_bytes(profile, s), "first_eval": profile.eval_first_bytes,
            "optimizer": sum(profile.units[v].optimizer_bytes for v in s),
            "gradients": grads, "step_alone": live_peak_bytes(profile, s),
            "step": live_peak_bytes(profile, s, comm.shared & s),
            "after_step": profile.batch_bytes + grads + comm.flat_bytes,
            "evaluation": grads + live_peak_bytes(profile, set())}


def training_bytes(profile, updated: Iterable[int], comm: Comm | None = None) -> int:
    """Peak bytes above the base point over a run updating `updated` (see the module doc);
    `comm` None: the most any plan's groups can make it."""
    t = terms(profile, updated, comm)
    return t["first_step"] + t["first_eval"] + t["optimizer"] + max(t["step"], t["after_step"], t["evaluation"])


def peak_bytes(profile, updated: Iterable[int], comm: Comm | None = None) -> int:
    """Whole-process peak: measured base + training bytes."""
    return profile.base_bytes + training_bytes(profile, updated, comm)


def breakdown(profile, updated: Iterable[int], comm: Comm | None = None) -> dict[str, int]:
    """The parts of training bytes (they sum to it), for display and `--verify`: one-time bytes
    of the first step, optimizer state, gradients, saved activations A(S), the rest of the
    step's own peak (batch and working set; negative when the peak comes before every gradient
    exists), what aggregation adds above that, and what evaluation adds (its one-time bytes, and
    its forward when that is above the step)."""
    s = set(updated)
    t = terms(profile, s, comm)
    train = max(t["step"], t["after_step"])
    parts = {"first_step": t["first_step"], "optimizer": t["optimizer"], "gradients": t["gradients"],
             "saved_activations": sum(_kept_by_region(profile.units, _modes(profile.num_units, s)))}
    parts["working_set"] = t["step_alone"] - parts["gradients"] - parts["saved_activations"]
    parts["aggregation"] = train - t["step_alone"]
    parts["evaluation"] = t["first_eval"] + max(0, t["evaluation"] - train)
    return parts


def single_process_bytes(parts: dict[str, int]) -> int:
    """Training bytes of the same steps in one process with no other board and no evaluation
    (what `dsparse plan --verify` measures), from a `breakdown`."""
    return sum(parts.values()) - parts.get("aggregation", 0) - parts.get("evaluation", 0)
