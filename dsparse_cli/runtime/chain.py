"""A broadcast that does not fan out from one link: a pipelined chain on point-to-point ops.

`dist.broadcast` in gloo sends the whole payload from the root to every receiver in turn, so the
root's link carries (N-1)·B bytes and every step waits on it. Here the ranks form a chain: the
root first, then the receivers in the plan's order (the planner puts the fastest link first,
since the last rank only receives; ascending ranks when the plan gives no order). The payload is
cut into chunks and each rank receives a chunk from its predecessor and forwards it to its
successor while it receives the next one. Every link carries about B bytes once, and the time is
about (B + (N-2)·chunk) / rate instead of (N-1)·B / rate. The result is bit-identical to
`dist.broadcast`: chunks are copied, never combined. With a single receiver it is
`dist.broadcast` (the same bytes on the same link).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

CHUNK_BYTES = 256 * 1024   # small enough to fill the pipe quickly, large enough to keep gloo busy


def chain_order(ranks: list[int], root: int, receivers: list[int] | None = None) -> list[int]:
    """The chain: the root, then `receivers` as given, or the other ranks in ascending order.
    Every rank must compute the same order, so a `receivers` that is not exactly the other
    ranks is refused rather than guessed at."""
    others = sorted(r for r in ranks if r != root)
    if not receivers:
        return [root] + others
    order = [root] + [int(r) for r in receivers]
    if sorted(order[1:]) != others:
        raise ValueError(f"chain receivers {list(receivers)} are not the ranks {others} other than root {root}")
    return order


def chain_broadcast(flat: Tensor, order: list[int], rank: int, group=None, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Broadcast the contiguous `flat` from `order[0]` to every rank of `order`, in place.
    Every rank of `order` calls it with the same order and a tensor of the same size and dtype
    (global ranks, as `dist.send`/`recv` take them with a subgroup)."""
    if len(order) <= 2:
        dist.broadcast(flat, src=order[0], group=group)
        return
    pos = order.index(rank)
    prev = order[pos - 1] if pos > 0 else None
    nxt = order[pos + 1] if pos + 1 < len(order) else None
    step = max(1, chunk_bytes // flat.element_size())
    view = flat.view(-1)
    sends = []
    for start in range(0, view.numel(), step):
        chunk = view[start:start + step]
        if prev is not None:
            dist.recv(chunk, src=prev, group=group)
        if nxt is not None:
            sends.append(dist.isend(chunk, dst=nxt, group=group))   # forwarded while the next arrives
    for work in sends:
        work.wait()


def chain_bytes(order: list[int], rank: int, nbytes: int) -> tuple[int, int]:
    """(sent, received) by `rank` in a broadcast of `nbytes` along `order` (the byte model the
    aggregator reports): every rank but the last sends the payload once, every receiver gets it
    once; with one receiver that is the root sending it once too."""
    pos = order.index(rank)
    return (nbytes if pos + 1 < len(order) else 0), (nbytes if pos > 0 else 0)
