"""Thresholds without a full sort: a random sample, and an exact top-k only over what a
threshold already selected when it selected too much."""

from __future__ import annotations

import math

import torch
from torch import Tensor

TINY_F32 = torch.finfo(torch.float32).tiny  # exact zeros never pass a threshold


class Sampler:
    """Random samples from its own generators (one per device), so compression never
    disturbs the training run's global RNG stream."""

    def __init__(self, seed: int, fraction: float, minimum: int):
        self.seed, self.fraction, self.minimum = seed, fraction, minimum
        self._gens: dict[str, torch.Generator] = {}

    def size(self, n: int) -> int:
        return min(n, max(self.minimum, math.ceil(self.fraction * n)))

    def sample(self, x: Tensor) -> Tensor:
        """`x` itself when small, else `size(n)` elements drawn with replacement."""
        n, s = x.numel(), self.size(x.numel())
        if s >= n:
            return x
        dev = str(x.device)
        if dev not in self._gens:
            self._gens[dev] = torch.Generator(device=x.device).manual_seed(self.seed)
        idx = torch.randint(n, (s,), generator=self._gens[dev], device=x.device)
        return x[idx]

    def state_dict(self) -> dict:
        return {dev: g.get_state() for dev, g in self._gens.items()}

    def load_state_dict(self, state: dict) -> None:
        for dev, st in state.items():
            self._gens[dev] = torch.Generator(device=dev)
            self._gens[dev].set_state(st)


def top_value(sorted_desc: Tensor, frac: float) -> float:
    """The value that about `frac` of the sorted population is >= to."""
    s = sorted_desc.numel()
    i = min(s - 1, max(0, math.ceil(frac * s) - 1))
    return float(sorted_desc[i])


def passing(absa: Tensor, thr: float) -> tuple[Tensor, Tensor]:
    """One pass over the bucket: sorted positions with |a| >= thr and |a| > 0, and their |a|."""
    idx = (absa >= max(thr, TINY_F32)).nonzero().reshape(-1)
    return idx, absa[idx]


def cap(idx: Tensor, vals: Tensor, k: int, slack: float) -> Tensor:
    """Keep `idx` if at most slack*k; else the exact top k of `vals` among them (sorted)."""
    if idx.numel() > max(slack * k, k):
        top = vals.topk(k, sorted=False).indices
        idx = idx[top].sort().values
    return idx
