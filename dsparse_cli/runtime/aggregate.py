"""Grouped aggregation (DSparse, our reading): AllReduce inside each updating set, Broadcast out.

For every group of the plan, in plan order:

* `allreduce` (the ranks that update exactly these units): the units' gradients are averaged
  over the group, so the members' optimizers take the same step and stay identical.
  With no compression ("none", the plain DDP average) this overlaps backward as
  `DistributedDataParallel` does: the gradients go in buckets of about `BUCKET_BYTES`, and a
  bucket's async all_reduce starts from a gradient hook as soon as its last gradient arrived;
  `reduce_gradients` (after backward) then only waits and copies back. A compressor instead
  takes each group's gradients as one flat bucket after backward (see `_reduce`).
  Before each forward the units' buffers (BatchNorm statistics) are broadcast from the group's
  root, as `DistributedDataParallel(broadcast_buffers=True)` does from rank 0: with every rank
  updating everything this is exactly DDP.
* `broadcast`: every `sync_every` optimizer steps (the job's if `train --sync-every` gave one,
  else the group's own key, else the plan's) the root sends the units' parameters and buffers
  to the ranks that only run them forward, down a chain in the plan's `receivers` order.

Process groups are created once, in plan order, on every rank (torch requires every rank to
call `new_group`, members or not); a group spanning the whole world reuses the default group.
Every rank walks the groups in the same order, so the blocking collectives form one global order
and cannot deadlock. The overlapped buckets keep that property: every rank sorts all its buckets
into one order that is the same everywhere (reverse model order of their parameters, the order
backward makes gradients), and a bucket launches only when it and every bucket before it are
ready (DDP's rule), so each process group sees its all_reduces issued in the same order on
every member, whatever order the hooks fire in; a rank launches all its buckets before it waits
on any.

Bytes are accounted with a simple, documented model (what this rank puts on / takes off its link):
* all_reduce of B bytes over n ranks (ring): sent = received = 2(n-1)/n * B;
* compressed all_gather of a P-byte padded payload: sent = received = (n-1) * P;
* broadcast of B bytes (a pipelined chain, `chain.py`: root, then the receivers in the plan's
  order): every rank but the last sends B, every receiver receives B; the root's link carries B
  once, not once per receiver.
`dense` bytes are what uncompressed float32 all_reduces would have sent under the same model.
Per-step figures are totals over the steps so far, so they include the full syncs made before
each evaluation; the worker's 4-byte stop-agreement all_reduce is control traffic, not counted.
`agg_ms` is the time aggregation held the step up: broadcasts, and for gradients the time after
backward until they are averaged plus, when overlapped, the time spent in the hooks.
"""

from __future__ import annotations

import statistics
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

# DDP's default is 25 MiB, sized for datacenter links where that takes milliseconds; on an edge
# board's 0.1-1 Gbit/s link it takes 0.2-2 s and most edge models (MobileNetV2 8.5 MiB,
# ResNet-18 43 MiB) would be one or two buckets: no overlap. 1 MiB (DDP's first bucket) costs
# 8-80 ms on such a link, against a few ms of fixed cost per all_reduce, and bounds the part
# that cannot overlap (the last bucket, the first layers' gradients) to about that.
BUCKET_BYTES = 1 << 20


@dataclass
class Counters:
    ms: float = 0.0
    sent: float = 0.0
    recv: float = 0.0
    dense: float = 0.0


@dataclass
class Group:
    id: int
    op: str
    ranks: list[int]
    root: int  # the receivers of a broadcast group are its ranks but the root
    units: list[int]
    order: list[int] = field(default_factory=list)  # the broadcast chain: root, then receivers
    sync_every: int = 1         # broadcast interval in optimizer steps
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


def _sync_compute(device: torch.device | None) -> None:
    """Wait for backward's kernels but not for collectives in flight on their own streams,
    so the time after it is what the step waits for aggregation."""
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _interval(value, what: str) -> int:
    every = int(value)
    if every < 1:
        raise ValueError(f"{what} must be at least 1, got {every}")
    return every


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from `src`'s parameters and buffers (world group)."""
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for bucket in _by_dtype(tensors):
        flat = _flatten_dense_tensors(bucket)
        chain_broadcast(flat, chain_order(list(range(dist.get_world_size())), src), dist.get_rank())
        for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(v)


@dataclass(eq=False)
class Bucket:
    """Gradients of one group all-reduced together, adjacent in reverse model order."""
    group: Group
    params: list[nn.Parameter]
    key: str = ""
    ready: set = field(default_factory=set)   # ids of the params whose gradient arrived this step
    flat: Tensor | None = None                 # launched: the scaled gradients being summed
    work: object = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def full(self) -> bool:
        return len(self.ready) == len(self.params)


