"""The wire model: what each board's link carries per step of a plan, and how long that takes.

The same byte model the aggregator reports (`runtime/aggregate.py`), so predictions and
measurements compare line by line:

* allreduce of B bytes over n ranks (ring): every member sends and receives 2(n-1)/n * B; a ring
  moves at its slowest member's rate.
* broadcast of B bytes (`runtime/chain.py`: root, then the receivers in the plan's order) every
  `sync_every` steps: every rank but the last sends B, every receiver receives B; a pipelined
  chain moves at its slowest link's rate.

Links are full duplex, so a board's link time is max(sent, received) / rate. Groups run one after
another on every rank, so a step's aggregation time is the sum of the groups' times. Not modelled:
latency per message (a few ms per group on a 1 ms link), compute, and overlap with backward.
A rate of None is an unknown link: bytes are predicted, seconds are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LinkLoad:
    """One board's link in one step (averaged over broadcast intervals)."""
    rank: int
    rate: float | None          # bytes/s
    sent: float
    recv: float

    @property
    def seconds(self) -> float | None:
        return None if not self.rate else max(self.sent, self.recv) / self.rate


def loads(groups: Sequence[dict], rates: Sequence[float | None]) -> list[LinkLoad]:
    """What every rank's link carries per step under `groups` (plan format)."""
    sent, recv = [0.0] * len(rates), [0.0] * len(rates)
    for g in groups:
        b = g["bytes_per_step"]   # a broadcast's already spread over its interval
        if g["op"] == "allreduce":
            ring = 2 * (len(g["ranks"]) - 1) / len(g["ranks"]) * b
            for r in g["ranks"]:
                sent[r] += ring
                recv[r] += ring
        else:
            chain = [g["root"]] + list(g["receivers"])
            for r in chain[:-1]:
                sent[r] += b
            for r in chain[1:]:
                recv[r] += b
    return [LinkLoad(r, rates[r], sent[r], recv[r]) for r in range(len(rates))]


def group_seconds(group: dict, rates: Sequence[float | None]) -> float | None:
    """How long the group takes per step: its payload at its slowest member's rate."""
    members = [rates[r] for r in group["ranks"]]
    if None in members or not members:
        return None
    b = group["bytes_per_step"]
    n = len(group["ranks"])
    per_link = 2 * (n - 1) / n * b if group["op"] == "allreduce" else b
    return per_link / min(members)


def step_seconds(groups: Sequence[dict], rates: Sequence[float | None]) -> float | None:
    """Predicted aggregation seconds per step (groups one after another); None if a rate is unknown."""
    times = [group_seconds(g, rates) for g in groups]
    return None if None in times else sum(times)


def ddp_seconds(param_bytes: int, rates: Sequence[float | None]) -> float | None:
    """A full update's ring all-reduce of every parameter over every board (what DDP sends)."""
    if len(rates) < 2:
        return 0.0
    if None in rates:
        return None
    return 2 * (len(rates) - 1) / len(rates) * param_bytes / min(rates)
