"""Exchange payloads of different lengths without hanging.

Collectives need equal shapes on every rank, so: all_gather the lengths first, pad each payload
to the longest, all_gather the padded payloads, trim. Every rank runs the same two collectives
whatever its own length (an empty payload included), which is what keeps them in step.
Tensors stay on the payload's device (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def allgather_varlen(t: Tensor, group=None) -> tuple[list[Tensor], int]:
    """Gather a 1-D tensor of any length from every rank of `group` -> (one tensor per group rank,
    in group-rank order; bytes this rank put on the wire, length exchange and padding included).
    A 1-rank group runs no collective."""
    t = t.reshape(-1)
    n = group_size(group)
    if n == 1:
        return [t], 0
    size = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    wire = size.numel() * size.element_size()
    if longest == 0:
        return [t.new_empty(0) for _ in range(n)], wire
    padded = t.new_zeros(longest)
    padded[: t.numel()] = t
    bufs = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(bufs, padded, group=group)
    return [b[:m] for b, m in zip(bufs, lengths)], wire + longest * t.element_size()
