"""PBGC: partition-based gradient compression (Guo, Liu, Zhang, Sensors 2021), our reading.

Only the abstract is available; this is what we built from it. Per bucket, a = u + e, where e
is the residual kept for this key and u = momentum * u + g is DGC's momentum correction (with
momentum factor masking: sent positions of u are zeroed; `momentum: 0` gives a = g + e). With
momentum > 0 the optimizer must run without momentum (`Compressor.momentum`); on a small MLP
after 200 steps this took accuracy from 0.87 (optimizer momentum on sparse updates) to 0.95
(= uncompressed).

1. Distribution. We need log|a| at a few top fractions p (a geometric grid of K=8 from
   key_fraction/4 to 4*(key_fraction + sparse_fraction), at most 0.5). A tiny online regressor
   (`regressor.py`) predicts them from s = log mean|a| and the last measured quantiles. Until
   it is warm (`warmup_steps` measurements fitted, recent error <= `max_log_error`) the
   quantiles of a random sample (`sample_fraction` of a, at least `min_sample`) are used
   instead; once warm, the sample's quantiles are taken only every `refit_every` steps, to keep
   training the regressor and to report its error. Thresholds between grid points are
   interpolated linearly in (log p, log|a|). No step sorts the bucket.
2. Key region: |a| >= t_key = Q(key_fraction). Sent at full precision: fp32 values + indices.
3. Sparse region: the rest. H = normalised entropy of the histogram (`entropy_bins` bins, over
   the sparse part of the sample, between its min and max log|a|), in [0, 1]:
       keep = sparse_fraction * max(H, min_keep)      (fraction of the sparse region kept)
       t_sparse = Q(key_fraction + keep * (1 - key_fraction))
   Spread-out magnitudes (high H) keep more, concentrated ones keep less. Sparse values with
   |a| >= t_sparse are sent as one sign bit each + indices + one fp32 scale = mean of their |a|;
   the receiver rebuilds sign * scale.
4. Everything not sent exactly - unsent values, and a - sign*scale for sparse ones - is the new
   residual e. A threshold that passes more than 2x its target count is tightened by an exact
   top-k among what it passed, so a poor prediction can cost bytes only within that bound.

Bytes (exact, `codec.py`): int32 header + key values 4 B each + key indices + 4 B scale +
ceil(n_sparse/8) B of signs + sparse indices; indices as int32, uint16 gaps or a bitmap,
whichever is smallest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import dsparse_cli.runtime.compress.codec as codec
from dsparse_cli.contract import COMPRESSOR_OPTIONS
from dsparse_cli.runtime.compress.base import Compressor, Option, Payload
from dsparse_cli.runtime.compress.regressor import QuantileRegressor
from dsparse_cli.runtime.compress.select import Sampler, cap, passing, top_value

SLACK = 2.0
LEVELS = 8
TINY = 1e-30


def entropy(values: Tensor, bins: int) -> float:
    """Normalised Shannon entropy (0..1) of the histogram of `values`."""
    if values.numel() < 2:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if not hi - lo > 1e-6:
        return 0.0
    counts = torch.histc(values.float(), bins=bins, min=lo, max=hi)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum()) / math.log(bins)


def interp(logp: list[float], q: list[float], p: float) -> float:
    """log|a| at top fraction p from a grid (logp ascending, q descending), clamped to it."""
    x = min(max(math.log(p), logp[0]), logp[-1])
    for i in range(1, len(logp)):
        if x <= logp[i]:
            w = (x - logp[i - 1]) / (logp[i] - logp[i - 1])
            return q[i - 1] + w * (q[i] - q[i - 1])
    return q[-1]


@dataclass
class _KeyState:
    regressor: QuantileRegressor
    step: int = 0


DEFAULTS = COMPRESSOR_OPTIONS["pbgc"]


class PBGCCompressor(Compressor):
    name = "pbgc"
    OPTIONS = {
        "key_fraction": Option(DEFAULTS["key_fraction"], float, 0.0, 0.5, lo_open=True),
        "sparse_fraction": Option(0.01, float, 0.0, 1.0),
        "min_keep": Option(0.1, float, 0.0, 1.0),
        "entropy_bins": Option(DEFAULTS["entropy_bins"], int, 2, 4096),
        "warmup_steps": Option(DEFAULTS["warmup_steps"], int, 0, 10**9),
        "refit_every": Option(4, int, 1, 10**9),
        "max_log_error": Option(0.5, float, 0.0, math.inf, lo_open=True),
        "sample_fraction": Option(0.01, float, 0.0, 1.0, lo_open=True),
        "min_sample": Option(4096, int, 1, 10**9),
        "momentum": Option(0.9, float, 0.0, 1.0, hi_open=True),
        "seed": Option(0, int, 0, 2**63 - 1),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        o = self.opts
        if o["key_fraction"] + o["sparse_fraction"] > 1:
            raise ValueError("compression pbgc: key_fraction + sparse_fraction must be <= 1")
        self.sampler = Sampler(o["seed"], o["sample_fraction"], o["min_sample"])
        hi = min(0.5, 4 * (o["key_fraction"] + o["sparse_fraction"]))
        lo = o["key_fraction"] / 4
        self.levels = [lo * (hi / lo) ** (i / (LEVELS - 1)) for i in range(LEVELS)]
        self._logp = [math.log(p) for p in self.levels]
        self._keys: dict[str, _KeyState] = {}
        self._totals = {"calls": 0, "predicted": 0, "entropy": 0.0, "key_frac": 0.0,
                        "key_target": 0.0, "sparse_frac": 0.0}

    # --- step 1: the distribution ----------------------------------------------------------
    def _state(self, key: str) -> _KeyState:
        if key not in self._keys:
            self._keys[key] = _KeyState(QuantileRegressor(LEVELS, seed=self.opts["seed"]))
        return self._keys[key]

    def sampled_quantiles(self, sample_abs: Tensor) -> Tensor:
        """log|a| at each grid level, from a sample (sorting the sample only)."""
        logs = sample_abs.clamp(min=TINY).log().sort(descending=True).values
        return torch.tensor([top_value(logs, p) for p in self.levels])

    def _quantiles(self, st: _KeyState, s: float, sample: Tensor) -> tuple[list[float], bool]:
        """-> (log|a| at the grid levels, whether they came from the regressor)."""
        o = self.opts
        reg = st.regressor
        warm = reg.warm(o["warmup_steps"], o["max_log_error"])
        pred = reg.predict(s, st.step)
        measured = None
        if not warm or pred is None or st.step % o["refit_every"] == 0:
            measured = self.sampled_quantiles(sample)
            reg.observe(measured, s, st.step)
        return (pred.tolist(), True) if warm and pred is not None else (measured.tolist(), False)

    # --- steps 2-4 ---------------------------------------------------------------------------
    def encode(self, a: Tensor, key: str) -> tuple[Payload, Tensor]:
        o, n = self.opts, a.numel()
        absa = a.abs()
        mean = float(absa.mean()) if n else 0.0
        if not mean > 0:  # all zero: nothing to send (non-finite was refused earlier)
            none = torch.empty(0, dtype=torch.long, device=a.device)
            return self._payload(a, none, none, 0.0), a
        st = self._state(key)
        sample = self.sampler.sample(absa)
        q, predicted = self._quantiles(st, math.log(mean), sample)
        st.step += 1

        kf = o["key_fraction"]
        t_key = math.exp(interp(self._logp, q, kf))
        h = entropy(sample[(sample < t_key) & (sample > 0)].clamp(min=TINY).log(),
                    o["entropy_bins"])
        keep = o["sparse_fraction"] * max(h, o["min_keep"])
        t_s = min(math.exp(interp(self._logp, q, kf + keep * (1 - kf))), t_key)
        idx, vals = passing(absa, t_s if keep > 0 else t_key)  # the only pass over a
        in_key = vals >= t_key
        passed_k = int(in_key.sum())
        idx_k = cap(idx[in_key], vals[in_key], math.ceil(kf * n), SLACK)
        idx_s = idx[:0]
        if keep > 0:  # key candidates the cap left out fall back to the sparse region
            rest = ~in_key if idx_k.numel() == passed_k else ~torch.isin(idx, idx_k)
            idx_s = cap(idx[rest], vals[rest], math.ceil(keep * n), SLACK)
        scale = float(absa[idx_s].mean()) if idx_s.numel() else 0.0

        payload = self._payload(a, idx_k, idx_s, scale)
        self._mask_velocity(key, idx_k)
        self._mask_velocity(key, idx_s)
        residual = a  # a is ours (see Compressor.encode): reuse it
        residual[idx_k] = 0
        residual[idx_s] -= torch.where(residual[idx_s] >= 0, scale, -scale)
        self._tally(predicted=predicted, entropy=h, key_frac=passed_k / n, key_target=kf,
                    sparse_frac=idx_s.numel() / n)
        return payload, residual

    def _payload(self, a: Tensor, idx_k: Tensor, idx_s: Tensor, scale: float) -> Payload:
        n, dev = a.numel(), a.device
        code_k, ib_k = codec.encode_indices(idx_k, n)
        code_s, ib_s = codec.encode_indices(idx_s, n)
        scale_t = torch.tensor([scale] if idx_s.numel() else [], dtype=torch.float32)
        signs = codec.pack_bits(a[idx_s] >= 0)
        fields = [a[idx_k], ib_k, scale_t.to(dev), signs, ib_s]
        meta = [code_k, code_s, idx_k.numel(), idx_s.numel()]
        return Payload(codec.pack(meta, fields, dev), n)

    def accumulate_into(self, out: Tensor, data: Tensor) -> None:
        (code_k, code_s, _, n_s), (vb, ib_k, sb, signs, ib_s) = codec.unpack(data)
        n = out.numel()
        out.index_add_(0, codec.decode_indices(code_k, ib_k, n),
                       codec.from_bytes(vb, torch.float32))
        if n_s:
            scale = codec.from_bytes(sb, torch.float32)
            pos = codec.unpack_bits(signs, n_s)
            vals = torch.where(pos, scale, -scale)
            out.index_add_(0, codec.decode_indices(code_s, ib_s, n), vals)

    # --- checkpoints -------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"totals": dict(self._totals), "sampler": self.sampler.state_dict(),
                "keys": {k: {"step": st.step, "regressor": st.regressor.state_dict()}
                         for k, st in self._keys.items()}}

    def _load_extra(self, extra: dict) -> None:
        self._totals.update(extra.get("totals", {}))
        self.sampler.load_state_dict(extra.get("sampler", {}))
        for k, st in extra.get("keys", {}).items():
            self._state(k).step = st["step"]
            self._keys[k].regressor.load_state_dict(st["regressor"])

    # --- reporting ---------------------------------------------------------------------------
    def _tally(self, **values: float) -> None:
        self._totals["calls"] += 1
        for name, value in values.items():
            self._totals[name] += value

    def report(self) -> dict:
        r = super().report()
        t = self._totals
        c = max(t["calls"], 1)
        regs = [st.regressor for st in self._keys.values() if st.regressor.errors]
        r.update({
            # the regressors' mean out-of-sample error, natural-log units (None: no data)
            "pbgc_predictor_mae_log": sum(g.error_sum for g in regs) / sum(g.errors for g in regs) if regs else None,
            "pbgc_predicted_share": t["predicted"] / c,  # share of steps run on predictions
            "pbgc_entropy": t["entropy"] / c,
            "pbgc_key_fraction_observed": t["key_frac"] / c,  # passed t_key, before capping
            "pbgc_key_fraction_target": t["key_target"] / c,
            "pbgc_sparse_fraction_sent": t["sparse_frac"] / c,
        })
        return r
