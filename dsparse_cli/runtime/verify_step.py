"""One measured training step under a device's plan; prints one JSON line.

Run as `python -m dsparse_cli.runtime.verify_step --plan PLAN --rank R` in a fresh process
started with `profile.MALLOC_ENV` (glibc returns freed memory, so RSS follows live tensors), on
this machine or on the board itself (`dsparse plan --verify`: it is part of the shipped runtime,
so torch and the standard library only).
Builds the model, applies the device's plan exactly as the worker does, takes the worker's base
point (model, optimizer and a dataset made, nothing trained: `worker_setup`, which the
profiler runs too), runs
warm-up steps, then measures one step, with the worker's thread count (`job_setup.set_threads`):

* measured_training_bytes: what the worker's meter (`runtime/memory.py`) reports over all the
  steps: on the CPU the peak of private memory above the base point (the first step's one-time
  bytes, optimizer state, the step's peak), on CUDA (`--device cuda`) the peak allocated above
  the weights;
* measured_peak_bytes = VmHWM over all steps (whole process);
* measured_step_bytes = VmHWM over the measured step, after `zero_grad(set_to_none=True)`,
  less the RSS before it (batch + activations + gradients + working set; the batch is created
  inside each step).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

WARMUP_STEPS = 2


def read_rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, bytes."""
    from dsparse_cli.runtime.memory import current_rss, peak_rss

    return current_rss(), peak_rss()


def reset_hwm() -> None:
    from dsparse_cli.runtime.memory import reset_peak_rss

    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs refused): verify on Linux "
                         "with a writable /proc")


def worker_setup(model, image_size: int, batch_size: int) -> None:
    """What every worker runs before its base point that a training step runs again: a dataset
    made and a batch drawn (the synthetic one: shipped, no files; digits and image folders touch
    at least as much), and the start-up broadcast's flatten / unflatten / copy of the weights.
    The kernel code they page in is in the worker's base, so it must be in ours too, or the
    first step's one-time bytes come out ~4 MiB too high."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from dsparse_cli.runtime import data as datamod

    ds = datamod.load_dataset("synthetic", image_size=image_size, seed=0, rank=0, world=1,
                              synthetic_samples=2 * batch_size + 8)
    next(iter(datamod.batches_for(ds, 0, 1, 0, 0, batch_size)))
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for dtype in {t.dtype for t in tensors}:
        bucket = [t for t in tensors if t.dtype == dtype]
        for t, v in zip(bucket, _unflatten_dense_tensors(_flatten_dense_tensors(bucket), bucket)):
            t.copy_(v)


def run(plan: dict, rank: int, device: str = "cpu", warmup: int = WARMUP_STEPS) -> dict:
    import platform

    import torch

    from dsparse_cli.runtime.job_setup import set_threads
    from dsparse_cli.runtime.memory import MemoryMeter, current_rss, peak_rss

    from dsparse_cli.runtime.models import build_model, units_from_plan
    from dsparse_cli.runtime.sparse import apply_plan, make_optimizer, set_train_mode

    dev = next(d for d in plan["devices"] if d["rank"] == rank)
    threads = set_threads()
    torch.manual_seed(0)
    dtype = getattr(torch, plan.get("dtype", "float32"))
    model = build_model(plan["model"], plan["num_classes"]).to(device=device, dtype=dtype)
    units = units_from_plan(plan)
    params = apply_plan(model, units, dev["units"])
    set_train_mode(model, units, dev["units"], {u for d in plan["devices"] for u in d["units"]})
    opt = make_optimizer(plan["optimizer"], params, lr=1e-3) if params else None
    gen = torch.Generator().manual_seed(1)
    b, s = plan["batch_size"], plan["image_size"]
    worker_setup(model, s, b)   # what the worker runs before its base point, as the profile does

    def step():
        x = torch.randn(b, 3, s, s, generator=gen).to(device=device, dtype=dtype)
        y = torch.randint(0, plan["num_classes"], (b,), generator=gen).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if opt is not None:
            loss.backward()
            opt.step()

    meter = MemoryMeter(torch.device(device))
    meter.mark_base()
    for _ in range(warmup):
        step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        meter.sample()
    gc.collect()
    meter.sample()
    reset_hwm()   # (the meter's own reset is CPU-only and silent when refused)
    rss_before = current_rss()
    step()
    if meter.device.type == "cuda":
        torch.cuda.synchronize()
    step_peak = max(peak_rss(), current_rss())
    return {"name": dev["name"], "rank": rank, "device": device, "units": dev["units"],
            "rss_before_bytes": rss_before, "measured_peak_bytes": meter.peak_process_bytes(),
            "measured_step_bytes": step_peak - rss_before, "measured_base_bytes": meter.base_process_bytes,
            "host": platform.node(), "threads": threads, "cgroup": _memory_cgroup(),
            "measured_training_bytes": meter.peak_training_bytes()}


def _memory_cgroup() -> str | None:
    """This process's memory cgroup path (v1's memory controller where a hybrid host has both)."""
    from dsparse_cli.runtime.supervise import memory_cgroups

    found = sorted(memory_cgroups())
    return found[0][1] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsparse_cli.runtime.verify_step")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS)
    a = ap.parse_args(argv)
    with open(a.plan) as fh:
        plan = json.load(fh)
    print(json.dumps(run(plan, a.rank, a.device, a.warmup), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
