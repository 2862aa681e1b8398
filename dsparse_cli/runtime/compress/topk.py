"""Top-k sparsification, DGC style (Lin et al., "Deep Gradient Compression", ICLR 2018).

* momentum correction: u = m*u + g; v = v + u; send the largest |v| (values fp32 + indices);
  the sent positions of both u and v are zeroed (momentum factor masking). With momentum > 0
  the optimizer must run without momentum (see `Compressor.momentum`).
* density warm-up: from `warmup_density` down to `density`, exponentially over `warmup_steps`.
* threshold from a random sample of |v| instead of a sort; if it passes more than 1.25*k
  elements, an exact top-k among those tightens it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import dsparse_cli.runtime.compress.codec as codec
from dsparse_cli.contract import COMPRESSOR_OPTIONS
from dsparse_cli.runtime.compress.base import Compressor, Option, Payload
from dsparse_cli.runtime.compress.select import Sampler, cap, passing, top_value

SLACK = 1.25
DEFAULTS = COMPRESSOR_OPTIONS["topk"]


class TopKCompressor(Compressor):
    name = "topk"
    OPTIONS = {
        "density": Option(DEFAULTS["density"], float, 0.0, 1.0, lo_open=True),
        "momentum": Option(0.9, float, 0.0, 1.0, hi_open=True),
        "warmup_steps": Option(DEFAULTS["warmup_steps"], int, 0, 10**9),
        "warmup_density": Option(0.25, float, 0.0, 1.0, lo_open=True),
        "sample_fraction": Option(0.01, float, 0.0, 1.0, lo_open=True),
        "min_sample": Option(1024, int, 1, 10**9),
        "seed": Option(0, int, 0, 2**63 - 1),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        o = self.opts
        self.sampler = Sampler(o["seed"], o["sample_fraction"], o["min_sample"])
        self._steps: dict[str, int] = {}
        self._sent_elems = self._elems = 0

    def density_at(self, step: int) -> float:
        d, w = self.opts["density"], self.opts["warmup_steps"]
        d0 = max(self.opts["warmup_density"], d)
        return d if step >= w else max(d, d0 * (d / d0) ** (step / w))

    def encode(self, a: Tensor, key: str) -> tuple[Payload, Tensor]:
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        n = a.numel()
        absa = a.abs()
        d = self.density_at(step)
        k = max(1, math.ceil(d * n)) if n else 0
        sample = self.sampler.sample(absa)
        thr = top_value(sample.sort(descending=True).values, d) if n else 0.0
        idx = cap(*passing(absa, thr), k, SLACK)
        code, ib = codec.encode_indices(idx, n)
        payload = Payload(codec.pack([code], [a[idx], ib], a.device), n)
        residual = a  # a is ours (see Compressor.encode): reuse it
        residual[idx] = 0
        self._mask_velocity(key, idx)
        self._sent_elems += idx.numel()
        self._elems += n
        return payload, residual

    def accumulate_into(self, out: Tensor, data: Tensor) -> None:
        (code,), (vb, ib) = codec.unpack(data)
        idx = codec.decode_indices(code, ib, out.numel())
        out.index_add_(0, idx, codec.from_bytes(vb, torch.float32))

    def _extra_state(self) -> dict:
        return {"steps": dict(self._steps), "sampler": self.sampler.state_dict()}

    def _load_extra(self, extra: dict) -> None:
        self._steps = dict(extra.get("steps", {}))
        self.sampler.load_state_dict(extra.get("sampler", {}))

    def report(self) -> dict:
        r = super().report()
        r["topk_density_sent"] = self._sent_elems / self._elems if self._elems else 0.0
        return r
