"""The compressor interface and its statistics (the registry, `make_compressor`, is in __init__).

A compressor turns one rank's bucket `g` (flat float32) into a `Payload`, keeping what it did
not send in a per-key residual (error feedback: next time it compresses `g + residual`).
`compress`/`decompress` are pure enough to test without torch.distributed; `reduce` adds the
exchange and averages over the group:

* dense methods (none, fp16) sum their payloads with all_reduce;
* sparse methods (topk, pbgc) all_gather variable-length byte payloads (`exchange.py`) and every
  rank decodes and sums all of them, so every member ends with the same average.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor

from dsparse_cli.runtime.compress.exchange import allgather_varlen


@dataclass
class Payload:
    """What one rank sends: a dense tensor (all_reduce methods) or a uint8 byte buffer
    (all_gather methods; its length is the exact byte count, indices and header included)."""

    data: Tensor
    numel: int  # elements of the dense bucket it stands for

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass(frozen=True)
class StatsSnapshot:
    dense_bytes: int = 0  # what uncompressed float32 buckets would have sent
    sent_bytes: int = 0  # payload bytes this rank sent (values, indices, headers)
    wire_bytes: int = 0  # sent_bytes plus exchange overhead (length exchange, padding)
    compress_ms: float = 0.0  # encode + decode time, exchange excluded
    steps: int = 0

    @property
    def ratio(self) -> float:
        """dense / sent; 1.0 before anything was sent."""
        return self.dense_bytes / self.sent_bytes if self.sent_bytes else 1.0

    def since(self, earlier: "StatsSnapshot") -> "StatsSnapshot":
        return StatsSnapshot(**{f.name: getattr(self, f.name) - getattr(earlier, f.name)
                                for f in fields(self)})

    def per_step(self) -> dict:
        n = max(self.steps, 1)
        return {"dense_bytes_per_step": self.dense_bytes / n,
                "sent_bytes_per_step": self.sent_bytes / n,
                "wire_bytes_per_step": self.wire_bytes / n,
                "compression_ratio": self.ratio,
                "compress_ms_per_step": self.compress_ms / n}


@dataclass
class CompressStats:
    """Cumulative counters. A step is one reduce of every key, so `steps` is the largest number
    of reduces any key has had (each bucket is reduced once per optimizer step)."""

    total: StatsSnapshot = field(default_factory=StatsSnapshot)
    calls: dict = field(default_factory=dict)

    def record(self, key: str, dense: int, sent: int, wire: int, ms: float) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        t = self.total
        self.total = replace(t, dense_bytes=t.dense_bytes + dense, sent_bytes=t.sent_bytes + sent,
                             wire_bytes=t.wire_bytes + wire, compress_ms=t.compress_ms + ms,
                             steps=max(self.calls.values()))

    def snapshot(self) -> StatsSnapshot:
        return self.total

    def __getattr__(self, name):  # dense_bytes, sent_bytes, ..., ratio, per_step
        if name in ("total", "calls"):
            raise AttributeError(name)
        return getattr(self.total, name)


@dataclass(frozen=True)
class Option:
    default: object
    kind: type  # int or float
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def check(self, method: str, name: str, value):
        if value is None:
            return self.default
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int:
            ok_type = ok_type and float(value).is_integer()
        if ok_type:
            v = self.kind(value)
            if (v > self.lo or (v == self.lo and not self.lo_open)) and \
                    (v < self.hi or (v == self.hi and not self.hi_open)):
                return v
        lb, rb = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        what = "an integer" if self.kind is int else "a number"
        raise ValueError(f"compression {method}: {name} must be {what} in {lb}{self.lo:g}, "
                         f"{self.hi:g}{rb}, got {value!r}")


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # timings must include the kernels, not just their launch
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Compressor:
    name = "base"
    dense = False  # True: payloads are summed by all_reduce; False: all-gathered bytes
    OPTIONS: dict[str, Option] = {}

    def __init__(self, **opts):
        unknown = sorted(set(opts) - set(self.OPTIONS))
        if unknown:
            known = ", ".join(self.OPTIONS) or "none"
            raise ValueError(f"compression {self.name}: unknown option {unknown[0]!r} "
                             f"(known: {known})")
        self.opts = {k: o.check(self.name, k, opts.get(k)) for k, o in self.OPTIONS.items()}
        self.stats = CompressStats()
        self._memory: dict[str, Tensor] = {}
        self._velocity: dict[str, Tensor] = {}

    @property
    def momentum(self) -> float:
        """Momentum the compressor applies itself (DGC momentum correction, option
        `momentum`). When > 0 the optimizer must run without momentum, or it is applied twice."""
        return self.opts.get("momentum", 0.0)

    # --- pure part -------------------------------------------------------------------------
    def compress(self, g: Tensor, key: str) -> tuple[Payload, Tensor]:
        """Compress `g` plus the residual kept for `key`; store and return the new residual."""
        a = self._accumulate(g.detach().reshape(-1), key)
        payload, residual = self.encode(a, key)
        self._memory[key] = residual
        return payload, residual

    def encode(self, a: Tensor, key: str) -> tuple[Payload, Tensor]:
        """-> (payload, residual) with decompress(payload) + residual == a. May build the
        residual in `a`'s memory (`compress` passes a fresh tensor)."""
        raise NotImplementedError

    def decompress(self, payload: Payload) -> Tensor:
        out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.data.device)
        self.accumulate_into(out, payload.data)
        return out

    def accumulate_into(self, out: Tensor, data: Tensor) -> None:
        """out += decompress(data); for sparse methods this costs O(payload), not O(bucket)."""
        raise NotImplementedError

    def residual(self, key: str) -> Tensor | None:
        return self._memory.get(key)

    def _mask_velocity(self, key: str, idx: Tensor) -> None:
        """Momentum factor masking: momentum already sent must not be sent again."""
        u = self._velocity.get(key)
        if u is not None:
            u[idx] = 0

    # --- checkpoints: error feedback must survive a resume ---------------------------------
    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"name": self.name, "memory": cpu(self._memory), "velocity": cpu(self._velocity),
                "extra": self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        """Tensors come back on the CPU; they follow the bucket's device on first use."""
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds {state.get('name')!r} compression state, "
                             f"this run uses {self.name!r}")
        self._memory = dict(state["memory"])
        self._velocity = dict(state["velocity"])
        self._load_extra(state.get("extra") or {})

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, extra: dict) -> None:
        pass

    def report(self) -> dict:
        """Cumulative per-step numbers for heartbeat and summary (method extras included)."""
        return self.stats.snapshot().per_step()

    def _accumulate(self, g: Tensor, key: str) -> Tensor:
        """a = (momentum-corrected) g + residual: u = m*u + g; a = u + e."""
        m = self.momentum
        if m > 0:
            u = self._state_for(self._velocity, key, g)
            u = g.float().clone() if u is None else u.mul_(m).add_(g)
            self._velocity[key] = u
            g = u
        e = self._state_for(self._memory, key, g)
        a = g.float().clone() if e is None else g.float() + e
        if not self.dense and not bool(torch.isfinite(a).all()):
            # a NaN would sit in the residual for ever and silently stop this bucket's updates
            raise FloatingPointError(f"non-finite gradient in bucket {key!r}: {self.name} cannot "
                                     "compress it (lower the learning rate)")
        return a

    @staticmethod
    def _state_for(store: dict, key: str, g: Tensor) -> Tensor | None:
        t = store.get(key)
        if t is None:
            return None
        if t.numel() != g.numel():
            raise ValueError(f"bucket {key!r} changed size from {t.numel()} to {g.numel()}")
        if t.device != g.device:  # e.g. restored from a checkpoint on the CPU
            t = store[key] = t.to(g.device)
        return t

    # --- with torch.distributed ------------------------------------------------------------
    def reduce(self, bucket: Tensor, group, world: int, key: str) -> Tensor:
        """Average `bucket` over `group` (of `world` ranks) with compression and error feedback;
        a 1-rank group moves nothing, so nothing is compressed or counted."""
        if world <= 1:
            return bucket.detach().reshape(-1).float().clone()
        dev = bucket.device
        t0 = _now(dev)
        payload, _ = self.compress(bucket, key)
        t1 = _now(dev)
        parts, wire = self._exchange(payload, group)
        t2 = _now(dev)
        out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.data.device)
        for part in parts:  # a dense method's one all-reduced sum, else every rank's payload
            self.accumulate_into(out, part)
        out.mul_(1.0 / world)
        t3 = _now(dev)
        self.stats.record(key, dense=bucket.numel() * 4, sent=payload.nbytes, wire=wire,
                          ms=1000 * ((t1 - t0) + (t3 - t2)))
        return out

    def _exchange(self, payload: Payload, group) -> tuple[list[Tensor], int]:
        if not self.dense:
            return allgather_varlen(payload.data, group)
        dist.all_reduce(payload.data, group=group)
        return [payload.data], payload.nbytes
