"""One measured training step under a device's plan; prints one JSON line.

Run as `python -m dsparse_cli.planning.verify_step --plan PLAN --rank R` in a fresh process
started with `profile.MALLOC_ENV` (glibc returns freed memory, so RSS follows live tensors).
Builds the model, applies the device's plan exactly as the worker does, runs warm-up steps,
then measures one step:

* CPU: VmHWM is reset (/proc/self/clear_refs) right before the step, after
  `zero_grad(set_to_none=True)`; the batch is created inside the step.
  measured_peak_bytes = VmHWM after the step (whole process);
  measured_step_bytes = VmHWM - RSS before the step (batch + activations + gradients + working set);
  measured_training_bytes = measured_step_bytes + weights + optimizer state (resident before the
  step, counted from the real tensors) - the same split as the profile's training bytes.
* CUDA (`--device cuda`): measured_training_bytes = torch.cuda.max_memory_allocated over the step
  (weights and optimizer state live on the GPU, so they are inside it).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

WARMUP_STEPS = 2


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def run(plan: dict, rank: int, device: str = "cpu", warmup: int = WARMUP_STEPS) -> dict:
    import torch

    from dsparse_cli.planning.measure import read_rss, reset_hwm
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

    def step():
        x = torch.randn(b, 3, s, s, generator=gen).to(device=device, dtype=dtype)
        y = torch.randint(0, plan["num_classes"], (b,), generator=gen).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if opt is not None:
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = read_rss()[0]
    reset_hwm()
    step()
    if cuda:
        torch.cuda.synchronize()
    rss_after, hwm = read_rss()
    weights = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    opt_state = _tensor_bytes(t for st in (opt.state.values() if opt else []) for t in st.values()
                              if torch.is_tensor(t))
    peak = max(hwm, rss_after)
    out = {"name": dev["name"], "rank": rank, "device": device, "units": dev["units"],
           "rss_before_bytes": rss_before, "measured_peak_bytes": peak, "weights_bytes": weights,
           "optimizer_bytes": opt_state, "measured_step_bytes": peak - rss_before,
           "measured_base_bytes": rss_before - (0 if cuda else weights + opt_state)}
    if cuda:
        out["measured_training_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["measured_training_bytes"] = peak - rss_before + weights + opt_state
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
