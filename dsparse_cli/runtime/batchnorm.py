"""BatchNorm statistics recomputed from the weights before the model is scored and handed back.

Running statistics are an exponential average (momentum 0.1) over the whole run. When the weights
moved fast (a short run, from scratch) they describe earlier models than the last one, and eval
mode scores at chance although the training loss fell: 7 % in eval mode against 93 % with the
statistics recomputed, same weights (BENCHMARKS.md, the uniform 7-board run from scratch). As
`torch.optim.swa_utils.update_bn` does, each rank runs a few of its training batches forward with
the statistics reset and averaged over those batches; then the ranks' figures are averaged, so every
rank holds the same. Training never reads these statistics (a trained unit's BatchNorm normalises
with batch statistics on every board), so recomputing them at each evaluation changes no weight.
Only units that some board trains are recomputed: a unit nobody trains keeps the statistics its
weights came with.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_statistics(model: nn.Module, bns: list[_BatchNorm], batches: Iterable[torch.Tensor], limit: int,
                         device: torch.device, world: int, group=None) -> int:
    """Over at most `limit` of `batches`; every rank calls this with the same `bns` and `limit` (a
    collective). -> the batches run here; 0 (nothing changed) without BatchNorm or with limit 0.
    Modes and momentums are put back as they were."""
    if not bns or limit < 1:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momentums = [m.momentum for m in bns]
    model.eval()   # dropout off; only the statistics being recomputed see batch statistics
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # a plain average over the batches below
        m.train()
    n = 0
    for x in islice(batches, limit):
        model(x.to(device))
        n += 1
    stats = [t for m in bns for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.reshape(-1) for t in stats])
    if world > 1:
        dist.all_reduce(flat, group=group)
        flat /= world
    offset = 0
    for t in stats:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    for m, training in modes:
        m.training = training
    for m, momentum in zip(bns, momentums):
        m.momentum = momentum
    return n