def _make_buckets(groups: list[Group], model: nn.Module, cap: int) -> list[Bucket]:
    """Each group's parameters in reverse model order, cut into buckets of about `cap` bytes
    (one dtype and device each; a bucket closes once it reaches `cap`, as in DDP), then all
    buckets in one order by their first parameter: the same order on every rank."""
    pos = {id(p): i for i, p in enumerate(model.parameters())}
    buckets = []
    for g in groups:
        mine: list[Bucket] = []
        size = 0
        for p in sorted(g.params, key=lambda q: -pos[id(q)]):
            cur = mine[-1].params if mine else []
            if not cur or size >= cap or (p.dtype, p.device) != (cur[0].dtype, cur[0].device):
                mine.append(Bucket(g, [], key=f"g{g.id}.b{len(mine)}"))
                size = 0
            mine[-1].params.append(p)
            size += p.numel() * p.element_size()
        buckets += mine
    return sorted(buckets, key=lambda b: -pos[id(b.params[0])])


class OverlappedReduce:
    """The plain average, overlapped with backward: a gradient hook marks its parameter ready and
    launches, in bucket order, every bucket that is complete (async all_reduce of the gradients
    scaled by 1/n first, as DDP and the "none" compressor do); `finish` completes the step."""

    def __init__(self, groups: list[Group], model: nn.Module, bucket_bytes: int):
        self.buckets = _make_buckets(groups, model, bucket_bytes)
        self.launched = 0      # buckets launched this step: always the first ones
        self.hook_ms = 0.0     # time spent in the hooks this step
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for b in self.buckets:
            for p in b.params:
                if p.requires_grad:  # a frozen one never fires: its bucket launches in finish
                    p.register_post_accumulate_grad_hook(self._arrived)

    def _arrived(self, p: nn.Parameter) -> None:
        t0 = time.perf_counter()
        b = self._bucket_of[id(p)]
        if b.work is not None:  # a second backward before reduce_gradients: never reduce twice
            raise RuntimeError("a gradient arrived after its bucket was all-reduced; "
                               "run one backward per reduce_gradients")
        b.ready.add(id(p))
        while self.launched < len(self.buckets) and self.buckets[self.launched].full:
            self._launch(self.buckets[self.launched])
        self.hook_ms += 1000 * (time.perf_counter() - t0)

    def _launch(self, b: Bucket) -> None:
        grads = [p.grad for p in b.params]
        b.flat = _flatten_dense_tensors(grads).float().mul(1.0 / b.group.size)
        b.work = dist.all_reduce(b.flat, group=b.group.pg, async_op=True)
        self.launched += 1

    def finish(self) -> float:
        """After backward: launch the buckets that did not fire (a parameter unused in this
        forward contributes zeros, like DDP), wait for all, copy the averages back, reset for the
        next step. -> the hook time of this step, in ms."""
        for b in self.buckets[self.launched:]:
            for p in b.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._launch(b)
        for b in self.buckets:
            b.work.wait()
            grads = [p.grad for p in b.params]
            for t, v in zip(grads, _unflatten_dense_tensors(b.flat, grads)):
                t.copy_(v)
            b.ready.clear()
            b.flat = b.work = None
        hook_ms, self.hook_ms, self.launched = self.hook_ms, 0.0, 0
        return hook_ms


