"""The chain broadcast (runtime/chain.py) against `dist.broadcast`, bit for bit, on real gloo
process groups (3-5 ranks on loopback), for odd sizes, several dtypes and chunk sizes, the whole
world and a subgroup, any root, and in the receiver order a plan gives."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsparse_cli.runtime.aggregate import GroupedAggregator
from dsparse_cli.runtime.chain import chain_broadcast, chain_bytes, chain_order
from dsparse_cli.runtime.models import build_model, units_from_plan

from _runtime_helpers import make_plan, run_ranks

SIZES = (1, 4099, 300_001)                    # odd, and larger than a chunk
DTYPES = (torch.float16, torch.int64)          # 2- and 8-byte elements; float32 crosses the chain in test_aggregate
CHUNKS = (4, 1000, 64 * 1024, 8 << 20)        # a chunk smaller than one element, odd, typical, all of it


def _payload(size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:   # every bit pattern matters: include -0.0, subnormals, inf, nan
        x = torch.randn(size, generator=g).to(dtype)
        specials = torch.tensor([-0.0, float("inf"), float("nan"), 1e-40], dtype=torch.float32).to(dtype)
        x[: min(size, 4)] = specials[: min(size, 4)]
        return x
    return torch.randint(-2**62, 2**62, (size,), generator=g, dtype=dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _compare(rank, world, ranks, root, sub=None):
    if sub:   # a subgroup of the world instead (every rank creates it, members or not)
        ranks, root = sub
    group = dist.new_group(ranks=ranks) if ranks != list(range(world)) else None
    if rank not in ranks:
        return
    order = chain_order(ranks, root)
    for size in SIZES:
        for dtype in DTYPES:
            for chunk in CHUNKS:
                if size * dtype.itemsize // chunk > 1000:
                    continue   # thousands of tiny messages: slow, and nothing new (size 1 splits an element)
                mine = _payload(size, dtype, seed=rank * 1000 + size)      # every rank starts different
                expected = mine.clone()
                dist.broadcast(expected, src=root, group=group)
                chain_broadcast(mine, order, rank, group=group, chunk_bytes=chunk)
                assert _same_bits(mine, expected), (rank, size, dtype, chunk)


@pytest.mark.parametrize("world,ranks,root,sub", [(3, [0, 1, 2], 0, None), (4, [0, 1, 2, 3], 2, ([0, 1, 3], 3)),
                                                  (5, [0, 1, 2, 3, 4], 4, None)])
def test_chain_broadcast_equals_dist_broadcast_bit_for_bit(world, ranks, root, sub):
    run_ranks(_compare, world, ranks, root, sub)


def test_the_roots_link_carries_the_payload_once():
    order = chain_order([0, 3, 1, 2], root=3)
    assert order == [3, 0, 1, 2]
    moved = {r: chain_bytes(order, r, 100) for r in order}
    assert moved == {3: (100, 0), 0: (100, 100), 1: (100, 100), 2: (0, 100)}
    assert chain_bytes([0, 1], 0, 100) == (100, 0)   # one receiver: the plain broadcast


def _plan_order(rank, world):
    """The plan's receivers [2, 1]: each rank receives from its predecessor in that order, and
    ends with the root's bits, as after dist.broadcast."""
    torch.manual_seed(rank)   # every rank starts from different weights
    model = build_model("tiny_cnn")
    plan = make_plan([[0, 1, 2, 3], [3], [3]])
    bcast = plan["groups"][1]
    assert bcast["op"] == "broadcast" and bcast["root"] == 0
    bcast["receivers"], bcast["ranks"] = [2, 1], [0, 2, 1]
    agg = GroupedAggregator(plan, rank, model, units_from_plan(plan))
    assert agg.groups[1].order == [0, 2, 1]
    state = [p.data for p in agg.groups[1].params] + agg.groups[1].buffers
    expected = [t.clone() for t in state]
    for t in expected:
        dist.broadcast(t, src=0)
    sources, recv = [], dist.recv

    def spy(t, src=None, **kw):   # chain.py calls dist.recv: record whom each rank hears from
        sources.append(src)
        return recv(t, src=src, **kw)

    dist.recv = spy
    try:
        agg.sync_weights()
        mine = _payload(4099, torch.float16, seed=rank)
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        chain_broadcast(mine, agg.groups[1].order, rank, chunk_bytes=1000)
    finally:
        dist.recv = recv
    assert all(_same_bits(t.reshape(-1), e.reshape(-1)) for t, e in zip(state, expected))
    assert _same_bits(mine, reference)
    before = {2: 0, 1: 2}.get(rank)   # the root receives nothing
    assert set(sources) == ({before} if rank else set()), sources


def test_the_plans_receiver_order_is_the_chain():
    assert chain_order([0, 1, 2, 3], 0, [3, 1, 2]) == [0, 3, 1, 2]
    assert chain_order([0, 1, 2, 3], 2, []) == chain_order([0, 1, 2, 3], 2) == [2, 0, 1, 3]
    with pytest.raises(ValueError, match="not the ranks"):
        chain_order([0, 1, 2], 0, [2])
    run_ranks(_plan_order, 3)
