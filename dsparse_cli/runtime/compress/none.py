"""No compression: the plain average every data-parallel trainer computes.

Scaled by 1/world before the sum, as DistributedDataParallel does, so results match it."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from dsparse_cli.runtime.compress.base import Compressor, Payload


class NoCompression(Compressor):
    name = "none"
    dense = True

    def compress(self, g: Tensor, key: str) -> tuple[Payload, Tensor]:
        a = g.detach().reshape(-1).float().clone()
        return Payload(a, a.numel()), a.new_zeros(a.numel())  # nothing is ever held back

    def accumulate_into(self, out: Tensor, data: Tensor) -> None:
        out += data

    def reduce(self, bucket: Tensor, group, world: int, key: str) -> Tensor:
        out = bucket.detach().reshape(-1).float().mul(1.0 / max(world, 1))
        if world > 1:
            dist.all_reduce(out, group=group)
            n = out.numel() * 4
            self.stats.record(key, dense=n, sent=n, wire=n, ms=0.0)
        return out