class GroupedAggregator:
    def __init__(self, plan: dict, rank: int, model: nn.Module, units: list[UnitSpec],
                 compressor: Compressor | None = None, sync_every: int | None = None,
                 device: torch.device | None = None, timeout_s: float = JobSpec.collective_timeout_s,
                 bucket_bytes: int | None = None):
        self.rank, self.world = rank, dist.get_world_size()
        # Explicit: a subgroup would otherwise wait gloo's 30 minutes for a peer that is gone.
        self.timeout = timedelta(seconds=timeout_s)
        self.compressor = compressor or make_compressor(None)  # none = the plain DDP average
        self.sync_every = _interval(sync_every or plan.get("sync_every") or 1, "sync_every")
        self.device = device
        self.groups = self._make_groups(plan, model, {u.index: u for u in units}, sync_every)
        # Compressors keep per-group residuals and topk/pbgc learn their payload size only by
        # compressing: they reduce each group as one bucket after backward (`_reduce`).
        self.overlap = (OverlappedReduce(self.my_groups("allreduce"), model, bucket_bytes or BUCKET_BYTES)
                        if self.compressor.name == "none" else None)
        self.totals = Counters()
        self.steps = 0
        self.step_agg_ms: list[float] = []   # each step's own, for the median and p90
        self._step_start_ms = 0.0

    # --- set-up ----------------------------------------------------------------------------
    def _make_groups(self, plan: dict, model: nn.Module, units: dict[int, UnitSpec],
                     override: int | None) -> list[Group]:
        groups = []
        for g in plan["groups"]:
            ranks, root = sorted(int(r) for r in g["ranks"]), int(g["root"])
            every = override or g.get("sync_every")  # `train --sync-every`, else the group's own, else the plan's
            every = self.sync_every if every is None else _interval(every, f"plan group {g['id']} sync_every")
            grp = Group(int(g["id"]), g["op"], ranks, root, [int(u) for u in g["units"]],
                        order=chain_order(ranks, root, g.get("receivers")), sync_every=every)
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
        self._step_start_ms = self.totals.ms
        for g in self.my_groups("allreduce"):
            if g.buffers:
                self._broadcast(g, g.buffers)

    def reduce_gradients(self) -> None:
        """Average the gradients of each allreduce group this rank is in (after backward, once
        per step; the overlapped buckets have been on the wire since their hooks fired)."""
        self.steps += 1
        if self.overlap is not None:
            self._finish_overlap()
            return
        for g in self.my_groups("allreduce"):
            self._reduce(g)

    def after_step(self, step: int) -> bool:
        """After optimizer step number `step` (0-based, global): broadcast each group whose
        `sync_every` ends here. -> whether any group synced."""
        due = [g for g in self.my_groups("broadcast") if (step + 1) % g.sync_every == 0]
        for g in due:
            self._sync_group(g)
        self.step_agg_ms.append(self.totals.ms - self._step_start_ms)
        return bool(due)

    def sync_weights(self) -> None:
        """Every broadcast group, due or not."""
        for g in self.my_groups("broadcast"):
            self._sync_group(g)

    def sync_all(self) -> None:
        """Every rank ends with the same full model (before eval, at the end)."""
        self.sync_weights()
        self.before_forward()

    # --- ops -------------------------------------------------------------------------------
    def _finish_overlap(self) -> None:
        _sync_compute(self.device)
        t0 = time.perf_counter()
        hook_ms = self.overlap.finish()
        _sync(self.device)
        ms = hook_ms + 1000 * (time.perf_counter() - t0)
        for b in self.overlap.buckets:  # counted as the "none" compressor counts its all_reduce
            before, nbytes = self.compressor.stats.snapshot(), 4 * b.numel
            self.compressor.stats.record(b.key, dense=nbytes, sent=nbytes, wire=nbytes, ms=0.0)
            self._count_reduce(b.numel, b.group.size, before, 0.0)
        self.totals.ms += ms

    def _sync_group(self, g: Group) -> None:
        self._broadcast(g, [p.data for p in g.params] + g.buffers)

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
            self._count_reduce(flat.numel(), g.size, before, 1000 * (time.perf_counter() - t0))

    def _broadcast(self, g: Group, tensors: list[Tensor]) -> None:
        for bucket in _by_dtype(tensors):
            _sync(self.device)
            t0 = time.perf_counter()
            flat = _flatten_dense_tensors(bucket)
            chain_broadcast(flat, g.order, self.rank, group=g.pg)
            if self.rank != g.root:
                for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    t.copy_(v)
            _sync(self.device)
            sent, recv = chain_bytes(g.order, self.rank, flat.numel() * flat.element_size())
            self._count(1000 * (time.perf_counter() - t0), sent, recv, sent)

    # --- accounting ------------------------------------------------------------------------
    def _count_reduce(self, numel: int, n: int, before, ms: float) -> None:
        ring = 2 * (n - 1) / n
        dense = ring * numel * 4
        delta = self.compressor.stats.snapshot().since(before)
        moved = ring * delta.sent_bytes if self.compressor.dense else (n - 1) * delta.wire_bytes
        self._count(ms, moved, moved, dense)

    def _count(self, ms: float, sent: float, recv: float, dense: float) -> None:
        t = self.totals
        t.ms += ms
        t.sent += sent
        t.recv += recv
        t.dense += dense

    def report(self) -> dict:
        """Per-step averages over the steps so far (status.json / summary.json keys); agg_ms is
        the time aggregation held the step up (see the module's docstring)."""
        n = max(self.steps, 1)
        t, snap = self.totals, self.compressor.stats.snapshot()
        cuts = (statistics.quantiles(self.step_agg_ms, n=10, method="inclusive") if len(self.step_agg_ms) > 1
                else [None] * 9)
        return {"agg_ms_per_step": t.ms / n, "agg_ms_median": cuts[4], "agg_ms_p90": cuts[8],
                "bytes_sent_per_step": t.sent / n, "bytes_recv_per_step": t.recv / n,
                "bytes_per_step": t.sent / n, "dense_bytes_per_step": t.dense / n,
                "compression_ratio": snap.ratio, "compress_ms_per_step": snap.compress_ms / n}

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Compression residuals (error feedback must survive a resume)."""
        return {"compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
