"""BatchNorm statistics recomputed with the final weights at the end of a job (runtime/batchnorm.py):
exactly the batches' own statistics, everything else put back, the same on every rank (the ranks'
average), and a unit nobody trains keeps its statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _runtime_helpers import make_job, make_plan, run_ranks
from dsparse_cli.runtime.batchnorm import batchnorms, recompute_statistics
from dsparse_cli.runtime.data import batches_for
from dsparse_cli.runtime.models import unit_modules
from dsparse_cli.runtime.worker import Trainer

CPU = torch.device("cpu")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


def test_the_statistics_are_the_batches_own_and_everything_else_is_put_back():
    net = _net()
    net.train()
    net[5].eval()                        # a frozen unit's BatchNorm
    net[1].momentum = 0.0                # as set_train_mode leaves a unit trained elsewhere
    frozen = net[5].running_mean.clone(), net[5].running_var.clone()
    xs = [torch.randn(8, 3, 10, 10) * 3 + 1 for _ in range(5)]
    assert recompute_statistics(net, batchnorms([net[0], net[1]]), iter(xs), 0, CPU, world=1) == 0
    assert torch.equal(net[1].running_mean, torch.zeros(4))      # limit 0: nothing touched

    assert recompute_statistics(net, batchnorms([net[0], net[1]]), iter(xs), 3, CPU, world=1) == 3
    with torch.no_grad():
        outs = [net[0](x) for x in xs[:3]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5) and torch.allclose(net[1].running_var, var, atol=1e-5)
    assert (net[1].running_mean - 0).abs().max() > 0.05            # really moved from the reset values
    assert torch.equal(net[5].running_mean, frozen[0]) and torch.equal(net[5].running_var, frozen[1])
    assert [m.training for m in net] == [True, True, True, True, True, False] and net[1].momentum == 0.0


def test_no_batchnorm_is_a_no_op():
    net = nn.Sequential(nn.Linear(4, 4))
    assert recompute_statistics(net, batchnorms([net]), iter([torch.randn(2, 4)]), 8, CPU, world=1) == 0


def _job_end(rank, world, tmp):
    # units 1-3 trained (rank 0 all three, rank 1 the last two); unit 0 by nobody
    trainer = Trainer(make_plan([[1, 2, 3], [2, 3]]), make_job(f"{tmp}/w{rank}", max_steps=3, bn_batches=4),
                      rank, world)
    trainer.setup()
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trained = copy.deepcopy(trainer.model)   # replaced below by the weights the run ends with
    trainer.run()
    # this rank alone, from the final weights: what its own 4 batches give
    trained.load_state_dict(trainer.model.state_dict())
    bns = batchnorms(m for u in trainer.units if u.index in (1, 2, 3) for m in unit_modules(trained, u))
    batches = (x for x, _ in batches_for(trainer.data, rank, world, 0, trainer.job.seed, trainer.batch_size))
    recompute_statistics(trained, bns, batches, 4, CPU, world=1)
    torch.save({"init": init, "end": trainer.model.state_dict(), "alone": trained.state_dict()}, f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_every_rank_ends_with_the_ranks_average_and_a_frozen_unit_keeps_its_statistics(tmp_path):
    run_ranks(_job_end, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for unit in (1, 2):
        for stat in ("running_mean", "running_var"):
            k = f"features.{unit}.1.{stat}"
            assert torch.equal(r0["end"][k], r1["end"][k]), k
            assert torch.allclose(r0["end"][k], (r0["alone"][k] + r1["alone"][k]) / 2, atol=1e-5), k
            assert not torch.allclose(r0["alone"][k], r1["alone"][k]), k     # the ranks' batches differ
    for stat in ("running_mean", "running_var"):                             # unit 0: trained by nobody
        assert torch.equal(r0["end"][f"features.0.1.{stat}"], r0["init"][f"features.0.1.{stat}"])
