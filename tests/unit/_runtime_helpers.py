"""Helpers for the runtime tests: plans in the planner's format, job files, and real gloo
process groups on loopback (one spawned process per rank)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsparse_cli.runtime.models import build_model, split_units, unit_buffers, unit_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_groups(device_units: list[list[int]], n_units: int) -> list[dict]:
    """Groups as the planner lays them out: one allreduce per device-set of size > 1, one
    broadcast per device-set that leaves some ranks out (root = lowest updating rank)."""
    world = len(device_units)
    sets: dict[tuple[int, ...], list[int]] = {}
    for u in range(n_units):
        ranks = tuple(r for r in range(world) if u in device_units[r])
        if ranks:
            sets.setdefault(ranks, []).append(u)
    groups = []
    for ranks, units in sorted(sets.items(), key=lambda kv: (-len(kv[0]), kv[1])):
        receivers = [r for r in range(world) if r not in ranks]
        if len(ranks) > 1:
            groups.append({"id": len(groups), "op": "allreduce", "ranks": list(ranks), "units": units,
                           "root": ranks[0], "receivers": [], "bytes_per_step": 0})
        if receivers:
            groups.append({"id": len(groups), "op": "broadcast", "ranks": [ranks[0], *receivers], "units": units,
                           "root": ranks[0], "receivers": receivers, "bytes_per_step": 0})
    return groups


def make_plan(device_units: list[list[int]], model: str = "tiny_cnn", batch_size: int = 16,
              sync_every: int = 1) -> dict:
    m = build_model(model)
    units = split_units(m, model)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {
        "version": 1, "cluster": "test", "model": model, "num_classes": 10, "image_size": 32,
        "batch_size": batch_size, "optimizer": "sgd-momentum", "dtype": "float32", "sync_every": sync_every,
        "memory_meaning": "process", "base_bytes": 0,
        "units": [{"index": u.index, "name": u.name, "modules": list(u.modules),
                   "param_bytes": nbytes(unit_params(m, u)), "buffer_bytes": nbytes(unit_buffers(m, u))}
                  for u in units],
        "devices": [{"name": f"b{r}", "rank": r, "budget_bytes": 0, "predicted_peak_bytes": 0,
                     "predicted_training_bytes": 0, "full_update_peak_bytes": 0, "units": list(us)}
                    for r, us in enumerate(device_units)],
        "groups": make_groups(device_units, len(units)),
        "probe": {f"b{r}": {"usable_memory_bytes": 0, "torch": torch.__version__, "cuda": False}
                  for r in range(len(device_units))},
        "profile_key": "test",
    }


def make_job(workdir: str, **overrides) -> dict:
    job = {"id": "test-job", "dataset": "digits", "data_dir": None, "download": False, "epochs": 1,
           "max_steps": 3, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
           "optimizer": "sgd-momentum", "seed": 0, "sync_every": 1, "compression": {"name": "none"},
           "backend": "gloo", "collective_timeout_s": 60, "heartbeat_s": 0.5, "checkpoint_every_steps": None,
           "resume": False, "workdir": workdir, "eval": False,
           "bn_batches": 0}   # the end's BatchNorm recompute is test_batchnorm's; here buffers are compared as trained
    job.update(overrides)
    return job


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes joined in one gloo group.
    `fn` must be a module-level function; an exception in any rank fails the caller."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
