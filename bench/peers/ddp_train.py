"""The DDP peer of bench/edge.py: plain `DistributedDataParallel` training on digits, under torchrun.

    torchrun --nproc-per-node 4 bench/peers/ddp_train.py --steps 60 --out ddp.json [--powersgd]

Model, data and schedule are dsparse's own (`build_model`, `load_dataset`, `batches_for`,
`lr_at`, `make_optimizer`, the same seeding as the worker), so a run differs from
`dsparse train` only in how gradients are aggregated. Gloo, one torch thread per process.

Per rank it measures the step time (forward, backward with DDP's overlapped all-reduce,
optimizer step), the bytes put on the link per step, peak RSS and peak training memory (the
worker's own meter, `runtime/memory.py`: private memory above the point right before the first
step), and at each epoch's end and the
last step the accuracy on the digits test split (each rank scores a slice, counts all-reduced,
as the worker does, BatchNorm statistics first recomputed from the weights as the worker does),
with the training seconds so far. After training, a few steps under
`no_sync()` (forward, backward without the all-reduce, optimizer step) time the compute alone, so
the step's exposed aggregation (what the overlapped all-reduce adds) is step less compute.
Bytes: DDP's buckets go through a ring all-reduce, 2(n-1)/n x the gradient bytes per rank.
With --powersgd the tensors the hook actually all-reduces are counted (vanilla buckets before
start_powerSGD_iter, then P, Q and the uncompressed 1-D tensors), under the same ring model.
DDP also broadcasts the BatchNorm buffers from rank 0 every forward; they are reported apart
(`buffer_bytes_per_step`), not in `bytes_sent_per_step`. Rank 0 writes every rank's figures
to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dsparse_cli.contract import JobSpec  # noqa: E402
from dsparse_cli.runtime import data as datamod  # noqa: E402
from dsparse_cli.runtime.batchnorm import batchnorms, recompute_statistics  # noqa: E402
from dsparse_cli.runtime.job_setup import lr_at  # noqa: E402
from dsparse_cli.runtime.memory import MemoryMeter  # noqa: E402
from dsparse_cli.runtime.models import build_model, split_units  # noqa: E402
from dsparse_cli.runtime.sparse import make_optimizer  # noqa: E402
from dsparse_cli.runtime.weights import load_weights  # noqa: E402

DEFAULTS = JobSpec()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--momentum", type=float, default=DEFAULTS.momentum)
    p.add_argument("--powersgd", action="store_true", help="PowerSGD rank 1, start_powerSGD_iter=2")
    p.add_argument("--bn-batches", type=int, default=DEFAULTS.bn_batches,
                   help="before each evaluation, BatchNorm statistics recomputed over this many batches, as the worker")
    p.add_argument("--weights", default=None, help="start from this weights file, as `dsparse train --weights`")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def ring_bytes(payload: float, world: int) -> float:
    """What one rank sends in a ring all-reduce of `payload` bytes."""
    return 2 * (world - 1) / world * payload


class Counter:
    """Bytes handed to all_reduce; the hook's callbacks run on gloo threads, hence the lock."""

    def __init__(self):
        self.total, self._lock = 0, threading.Lock()

    def add(self, t: torch.Tensor) -> None:
        with self._lock:
            self.total += t.numel() * t.element_size()


def attach_powersgd(ddp: DDP, model: torch.nn.Module, counter: Counter) -> None:
    """PowerSGD rank 1 with one gloo group per DDP bucket: on one shared group the hook's
    callbacks race the next bucket's all-reduce and gloo aborts (BENCHMARKS.md)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd

    def counted_all_reduce(tensor, *a, **kw):
        counter.add(tensor)
        return dist.all_reduce(tensor, *a, **kw)

    shim = types.SimpleNamespace(**{k: getattr(dist, k) for k in dir(dist) if not k.startswith("__")})
    shim.all_reduce = counted_all_reduce
    psgd.dist = default_hooks.dist = shim   # only these two modules see the counting all_reduce
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = [dist.new_group(backend="gloo") for _ in range(2 + nbytes // (25 * 2**20))]
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)

    def hook(state, bucket):
        if bucket.index() >= len(groups):
            raise RuntimeError("more DDP buckets than process groups")
        state.process_group = groups[bucket.index()]
        return psgd.powerSGD_hook(state, bucket)

    ddp.register_comm_hook(state, hook)


def batches(ds, rank: int, world: int, args):
    """dsparse's shards, epoch after epoch, until --steps batches."""
    if datamod.dataset_steps_per_epoch(ds, world, args.batch_size) < 1:
        raise SystemExit("digits has too few samples for this world and batch size")
    done, epoch = 0, 0
    while done < args.steps:
        for x, y in datamod.batches_for(ds, rank, world, epoch, args.seed, args.batch_size):
            if done >= args.steps:
                return
            done += 1
            yield x, y
        epoch += 1


