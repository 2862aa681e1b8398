"""Equivalence is a test, not a belief: every rank updating every unit with no compression gives
the weights of DistributedDataParallel on the same data and seed.

Both runs happen in the same two gloo processes: first the real worker (`Trainer.run`), then a
plain DDP loop over the same `batches_for` shard. TinyCNN has BatchNorm, so the buffers are
compared too: the worker broadcasts jointly-updated units' buffers from the group root before
each forward, which is what DDP(broadcast_buffers=True) does from rank 0. The gradients go in
buckets of 1 KiB here (TinyCNN would fit one bucket of the default size), so several all_reduces
overlap backward, as DDP's do. As a control, each rank also trains alone on its shard: that must
*not* match (the aggregation is what makes it match).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _runtime_helpers import make_job, make_plan, run_ranks
from dsparse_cli.runtime import aggregate
from dsparse_cli.runtime.data import batches_for, load_dataset
from dsparse_cli.runtime.models import build_model
from dsparse_cli.runtime.worker import Trainer

pytestmark = pytest.mark.slow

STEPS, SEED, LR, MOMENTUM, WD = 3, 5, 0.1, 0.9, 1e-4


def _reference(rank, world, ddp: bool) -> dict:
    torch.manual_seed(SEED)
    model = build_model("tiny_cnn")
    net = DDP(model) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    ds = load_dataset("digits")
    model.train()
    for step, (x, y) in enumerate(batches_for(ds, rank, world, epoch=0, seed=SEED, batch_size=16)):
        if step == STEPS:
            break
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ranks(rank, world, tmp):
    aggregate.BUCKET_BYTES = 1024  # this process only: the Trainer builds its aggregator with it
    torch.manual_seed(SEED)
    init = {k: v.clone() for k, v in build_model("tiny_cnn").state_dict().items()}
    plan = make_plan([[0, 1, 2, 3]] * world)
    job = make_job(f"{tmp}/w{rank}", max_steps=STEPS, seed=SEED, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                   lr_schedule="constant")
    trainer = Trainer(plan, job, rank, world)
    trainer.run()
    ours = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"init": init, "ours": ours, "buckets": len(trainer.agg.overlap.buckets),
                "ddp": _reference(rank, world, ddp=True), "alone": _reference(rank, world, ddp=False)},
               f"{tmp}/rank{rank}.pt")


def test_all_units_everywhere_equals_ddp(tmp_path):
    world = 2
    run_ranks(_ranks, world, str(tmp_path))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in res:
        assert r["buckets"] == 4  # 1320, 18688, 4736 and 928 bytes, last units first
        assert r["ours"].keys() == r["ddp"].keys()
        for k in r["ours"]:
            assert torch.allclose(r["ours"][k].float(), r["ddp"][k].float(), atol=1e-5, rtol=0), k
        # it trained: weights and BatchNorm statistics moved
        assert (r["ours"]["classifier.weight"] - r["init"]["classifier.weight"]).abs().max() > 1e-3
        assert (r["ours"]["features.0.1.running_mean"] - r["init"]["features.0.1.running_mean"]).abs().max() > 1e-3
        assert int(r["ours"]["features.0.1.num_batches_tracked"]) == STEPS
        # control: a rank training alone on its shard ends elsewhere
        assert (r["alone"]["classifier.weight"] - r["ddp"]["classifier.weight"]).abs().max() > 1e-4
    for k in res[0]["ours"]:
        if "running" not in k and "num_batches" not in k:  # parameters identical across ranks
            assert torch.allclose(res[0]["ours"][k], res[1]["ours"][k], atol=1e-6, rtol=0), k
