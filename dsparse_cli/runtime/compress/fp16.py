"""fp16: cast to half, all_reduce, cast back; the rounding error stays in the residual.

Values are clamped to 65504/world first so the half-precision sum cannot overflow to inf;
what the clamp cuts off is kept in the residual too."""

from __future__ import annotations

import torch
from torch import Tensor

from dsparse_cli.runtime.compress.base import Compressor, Payload

FP16_MAX = 65504.0


class Fp16Compressor(Compressor):
    name = "fp16"
    dense = True
    _limit = FP16_MAX   # per call of `reduce`: FP16_MAX / world

    def encode(self, a: Tensor, key: str) -> tuple[Payload, Tensor]:
        h = a.clamp(-self._limit, self._limit).to(torch.float16)
        return Payload(h, a.numel()), a - h.float()

    def accumulate_into(self, out: Tensor, data: Tensor) -> None:
        out += data.float()

    def reduce(self, bucket: Tensor, group, world: int, key: str) -> Tensor:
        self._limit = FP16_MAX / max(world, 1)
        return super().reduce(bucket, group, world, key)