@torch.no_grad()
def evaluate(model, ds, rank: int, world: int, batch_size: int) -> float:
    model.eval()
    correct = total = 0
    for chunk in datamod.eval_slice(ds, rank, world).split(batch_size):
        x, y = ds.test.fetch(chunk)
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    counts = torch.tensor([correct, total], dtype=torch.int64)
    dist.all_reduce(counts)
    return float(counts[0]) / max(1, int(counts[1]))


def train(args) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial model on every rank, as the worker does
    model = build_model(args.model)
    loaded = None   # the worker's loader: a head of another size is re-initialised (seeded above)
    if args.weights:
        loaded = load_weights(model, split_units(model, args.model), args.weights, spec=args.model)
    torch.manual_seed(args.seed + 1 + rank)
    ds = datamod.load_dataset("digits", image_size=args.image_size, seed=args.seed)
    ddp = DDP(model)
    counter = Counter()
    if args.powersgd:
        attach_powersgd(ddp, model, counter)
    opt = make_optimizer("sgd-momentum", list(ddp.parameters()), args.lr, args.momentum)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    times, last_payload, history = [], 0, []
    spe = datamod.dataset_steps_per_epoch(ds, world, args.batch_size)
    model.train()
    meter = MemoryMeter(torch.device("cpu"))
    meter.mark_base()
    for step, (x, y) in enumerate(batches(ds, rank, world, args)):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at("cosine", args.lr, step, args.steps)
        opt.zero_grad(set_to_none=True)
        before = counter.total
        F.cross_entropy(ddp(x), y).backward()  # returns once DDP's hooks' futures are done
        opt.step()
        times.append(time.perf_counter() - t0)
        meter.sample()
        last_payload = counter.total - before
        if (step + 1) % spe == 0 or step + 1 == args.steps:   # where the worker evaluates: each epoch's end
            # as the worker, BatchNorm statistics of these weights first
            recompute_statistics(model, batchnorms([model]), (b for b, _ in batches(ds, rank, world, args)),
                                 args.bn_batches, torch.device("cpu"), world)
            history.append({"epoch": step // spe + 1, "global_step": step + 1, "train_s": round(sum(times), 3),
                            "accuracy": evaluate(model, ds, rank, world, args.batch_size)})
            model.train()
    accuracy = history[-1]["accuracy"]
    memory = meter.report()
    compute = compute_seconds(ddp, opt, x, y)
    payload = counter.total / len(times) if args.powersgd else grad_bytes
    last = last_payload if args.powersgd else grad_bytes
    return {"rank": rank, "world": world, "steps": len(times),
            "step_ms_median": 1000 * statistics.median(times), "step_ms": 1000 * sum(times) / len(times),
            "train_s": sum(times), "gradient_bytes": grad_bytes, "allreduce_payload_bytes_per_step": payload,
            "bytes_sent_per_step": ring_bytes(payload, world) if world > 1 else 0.0,
            "last_step_bytes_sent": ring_bytes(last, world) if world > 1 else 0.0,  # PowerSGD past its warm-up
            "buffer_bytes_per_step": buffer_bytes if rank == 0 and world > 1 else 0,
            "peak_process_bytes": memory["peak_process_bytes"], "peak_training_bytes": memory["peak_memory_bytes"],
            "compute_ms_median": 1000 * compute,
            "accuracy": accuracy, "history": history, "threads": torch.get_num_threads(), "weights": loaded}


def compute_seconds(ddp: DDP, opt, x, y, steps: int = 3) -> float:
    """Median seconds of a step without DDP's all-reduce (`no_sync`); after training, its weights spent."""
    times = []
    with ddp.no_sync():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE
    t0 = time.time()
    mine = train(args)
    mine["wall_s"] = time.time() - t0
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"method": "ddp_powersgd" if args.powersgd else "ddp",
                                        "model": args.model, "ranks": every}, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown, as the worker does: torch's destructors aborted ~7 % of runs here
    # ("terminate called without an active exception", after the results were written).
    os._exit(code)
