"""`dsparse plan --objective`: which units each board trains, within the same memory budgets.

* `auto` (the default): `time` when every board's link rate is known, else `memory`.
* `memory` (the DSparse paper's rule, `planner.py`): every board trains as much as fits.
* `time`: the least predicted step time, which needs every board's link rate: the slowest
  board's compute (`compute.py`) plus the aggregation time (`wire.py`). With `--allow-frozen`
  (fine-tuning from weights) the start is every board training the last k units that every
  board can hold, the rest frozen everywhere: one allreduce, nothing to broadcast. Otherwise the
  start is the memory plan, and every unit it trains stays trained by some board. From the
  start, the boards on the slower links or CPUs train fewer units where that cuts the predicted
  time by at least MIN_GAIN (a slow link stops carrying allreduces, 2(n-1)/n of the bytes each
  way, that it can receive as one broadcast instead; a board with a small CPU share runs a
  shorter backward), as long as every unit keeps at least half the boards that trained it
  (KEEP_TRAINERS). Broadcast intervals are chosen per group (`schedule.py`,
  `intervals="wire"`). Without a compute model (`compute=None`) only the wire counts.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.compute import BoardCompute
from dsparse_cli.planning.planner import CostModel, PlanResult
from dsparse_cli.planning.schedule import build_groups
from dsparse_cli.planning.wire import step_seconds

OBJECTIVES = ("auto", "memory", "time")
DEFAULT_OBJECTIVE = "auto"   # time where every link is known (never slower in bench/, 0.80x on mixed links)
MIN_GAIN = 0.05   # below this the model's error (latency, compute) is larger than the gain
KEEP_TRAINERS = 0.5   # each unit keeps at least this share of the boards that trained it at the start


def resolve_objective(objective: str, rates: Sequence[float | None], names: Sequence[str]) -> str:
    """`memory` or `time`; `auto` is time when every board's link rate is known (the time plan needs
    them), else memory."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}", f"choose {', '.join(OBJECTIVES)}")
    missing = [n for n, r in zip(names, rates) if r is None]
    if objective == "time" and missing:
        raise ConfigError(f"--objective time needs every board's link rate; board {missing[0]} has none",
                          "add `link: 100mbit` (its real rate) to the board or to defaults in cluster.yaml")
    if objective == "auto":
        return "memory" if missing else "time"
    return objective


def plan_for_time(result: PlanResult, cost: CostModel, rates: Sequence[float], param_bytes: Sequence[int],
                  buffer_bytes: Sequence[int], sync_every: int, allow_frozen: bool,
                  compute: BoardCompute | None = None) -> PlanResult:
    """The memory plan `result` re-planned for the least predicted step time."""
    ks = [len(d.units) for d in result.devices]
    if allow_frozen:
        ks = [min(ks)] * len(ks)
    speeds = [rates] + ([compute.shares] if compute else [])
    ks = _descend(ks, speeds, lambda k: _seconds(k, result.order, param_bytes, buffer_bytes, sync_every, rates,
                                                 compute))
    return _with_counts(result, cost, ks)


def _descend(ks: list[int], speeds: Sequence[Sequence[float]], seconds) -> list[int]:
    """Lower unit counts where it pays (see the module doc), best move first, until no move gains
    MIN_GAIN. A move lowers one board, or caps at k every board whose link rate (or CPU share) is
    at most a given tier (moving one slow board alone gains nothing while another like it still
    holds the ring or the slowest backward)."""
    best, start = seconds(ks), ks
    while True:
        trials = [[min(k, cap) if speed[r] <= tier else k for r, k in enumerate(ks)]
                  for speed in speeds for tier in sorted(set(speed)) for cap in range(1, max(ks))]
        trials += [ks[:r] + [cap] + ks[r + 1:] for r in range(len(ks)) for cap in range(1, ks[r])]
        trials = [t for t in trials if t != ks and _keeps_trainers(t, start)]
        scored = sorted(((seconds(t), t) for t in trials), key=lambda st: st[0])
        if not scored or scored[0][0] >= best * (1 - MIN_GAIN):
            return ks
        best, ks = scored[0]


def _keeps_trainers(ks: list[int], start: list[int]) -> bool:
    """Every unit the start trains keeps at least KEEP_TRAINERS of its boards (>= 1): without
    this the least traffic is one board training everything for the others, whose data then
    trains nothing but the head."""
    return all(sum(k > j for k in ks) >= max(1, math.ceil(KEEP_TRAINERS * sum(k > j for k in start)))
               for j in range(max(start)))


def _seconds(ks, order, param_bytes, buffer_bytes, sync_every, rates, compute: BoardCompute | None) -> float:
    units = [sorted(order[:k]) for k in ks]
    wire = step_seconds(build_groups(units, param_bytes, buffer_bytes, sync_every, rates, "wire"), rates)
    return wire + (max(compute.per_board(units)) if compute else 0.0)


def _with_counts(result: PlanResult, cost: CostModel, ks: list[int]) -> PlanResult:
    order = result.order
    devices = [replace(d, units=sorted(order[:k]), predicted_peak_bytes=cost.peak_bytes(order[:k]),
                       predicted_training_bytes=cost.training_bytes(order[:k])) for d, k in zip(result.devices, ks)]
    return replace(result, devices=devices, frozen_units=sorted(order[max(ks):]))
