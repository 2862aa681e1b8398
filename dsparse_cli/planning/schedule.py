"""Aggregation groups from per-device unit sets (the plan file's `groups`).

For each distinct device-set S (the ranks that update exactly the same units):
* `allreduce` over S's ranks, only when |S| > 1: the units' gradients, one flat fp32 bucket;
  bytes_per_step = the units' parameter bytes.
* `broadcast` from S's lowest rank to every rank outside S (they run those units forward only),
  every `sync_every` steps; bytes_per_step = (parameter + buffer bytes) / sync_every.

Creation order (every rank creates the groups with >1 rank in this order): larger device-sets
first (with nested plans the set shared by everyone leads), then by lowest unit, then by ranks;
inside a device-set the allreduce precedes the broadcast.
"""

from __future__ import annotations

from typing import Sequence


def device_sets(device_units: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], list[int]]]:
    """[(ranks, units)] for each distinct set of ranks updating the same units, in creation order."""
    by_ranks: dict[tuple[int, ...], list[int]] = {}
    all_units = sorted({u for units in device_units for u in units})
    for u in all_units:
        ranks = tuple(r for r, units in enumerate(device_units) if u in units)
        by_ranks.setdefault(ranks, []).append(u)
    return sorted(by_ranks.items(), key=lambda item: (-len(item[0]), item[1][0], item[0]))


def build_groups(device_units: Sequence[Sequence[int]], param_bytes: Sequence[int], buffer_bytes: Sequence[int],
                 sync_every: int = 1) -> list[dict]:
    """The `groups` list of the plan file. `device_units[r]`: units rank r updates;
    `param_bytes[u]` / `buffer_bytes[u]`: unit u's state sizes."""
    if sync_every < 1:
        raise ValueError("sync_every must be >= 1")
    world = len(device_units)
    groups: list[dict] = []
    for ranks, units in device_sets(device_units):
        root = ranks[0]
        receivers = [r for r in range(world) if r not in ranks]
        params = sum(param_bytes[u] for u in units)
        if len(ranks) > 1:
            groups.append({"id": len(groups), "op": "allreduce", "ranks": list(ranks), "units": units,
                           "root": root, "receivers": [], "bytes_per_step": params})
        if receivers:
            state = params + sum(buffer_bytes[u] for u in units)
            groups.append({"id": len(groups), "op": "broadcast", "ranks": [root] + receivers, "units": units,
                           "root": root, "receivers": receivers,
                           "bytes_per_step": -(-state // sync_every)})
    return groups
