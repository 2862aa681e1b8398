"""Grouped aggregation (DSparse, our reading): AllReduce inside each updating set, Broadcast out.

For every group of the plan, in plan order:

* `allreduce` (the ranks that update exactly these units): after backward, the units' gradients
  are flattened into one bucket, averaged over the group through the compressor ("none": the
  plain DDP average) and copied back, so the members' optimizers take the same step and stay
  identical.
  Before each forward the units' buffers (BatchNorm statistics) are broadcast from the group's
  root, as `DistributedDataParallel(broadcast_buffers=True)` does from rank 0: with every rank
  updating everything this is exactly DDP.
* `broadcast`: every `sync_every` optimizer steps the root sends the units' parameters and
  buffers to the ranks that only run them forward.

Process groups are created once, in plan order, on every rank (torch requires every rank to
call `new_group`, members or not); a group spanning the whole world reuses the default group.
Every rank walks the groups in the same order, so the collectives form one global order and
cannot deadlock.

Bytes are accounted with a simple, documented model (what this rank puts on / takes off its link):
* all_reduce of B bytes over n ranks (ring): sent = received = 2(n-1)/n * B;
* compressed all_gather of a P-byte padded payload: sent = received = (n-1) * P;
* broadcast of B bytes (a pipelined chain, `chain.py`: root, then the receivers in rank order):
  every rank but the last sends B, every receiver receives B; the root's link carries B once,
  not once per receiver.
`dense` bytes are what uncompressed float32 all_reduces would have sent under the same model.
Per-step figures are totals over the steps so far, so they include the full syncs made before
each evaluation; the worker's 4-byte stop-agreement all_reduce is control traffic, not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsparse_cli.contract import JobSpec
from dsparse_cli.runtime.chain import chain_broadcast, chain_bytes, chain_order
from dsparse_cli.runtime.compress import Compressor, make_compressor
from dsparse_cli.runtime.models import UnitSpec, unit_buffers, unit_params


@dataclass
class Counters:
    ms: float = 0.0
    sent: float = 0.0
    recv: float = 0.0
    dense: float = 0.0
    ops: int = 0


@dataclass
class Group:
    id: int
    op: str
    ranks: list[int]
    root: int  # the receivers of a broadcast group are its ranks but the root
    units: list[int]
    pg: object = None           # None = the default (world) group
    member: bool = False
    params: list[nn.Parameter] = field(default_factory=list)
    buffers: list[Tensor] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ranks)


def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Flattening needs one dtype and device per bucket (BatchNorm has int64 counters)."""
    out: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        out.setdefault((t.dtype, t.device), []).append(t)
    return list(out.values())


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from `src`'s parameters and buffers (world group)."""
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for bucket in _by_dtype(tensors):
        flat = _flatten_dense_tensors(bucket)
        chain_broadcast(flat, chain_order(list(range(dist.get_world_size())), src), dist.get_rank())
        for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(v)


