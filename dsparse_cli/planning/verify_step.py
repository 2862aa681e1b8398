"""One measured training step under a device's plan; prints one JSON line.

Run as `python -m dsparse_cli.planning.verify_step --plan PLAN --rank R` in a fresh process
started with `profile.MALLOC_ENV` (glibc returns freed memory, so RSS follows live tensors).
Builds the model, applies the device's plan exactly as the worker does, takes the worker's base
point (model, optimizer and a dataset made, nothing trained: `measure.worker_setup`), runs
warm-up steps, then measures one step:

* CPU: VmHWM is reset (/proc/self/clear_refs) at the base point and again right before the
  measured step, after `zero_grad(set_to_none=True)`; the batch is created inside each step.
  measured_training_bytes = VmHWM over all steps - RSS at the base point (what the worker's
  meter reports: the first step's one-time bytes, optimizer state, the step's peak);
  measured_peak_bytes = VmHWM over all steps (whole process);
  measured_step_bytes = VmHWM over the measured step - RSS before it (batch + activations +
  gradients + working set).
* CUDA (`--device cuda`): measured_training_bytes = torch.cuda.max_memory_allocated over the
  steps - memory_allocated at the base point (the weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

WARMUP_STEPS = 2


def run(plan: dict, rank: int, device: str = "cpu", warmup: int = WARMUP_STEPS) -> dict:
    import torch

    from dsparse_cli.planning.measure import worker_setup, read_rss, reset_hwm
    from dsparse_cli.runtime.models import build_model, units_from_plan
    from dsparse_cli.runtime.sparse import apply_plan, make_optimizer, set_train_mode

    dev = next(d for d in plan["devices"] if d["rank"] == rank)
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

    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_base, cuda_base = read_rss()[0], torch.cuda.memory_allocated() if cuda else 0
    reset_hwm()
    for _ in range(warmup):
        step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    gc.collect()
    rss_before, warm_hwm = read_rss()
    reset_hwm()
    step()
    if cuda:
        torch.cuda.synchronize()
    rss_after, hwm = read_rss()
    step_peak = max(hwm, rss_after)
    peak = max(step_peak, warm_hwm)
    out = {"name": dev["name"], "rank": rank, "device": device, "units": dev["units"],
           "rss_before_bytes": rss_before, "measured_peak_bytes": peak, "measured_step_bytes": step_peak - rss_before,
           "measured_base_bytes": rss_base,
           "measured_training_bytes": (torch.cuda.max_memory_allocated() - cuda_base) if cuda else peak - rss_base}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsparse_cli.planning.verify_step")
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
