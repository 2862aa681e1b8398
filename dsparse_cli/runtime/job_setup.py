"""What the worker checks and builds from the plan and the job before it trains: plan checks that
say what to fix (`WorkerError`), torch's threads, the compressor, the learning-rate schedule, the
process group.

Learning rate: cosine decay from `lr` to 0 over the run's total steps (job `lr_schedule`:
"cosine" default, "step" = x0.1 at 50 % and 75 %, "constant"), computed from the global step so
a resumed run follows exactly the same schedule.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from dsparse_cli.contract import ContractError, JobSpec, Plan
from dsparse_cli.runtime.compress import Compressor, make_compressor
from dsparse_cli.runtime.cpus import wanted_threads

SELF_MOMENTUM = ("topk", "pbgc")  # compressors that apply (DGC-style) momentum themselves


class WorkerError(Exception):
    """A problem with the plan, job or environment; one line that says what to fix."""


def lr_at(schedule: str, base: float, step: int, total: int) -> float:
    if schedule == "constant" or total <= 0:
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if schedule == "step":
        return base * (0.1 ** ((step >= total * 0.5) + (step >= total * 0.75)))
    raise WorkerError(f"unknown lr_schedule {schedule!r}; choose cosine, step or constant")


def read_job(doc: dict) -> JobSpec:
    """The job file's spec, checked against the contract; its defaults fill what it leaves out."""
    try:
        return JobSpec.from_dict(doc)
    except ContractError as exc:
        raise WorkerError(str(exc)) from None


def check_plan(plan: dict, rank: int, world: int) -> dict:
    """The plan checked against the contract and this world -> this rank's entry in `devices`."""
    try:
        devices = Plan.from_dict(plan).devices
    except ContractError as exc:
        raise WorkerError(f"{exc}; re-run `dsparse plan`") from None
    if len(devices) != world:
        raise WorkerError(f"the plan has {len(devices)} devices but the launcher started {world} ranks; "
                          "launch one node per plan device")
    if not 0 <= rank < world:
        raise WorkerError(f"rank {rank} outside 0..{world - 1}")
    return plan["devices"][rank]


def check_units(model, units) -> None:
    names = {n for n, _ in model.named_modules()}
    for u in units:
        missing = [m for m in u.modules if m not in names]
        if missing:
            raise WorkerError(f"plan unit {u.index} ({u.name}) names modules the model lacks: {missing[:3]}; "
                              "the plan was made for another model version: re-run `dsparse plan`")


def set_threads() -> int:
    """Size torch's thread pools before any torch work: the board's `threads:` (passed by the
    launcher), else the CPUs this process may really use. torch alone takes the affinity's CPUs
    and ignores a cgroup quota (seven emulated boards sharing 2 cores ran 14 threads; one each ran
    the same job 6.7x faster). -> the intra-op threads now in use."""
    try:
        n = wanted_threads()
    except ValueError as exc:
        raise WorkerError(str(exc)) from None
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # settable once per process, before inter-op work: a second call keeps the first
    return torch.get_num_threads()


def compressor_for_job(job: JobSpec) -> Compressor:
    """The compressor the job's `compression` spec names, with the momentum the user asked for:
    topk/pbgc apply momentum before selecting values (momentum correction), so they take the
    job's momentum for sgd-momentum and none for sgd or adam; the optimizer then runs without it
    (see Trainer._optimizer). A bad spec is a WorkerError."""
    spec = dict(job.compression)
    if spec.get("name") in SELF_MOMENTUM and spec.get("momentum") is None:
        spec["momentum"] = float(job.momentum) if job.optimizer == "sgd-momentum" else 0.0
    try:
        return make_compressor(spec)
    except ValueError as exc:
        raise WorkerError(str(exc)) from None


def init_distributed(job: JobSpec, rank: int, world: int) -> torch.device:
    """Join the job's process group (env://); -> the device this rank trains on."""
    backend = job.backend
    device = torch.device("cpu")
    if backend == "nccl":
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            print("warning: backend nccl asked for but CUDA is not available: using gloo", flush=True)
            backend = "gloo"
    timeout = timedelta(seconds=job.collective_timeout_s)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    return device