class GroupedAggregator:
    def __init__(self, plan: dict, rank: int, model: nn.Module, units: list[UnitSpec],
                 compressor: Compressor | None = None, sync_every: int | None = None,
                 device: torch.device | None = None, timeout_s: float = JobSpec.collective_timeout_s):
        self.rank, self.world = rank, dist.get_world_size()
        # Explicit: a subgroup would otherwise wait gloo's 30 minutes for a peer that is gone.
        self.timeout = timedelta(seconds=timeout_s)
        self.compressor = compressor or make_compressor(None)  # none = the plain DDP average
        self.sync_every = int(sync_every or plan.get("sync_every") or 1)
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {self.sync_every}")
        self.device = device
        self.groups = self._make_groups(plan, model, {u.index: u for u in units})
        self.totals = Counters()
        self.steps = 0

    # --- set-up ----------------------------------------------------------------------------
    def _make_groups(self, plan: dict, model: nn.Module, units: dict[int, UnitSpec]) -> list[Group]:
        groups = []
        for g in plan["groups"]:
            ranks = sorted(int(r) for r in g["ranks"])
            grp = Group(int(g["id"]), g["op"], ranks, int(g["root"]), [int(u) for u in g["units"]])
            if grp.op not in ("allreduce", "broadcast"):
                raise ValueError(f"plan group {grp.id}: unknown op {grp.op!r}")
            if len(ranks) > 1 and ranks != list(range(self.world)):
                grp.pg = dist.new_group(ranks=ranks, timeout=self.timeout)  # every rank, in plan order
            grp.member = self.rank in ranks
            if grp.member and len(ranks) > 1:
                mods = [units[u] for u in grp.units]
                grp.params = [p for u in mods for p in unit_params(model, u)]
                grp.buffers = [b for u in mods for b in unit_buffers(model, u)]
            groups.append(grp)
        return groups

    def my_groups(self, op: str) -> list[Group]:
        return [g for g in self.groups if g.op == op and g.member and g.size > 1]

    # --- the three points in a step --------------------------------------------------------
    def before_forward(self) -> None:
        """Buffers of jointly updated units from their group root (DDP broadcast_buffers)."""
        for g in self.my_groups("allreduce"):
            if g.buffers:
                self._broadcast(g, g.buffers)

    def reduce_gradients(self) -> None:
        """Average the gradients of each allreduce group this rank is in."""
        self.steps += 1
        for g in self.my_groups("allreduce"):
            self._reduce(g)

    def after_step(self, step: int) -> bool:
        """After optimizer step number `step` (0-based, global): broadcast every `sync_every`.
        -> whether a sync happened."""
        if (step + 1) % self.sync_every:
            return False
        self.sync_weights()
        return True

    def sync_weights(self) -> None:
        for g in self.my_groups("broadcast"):
            self._broadcast(g, [p.data for p in g.params] + g.buffers)

    def sync_all(self) -> None:
        """Every rank ends with the same full model (before eval, at the end)."""
        self.sync_weights()
        self.before_forward()

    # --- ops -------------------------------------------------------------------------------
    def _reduce(self, g: Group) -> None:
        for p in g.params:
            if p.grad is None:  # unused in this forward: contributes zero, like DDP
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in g.params]
        for i, bucket_grads in enumerate(_by_dtype(grads)):
            key = f"g{g.id}" if i == 0 else f"g{g.id}.{i}"
            _sync(self.device)
            t0 = time.perf_counter()
            flat = _flatten_dense_tensors(bucket_grads)
            before = self.compressor.stats.snapshot()
            avg = self.compressor.reduce(flat, g.pg, g.size, key).to(flat.dtype)
            for t, v in zip(bucket_grads, _unflatten_dense_tensors(avg, bucket_grads)):
                t.copy_(v)
            _sync(self.device)
            self._count_reduce(flat, g.size, before, 1000 * (time.perf_counter() - t0))

    def _broadcast(self, g: Group, tensors: list[Tensor]) -> None:
        for bucket in _by_dtype(tensors):
            _sync(self.device)
            t0 = time.perf_counter()
            flat = _flatten_dense_tensors(bucket)
            order = chain_order(g.ranks, g.root)
            chain_broadcast(flat, order, self.rank, group=g.pg)
            if self.rank != g.root:
                for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    t.copy_(v)
            _sync(self.device)
            sent, recv = chain_bytes(order, self.rank, flat.numel() * flat.element_size())
            self._count(1000 * (time.perf_counter() - t0), sent, recv, sent)

    # --- accounting ------------------------------------------------------------------------
    def _count_reduce(self, flat: Tensor, n: int, before, ms: float) -> None:
        ring = 2 * (n - 1) / n
        dense = ring * flat.numel() * 4
        delta = self.compressor.stats.snapshot().since(before)
        moved = ring * delta.sent_bytes if self.compressor.dense else (n - 1) * delta.wire_bytes
        self._count(ms, moved, moved, dense)

    def _count(self, ms: float, sent: float, recv: float, dense: float) -> None:
        t = self.totals
        t.ms += ms
        t.sent += sent
        t.recv += recv
        t.dense += dense
        t.ops += 1

    def report(self) -> dict:
        """Per-step averages over the steps so far (status.json / summary.json keys)."""
        n = max(self.steps, 1)
        t, snap = self.totals, self.compressor.stats.snapshot()
        return {"agg_ms_per_step": t.ms / n, "bytes_sent_per_step": t.sent / n, "bytes_recv_per_step": t.recv / n,
                "bytes_per_step": t.sent / n, "dense_bytes_per_step": t.dense / n,
                "compression_ratio": snap.ratio, "compress_ms_per_step": snap.compress_ms / n}

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Compression residuals (error feedback must survive a resume)."""
        return {"compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
