"""Real 3-rank gloo groups on loopback: unequal payloads, empty ones, sub-groups, all methods."""

import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsparse_cli.runtime.compress import make_compressor
from dsparse_cli.runtime.compress.exchange import allgather_varlen, group_size

WORLD = 3
SPECS = [{"name": "none"}, {"name": "fp16"}, {"name": "topk", "momentum": 0},
         {"name": "pbgc", "momentum": 0}, {"name": "topk"}, {"name": "pbgc"}]


def _gather_dense(t, group=None):
    out = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def _check_varlen(rank):
    lengths = [0, 5, 17]
    mine = torch.arange(lengths[rank], dtype=torch.float32) + 100 * rank
    parts, wire = allgather_varlen(mine)
    assert [p.numel() for p in parts] == lengths
    for r, p in enumerate(parts):
        assert torch.equal(p, torch.arange(lengths[r], dtype=torch.float32) + 100 * r)
    assert wire == 8 + 17 * 4  # the length, then this rank's padded payload
    # bytes of any length, including all empty
    b = torch.full((rank * 3,), rank, dtype=torch.uint8)
    assert [p.tolist() for p in allgather_varlen(b)[0]] == [[], [1] * 3, [2] * 6]
    empty, _ = allgather_varlen(torch.empty(0, dtype=torch.uint8))
    assert [p.numel() for p in empty] == [0, 0, 0]


def _check_groups(rank, pair, solo):
    if rank in (0, 2):  # only members call collectives on a sub-group
        parts, _ = allgather_varlen(torch.full((rank + 1,), float(rank)), group=pair)
        assert [p.tolist() for p in parts] == [[0.0], [2.0, 2.0, 2.0]]
    if rank == 1:  # a 1-rank group: no collective at all
        parts, wire = allgather_varlen(torch.ones(4), group=solo)
        assert len(parts) == 1 and wire == 0


def _bucket(rank, step, n=6000):
    """Rank 0 dense, rank 1 mostly zeros, rank 2 all zeros: payload sizes differ."""
    gen = torch.Generator().manual_seed(10 * step + rank)
    g = torch.randn(n, generator=gen)
    if rank == 1:
        g[torch.rand(n, generator=gen) > 0.05] = 0
    if rank == 2:
        g.zero_()
    return g


def _check_reduce(rank, spec, group=None, world=WORLD):
    c = make_compressor(spec)
    sizes = []
    for step in range(4):
        g = _bucket(rank, step)
        e = c.residual("b")
        out = c.reduce(g, group, world, "b")
        sizes.append(c.stats.sent_bytes)
        # every member ends with the same average ...
        assert all(torch.equal(out, o) for o in _gather_dense(out, group))
        # ... the average of what each member sent (its input minus what it held back)
        if spec["name"] == "none":
            sent = g
        elif c.momentum == 0:
            sent = g + (e if e is not None else 0) - c.residual("b")
        else:
            continue
        expected = torch.stack(_gather_dense(sent, group)).mean(0)
        tol = 4e-3 if spec["name"] == "fp16" else 1e-6  # fp16 also sums in half precision
        assert torch.allclose(out, expected, atol=tol), spec
    all_sent = _gather_dense(torch.tensor([c.stats.sent_bytes]), group)
    if not c.dense:
        assert len({int(s) for s in all_sent}) == world  # payload sizes really differed
    assert c.stats.steps == 4 and c.stats.dense_bytes == 4 * 4 * 6000
    return c.stats.ratio


def _worker(rank, init_file):
    torch.set_num_threads(1)  # three ranks share a small box
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 2])  # every rank creates every group, in the same order
        solo = dist.new_group([1])
        _check_varlen(rank)
        _check_groups(rank, pair, solo)
        for spec in SPECS:
            _check_reduce(rank, spec)
        if rank in (0, 2):
            _check_reduce(rank, {"name": "pbgc"}, group=pair, world=2)
        dist.barrier()
        # torch.optim would pull in torch._dynamo (seconds and memory on a Pi): pbgc's
        # regressor trains without it; a fresh process is the place to check that
        assert "torch._dynamo" not in sys.modules
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_three_gloo_ranks_with_unequal_and_empty_payloads(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
