"""Aggregation groups from per-device unit sets (the plan file's `groups`).

For each distinct device-set S (the ranks that update exactly the same units):
* `allreduce` over S's ranks, only when |S| > 1: the units' gradients (in buckets overlapped with
  backward, `runtime/aggregate.py`); bytes_per_step = the units' parameter bytes.
* `broadcast` from S's root to every rank outside S (they run those units forward only), every
  `sync_every` steps (the group's own); bytes_per_step = (parameter + buffer bytes) / sync_every.

Roots and chain order: without link rates the root is S's lowest rank and the receivers follow in
rank order. With rates (`rates[r]`, bytes/s) the root is S's fastest member and the receivers go
fastest first: the last rank of a chain only receives, so a slow link carries the payload once.

Intervals: `sync_every` for every broadcast group, or with `intervals="wire"` (the time
objective) each group's own: the smallest power of two up to `sync_every` at which the group
puts no more seconds per step on the wire than the plan's gradient allreduces do (`wire.py`).

Creation order (every rank creates the groups with >1 rank in this order): larger device-sets
first (with nested plans the set shared by everyone leads), then by lowest unit, then by ranks;
inside a device-set the allreduce precedes the broadcast.
"""

from __future__ import annotations

from typing import Sequence

from dsparse_cli.planning.wire import group_seconds


def device_sets(device_units: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], list[int]]]:
    """[(ranks, units)] for each distinct set of ranks updating the same units, in creation order."""
    by_ranks: dict[tuple[int, ...], list[int]] = {}
    all_units = sorted({u for units in device_units for u in units})
    for u in all_units:
        ranks = tuple(r for r, units in enumerate(device_units) if u in units)
        by_ranks.setdefault(ranks, []).append(u)
    return sorted(by_ranks.items(), key=lambda item: (-len(item[0]), item[1][0], item[0]))


def build_groups(device_units: Sequence[Sequence[int]], param_bytes: Sequence[int], buffer_bytes: Sequence[int],
                 sync_every: int = 1, rates: Sequence[float | None] | None = None,
                 intervals: str = "fixed") -> list[dict]:
    """The `groups` list of the plan file. `device_units[r]`: units rank r updates;
    `param_bytes[u]` / `buffer_bytes[u]`: unit u's state sizes; `rates[r]`: rank r's link."""
    if sync_every < 1:
        raise ValueError("sync_every must be >= 1")
    world = len(device_units)
    speed = [(-(rates[r] or 0) if rates else 0, r) for r in range(world)]   # sorts fastest, then lowest rank
    groups: list[dict] = []
    for ranks, units in device_sets(device_units):
        root = min(ranks, key=lambda r: speed[r])
        receivers = sorted((r for r in range(world) if r not in ranks), key=lambda r: speed[r])
        params = sum(param_bytes[u] for u in units)
        if len(ranks) > 1:
            groups.append({"id": len(groups), "op": "allreduce", "ranks": list(ranks), "units": units,
                           "root": root, "receivers": [], "bytes_per_step": params})
        if receivers:
            state = params + sum(buffer_bytes[u] for u in units)
            groups.append({"id": len(groups), "op": "broadcast", "ranks": [root] + receivers, "units": units,
                           "root": root, "receivers": receivers, "state_bytes": state,
                           "sync_every": sync_every, "bytes_per_step": -(-state // sync_every)})
    if intervals == "wire" and rates and None not in rates:
        _wire_intervals(groups, sync_every, rates)
    return groups


def _wire_intervals(groups: list[dict], cap: int, rates: Sequence[float]) -> None:
    """Each broadcast group's interval: the smallest power of two <= cap whose seconds per step
    are at most the allreduces' (see the module doc)."""
    allreduce_s = sum(group_seconds(g, rates) for g in groups if g["op"] == "allreduce")
    for g in groups:
        if g["op"] != "broadcast":
            continue
        every = 1
        while every * 2 <= cap and group_seconds(_every(g, every), rates) > allreduce_s:
            every *= 2
        g.update(_every(g, every))


def _every(group: dict, every: int) -> dict:
    return {**group, "sync_every": every, "bytes_per_step": -(-group["state_bytes"] // every)}
