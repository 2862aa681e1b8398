"""Grouped AllReduce/Broadcast aggregation (dsparse_cli/runtime/aggregate.py) on real gloo groups.

Nested plan over 3 ranks of TinyCNN (units 0-2 conv blocks with BatchNorm, 3 classifier):
rank 0 updates all units, rank 1 units 2-3, rank 2 unit 3. Groups: allreduce{0,1,2}[3],
allreduce{0,1}[2] + broadcast 0->2 [2], broadcast 0->{1,2} [0,1].
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _runtime_helpers import make_groups, make_job, make_plan, run_ranks
from dsparse_cli.runtime.aggregate import GroupedAggregator
from dsparse_cli.runtime.models import build_model, split_units, unit_buffers, unit_params
from dsparse_cli.runtime.sparse import apply_plan
from dsparse_cli.runtime.worker import Trainer

pytestmark = pytest.mark.slow

NESTED = [[0, 1, 2, 3], [2, 3], [3]]


def test_make_groups_lays_out_the_nested_plan():
    groups = make_groups(NESTED, 4)
    assert [(g["op"], g["ranks"], g["units"]) for g in groups] == [
        ("allreduce", [0, 1, 2], [3]), ("allreduce", [0, 1], [2]), ("broadcast", [0, 2], [2]),
        ("broadcast", [0, 1, 2], [0, 1])]


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _nested(rank, world, tmp):
    out = {}
    for sync_every in (1, 2):
        plan = make_plan(NESTED, sync_every=sync_every)
        job = make_job(f"{tmp}/s{sync_every}/w{rank}", max_steps=4, sync_every=sync_every, seed=1)
        trainer = Trainer(plan, job, rank, world)
        snaps = []
        trainer.on_step = lambda t: snaps.append(_flat_params(t.model))
        torch.manual_seed(1)
        init = _flat_params(build_model("tiny_cnn"))
        summary = trainer.run()
        trainer.agg.sync_all()
        full = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        out[sync_every] = {"snaps": snaps, "init": init, "summary": summary, "synced": full,
                           "requires_grad": [p.requires_grad for p in trainer.model.parameters()]}
    torch.save(out, f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nested")
    run_ranks(_nested, 3, str(tmp))
    return [torch.load(tmp / f"rank{r}.pt") for r in range(3)]


def test_nested_plan_keeps_ranks_identical(nested):
    res = nested

    exact = [r[1] for r in res]  # sync_every = 1: identical weights after every step
    for step in range(4):
        for r in (1, 2):
            assert torch.equal(exact[0]["snaps"][step], exact[r]["snaps"][step]), (step, r)
        assert (exact[0]["snaps"][step] - exact[0]["init"]).abs().max() > 1e-4  # and it trains

    stale = [r[2] for r in res]  # sync_every = 2: receivers lag between syncs, agree after
    for step in (0, 2):  # after steps 1 and 3: not yet broadcast
        assert not torch.equal(stale[0]["snaps"][step], stale[2]["snaps"][step])
    for step in (1, 3):
        assert torch.equal(stale[0]["snaps"][step], stale[2]["snaps"][step])
        assert torch.equal(stale[0]["snaps"][step], stale[1]["snaps"][step])

    for r in res:  # after sync_all every rank holds the same full model, buffers included
        for k, v in r[1]["synced"].items():
            assert torch.equal(v, res[0][1]["synced"][k]), k
    assert sum(res[2][1]["requires_grad"]) == 2  # rank 2: classifier weight + bias only


def test_byte_accounting_follows_the_documented_model(nested):
    res = [r[1]["summary"] for r in nested]
    model = build_model("tiny_cnn")
    units = split_units(model, "tiny_cnn")
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    p = [nbytes(unit_params(model, u)) for u in units]
    state = [p[i] + nbytes(unit_buffers(model, u)) for i, u in enumerate(units)]
    buf2 = nbytes(unit_buffers(model, units[2]))
    ring3, ring2 = 2 * 2 / 3, 2 * 1 / 2
    # per step (eval off, no sync_all inside run): allreduce grads, buffers before forward,
    # broadcasts after each step (sync_every = 1); units 0-1 go down the chain 0 -> 1 -> 2, so
    # rank 0 sends them once and rank 1 relays them
    assert res[2]["bytes_sent_per_step"] == pytest.approx(ring3 * p[3])
    assert res[2]["bytes_recv_per_step"] == pytest.approx(ring3 * p[3] + state[2] + state[0] + state[1])
    assert res[1]["bytes_sent_per_step"] == pytest.approx(ring3 * p[3] + ring2 * p[2] + state[0] + state[1])
    assert res[1]["bytes_recv_per_step"] == pytest.approx(ring3 * p[3] + ring2 * p[2] + buf2 + state[0] + state[1])
    assert res[0]["bytes_sent_per_step"] == pytest.approx(
        ring3 * p[3] + ring2 * p[2] + buf2 + state[2] + state[0] + state[1])
    for r in res:
        assert r["bytes_per_step"] == r["bytes_sent_per_step"] and r["agg_ms_per_step"] > 0
        assert 0 < r["agg_ms_median"] <= r["agg_ms_p90"]   # the spread over each step's own figure


def _builtin_average(rank, world, tmp):
    """No compressor given (the "none" compressor): gradients become the exact mean over the group."""
    torch.manual_seed(0)
    model = build_model("tiny_cnn")
    plan = make_plan(NESTED)
    units = split_units(model, "tiny_cnn")
    agg = GroupedAggregator(plan, rank, model, units, compressor=None)
    torch.manual_seed(100 + rank)  # different gradients per rank
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    mine = {n: q.grad.clone() for n, q in model.named_parameters()}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    agg.reduce_gradients()
    cls = [n for n, _ in model.named_parameters() if n.startswith("classifier")]
    blk2 = [n for n, _ in model.named_parameters() if n.startswith("features.2")]
    got = dict(model.named_parameters())
    for n in cls:  # unit 3: mean over all three ranks
        assert torch.allclose(got[n].grad, sum(g[n] for g in gathered) / 3, atol=1e-6), n
    for n in blk2:  # unit 2: mean over ranks 0 and 1 only; rank 2 is not in that group
        expect = (gathered[0][n] + gathered[1][n]) / 2 if rank < 2 else mine[n]
        assert torch.allclose(got[n].grad, expect, atol=1e-6), n
    assert agg.report()["bytes_sent_per_step"] > 0


def test_builtin_dense_path_averages_inside_groups(tmp_path):
    run_ranks(_builtin_average, 3, str(tmp_path))


def _overlapped(rank, world, tmp):
    """Buckets of one parameter each (32 bytes): the nested plan's two allreduce groups make five
    buckets on ranks 0-1 and two on rank 2, all launched from the hooks before backward ends."""
    torch.manual_seed(0)
    model = build_model("tiny_cnn")
    units = split_units(model, "tiny_cnn")
    apply_plan(model, units, NESTED[rank])
    agg = GroupedAggregator(make_plan(NESTED), rank, model, units, bucket_bytes=32)
    buckets = agg.overlap.buckets
    assert len(buckets) == (5 if rank < 2 else 2)
    torch.manual_seed(100 + rank)  # different data, so different gradients per rank
    x, y = torch.randn(8, 3, 32, 32, requires_grad=True), torch.randint(0, 10, (8,))
    during = []  # x's gradient comes last in backward: every bucket is on the wire by then
    x.register_hook(lambda g: during.append([b.work is not None for b in buckets]))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert during == [[True] * len(buckets)]
    mine = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    agg.reduce_gradients()
    for n, q in model.named_parameters():
        if n.startswith("classifier"):
            assert torch.allclose(q.grad, sum(g[n] for g in gathered) / 3, atol=1e-6), n
        elif n.startswith("features.2") and rank < 2:
            assert torch.allclose(q.grad, (gathered[0][n] + gathered[1][n]) / 2, atol=1e-6), n
    assert agg.report()["bytes_sent_per_step"] == pytest.approx(2 * 2 / 3 * 1320 + (18688 if rank < 2 else 0))

    model.zero_grad(set_to_none=True)  # no backward: nothing fired, unused gradients count as zeros
    if rank == 0:
        model.classifier.bias.grad = torch.ones(10)
    agg.reduce_gradients()
    assert torch.equal(model.classifier.weight.grad, torch.zeros(10, 32))
    assert torch.allclose(model.classifier.bias.grad, torch.full((10,), 1 / 3))

    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="after its bucket was all-reduced"):  # never reduce twice
        torch.nn.functional.cross_entropy(model(x), y).backward()
    agg.reduce_gradients()  # the step completes: every rank launched and waits for the same buckets


def test_dense_average_overlaps_backward_in_buckets(tmp_path):
    run_ranks(_overlapped, 3, str(tmp_path))


def _group_intervals(rank, world, tmp):
    """Broadcast group 2 (unit 2, 0 -> 2) has its own sync_every 2; group 3 (units 0-1, 0 -> 1, 2)
    takes the plan's 1."""
    torch.manual_seed(rank)
    model = build_model("tiny_cnn")
    units = split_units(model, "tiny_cnn")
    plan = make_plan(NESTED)
    plan["groups"][2]["sync_every"] = 2
    agg = GroupedAggregator(plan, rank, model, units)
    assert [g.sync_every for g in agg.groups if g.op == "broadcast"] == [2, 1]
    first = lambda u: unit_params(model, units[u])[0].view(-1)[0].item()  # noqa: E731
    own_unit2 = first(2)
    seen = []
    for step in range(4):
        if rank == 0:  # the root's weights move every step
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(step + 1)
        seen.append((agg.after_step(step), first(0), first(2)))
    if rank == 2:  # unit 0 every step, unit 2 after steps 1 and 3 only
        assert seen == [(True, 1, own_unit2), (True, 2, 2), (True, 3, 2), (True, 4, 4)]
    if rank == 1:  # unit 2 is its own (it updates it); units 0-1 come every step
        assert seen == [(True, s + 1, own_unit2) for s in range(4)]
    if rank == 0:
        with torch.no_grad():
            model.features[2][0].weight.fill_(5)
    agg.sync_weights()  # before eval and at the end: every group, due or not
    if rank == 2:
        assert first(2) == 5


def test_broadcast_groups_keep_their_own_interval(tmp_path):
    run_ranks(_group_intervals, 3, str(tmp_path))
