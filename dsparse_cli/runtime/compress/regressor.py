"""A tiny online regressor for the quantiles of log|a| (PBGC step 1, our reading).

It predicts log|a| at K fixed top fractions for the coming step. The scale comes from the one
cheap statistic of the current step, s = log mean|a| (an O(n) pass, no sort); the network
predicts the *shape* r = q - s:

    features x = [r_last (K), s - s_last, (step - step_last)/10, 1]
    r_hat      = r_last + W2 tanh(W1 x + b1) + b2        (W2, b2 start at 0: persistence)
    q_hat      = s + r_hat

where r_last, s_last, step_last come from the last step whose quantiles were measured (on a
random sample). Each measurement adds one example (x, r - r_last) to a small replay buffer and
runs a few Adam steps on it. Its error is the mean |q_hat - q_measured| over the K levels,
in natural-log units, taken *before* it trains on that measurement (out of sample).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOOR = -30.0  # relative log-magnitude floor: exact zeros would be -inf


class QuantileRegressor:
    def __init__(self, k: int, hidden: int = 16, lr: float = 0.01, fit_steps: int = 4,
                 buffer: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)  # own RNG: never touch the training stream
        d = k + 3
        self.w1 = (torch.randn(hidden, d, generator=gen) / math.sqrt(d)).requires_grad_()
        self.b1 = torch.zeros(hidden, requires_grad=True)
        self.w2 = torch.zeros(k, hidden, requires_grad=True)
        self.b2 = torch.zeros(k, requires_grad=True)
        self.params = [self.w1, self.b1, self.w2, self.b2]
        # Adam by hand: torch.optim imports torch._dynamo on first use (seconds on a board)
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]
        self._t = 0
        self.k, self.lr, self.fit_steps, self.buffer = k, lr, fit_steps, buffer
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._last: tuple[Tensor, float, int] | None = None  # (r, s, step) of last measurement
        self.fitted = 0  # examples trained on
        self.errors = 0
        self.error_sum = 0.0
        self.error_ema: float | None = None

    @property
    def mae(self) -> float | None:
        """Mean absolute error of all out-of-sample predictions, natural-log units."""
        return self.error_sum / self.errors if self.errors else None

    def warm(self, min_fitted: int, max_error: float) -> bool:
        return (self._last is not None and self.fitted >= min_fitted
                and (self.error_ema is None or self.error_ema <= max_error))

    def _features(self, s: float, step: int) -> Tensor:
        r, s0, t0 = self._last
        return torch.cat([r, torch.tensor([s - s0, (step - t0) / 10.0, 1.0])])

    def _net(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2

    def predict(self, s: float, step: int) -> Tensor | None:
        """Predicted log|a| quantiles (K floats) for a step with log mean|a| = s."""
        if self._last is None:
            return None
        with torch.no_grad():
            return s + self._last[0] + self._net(self._features(s, step))

    def observe(self, measured: Tensor, s: float, step: int) -> float | None:
        """Learn from measured log|a| quantiles of this step; -> error of the prediction made
        for it (None on the first call)."""
        measured = measured.detach().float().cpu()
        r = (measured - s).clamp(min=FLOOR)
        err = None
        if self._last is not None:
            err = float((self.predict(s, step) - measured.clamp(min=s + FLOOR)).abs().mean())
            self.errors += 1
            self.error_sum += err
            self.error_ema = err if self.error_ema is None else 0.8 * self.error_ema + 0.2 * err
            self._xs.append(self._features(s, step))
            self._ys.append(r - self._last[0])
            del self._xs[:-self.buffer], self._ys[:-self.buffer]
            self.fitted += 1
            self._fit()
        self._last = (r, s, step)
        return err

    def _fit(self) -> None:
        xs, ys = torch.stack(self._xs), torch.stack(self._ys)
        for _ in range(self.fit_steps):
            with torch.enable_grad():  # the aggregator may call us under no_grad
                loss = (self._net(xs) - ys).abs().mean()
                grads = torch.autograd.grad(loss, self.params)
            self._adam(grads)

    def _adam(self, grads, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self._t += 1
        c1, c2 = 1 - b1 ** self._t, 1 - b2 ** self._t
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self._m, self._v):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + eps))

    # --- checkpoints ---------------------------------------------------------------------------
    _SCALARS = ("_t", "fitted", "errors", "error_sum", "error_ema")

    def state_dict(self) -> dict:
        last = None if self._last is None else (self._last[0].clone(), *self._last[1:])
        return {"params": [p.detach().clone() for p in self.params],
                "m": [t.clone() for t in self._m], "v": [t.clone() for t in self._v],
                "xs": list(self._xs), "ys": list(self._ys), "last": last,
                **{k: getattr(self, k) for k in self._SCALARS}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
        self._m = [t.clone() for t in state["m"]]
        self._v = [t.clone() for t in state["v"]]
        self._xs, self._ys = list(state["xs"]), list(state["ys"])
        self._last = state["last"]
        for k in self._SCALARS:
            setattr(self, k, state[k])
