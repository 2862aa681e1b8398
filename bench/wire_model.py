"""Past this machine, by simulation: predicted aggregation time per step for 8 to 256 boards.

    python bench/wire_model.py            # table; results in bench/results/wire_model.json
    python bench/wire_model.py --json     # the results JSON only

The byte and time model is the planner's own (`dsparse_cli/planning/wire.py`: ring all-reduce
2(n-1)/n * B per link at the slowest member's rate, pipelined chain broadcast B per link), on the
measured profile of MobileNetV2 (batch 32, 64x64, sgd-momentum; measured on first use, cached
under --state-dir). Each simulated cluster repeats a mix of boards, given in --mix as
`training share of a full update : link rate`; the default is a field deployment of one x86 box
on gigabit, Jetsons on 100 Mbit and Raspberry Pis on 20 Mbit Wi-Fi. For each size it predicts:

* ddp: every board updates every unit, one ring all-reduce of every gradient (what
  DistributedDataParallel sends);
* ddp+powersgd: the same with torch's PowerSGD hook at rank 1 (its rule: a gradient of m x n is
  sent as m+n values when m*n > 2(m+n), the rest as they are);
* dsparse memory: the DSparse plan (each board trains as much as fits), sync every step;
* dsparse time: `--objective time` with sync at most every 4 steps;
* dsparse time, fine-tuning: `--objective time --allow-frozen` (every board trains what the
  smallest holds; nothing to broadcast).

Where the model stops being trustworthy: it has no per-message latency. A ring all-reduce makes
2(n-1) sequential hops; with `--latency-ms` (default 1 ms, the testbed's link delay) the table
also shows each row's latency floor, 2(n-1) * latency per all-reduce and (n-1 + chunks) hops per
chain; where that floor is a large share of the predicted time, the prediction is too low. The
model has not yet been checked against a measured 7-board run (the issue asks for within 20 %).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsparse_cli.planning import Device, get_profile, plan_devices  # noqa: E402
from dsparse_cli.planning.objective import plan_for_time  # noqa: E402
from dsparse_cli.planning.schedule import build_groups  # noqa: E402
from dsparse_cli.planning.wire import ddp_seconds, step_seconds  # noqa: E402
from dsparse_cli.sizes import parse_rate  # noqa: E402

MIX = "1.0:1gbit,0.6:100mbit,0.6:100mbit,0.35:20mbit,0.35:20mbit,0.2:20mbit"
SIZES = (8, 16, 32, 64, 128, 256)
MODEL = dict(model="mobilenet_v2", batch_size=32, image_size=64)
CHUNK = 256 * 1024   # runtime/chain.py's chunk


def powersgd_bytes(shapes: list[tuple[int, ...]], rank: int = 1, min_rate: float = 2.0) -> int:
    """Bytes PowerSGD all-reduces per step (float32): torch's `_should_compress` rule."""
    total = 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        compress = len(shape) > 1 and rows * cols > (rows + cols) * rank * min_rate
        total += (rows + cols) * rank if compress else rows * cols
    return 4 * total


def param_shapes(model: str) -> list[tuple[int, ...]]:
    import torch

    from dsparse_cli.runtime.models import build_model
    with torch.device("meta"):
        return [tuple(p.shape) for p in build_model(model).parameters()]


def cluster(n: int, mix: list[tuple[float, float]], prof) -> tuple[list[Device], list[float]]:
    """n boards repeating the mix: budget = base + dsparse's launcher + the share of a full update's
    training memory (a share of 1.0 trains everything)."""
    full = prof.training_bytes(range(prof.num_units))
    devices, rates = [], []
    for i in range(n):
        share, rate = mix[i % len(mix)]
        devices.append(Device(f"b{i}", prof.base_bytes + prof.supervisor_bytes + int(share * full)))
        rates.append(rate)
    return devices, rates


def latency_floor(groups: list[dict], latency_s: float) -> float:
    hops = 0
    for g in groups:
        n = len(g["ranks"])
        hops += 2 * (n - 1) if g["op"] == "allreduce" else \
            (n - 1 + math.ceil(g["state_bytes"] / CHUNK) - 1) / g.get("sync_every", 1)
    return hops * latency_s


def simulate(n: int, mix, prof, shapes, latency_s: float) -> dict:
    devices, rates = cluster(n, mix, prof)
    params = [u.param_bytes for u in prof.units]
    buffers = [u.buffer_bytes for u in prof.units]
    total = sum(params)
    row = {"boards": n, "ddp_s": ddp_seconds(total, rates), "ddp_latency_s": 2 * (n - 1) * latency_s,
           "ddp_powersgd_s": ddp_seconds(powersgd_bytes(shapes), rates),
           "ddp_powersgd_latency_s": 2 * 2 * (n - 1) * latency_s}   # P and Q: two all-reduces
    memory = plan_devices(devices, prof, allow_frozen=True, launcher_bytes=prof.supervisor_bytes)
    plans = {"dsparse_memory": (memory, 1, "fixed"),
             "dsparse_time": (plan_for_time(memory, prof, rates, params, buffers, 4, False), 4, "wire"),
             "dsparse_time_finetune": (plan_for_time(memory, prof, rates, params, buffers, 4, True), 4, "wire")}
    for name, (result, every, intervals) in plans.items():
        groups = build_groups([d.units for d in result.devices], params, buffers, every, rates, intervals)
        row[f"{name}_s"] = step_seconds(groups, rates)
        row[f"{name}_latency_s"] = latency_floor(groups, latency_s)
        row[f"{name}_units"] = sorted({len(d.units) for d in result.devices})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mix", default=MIX, help="share:rate,... (a board per item, repeated)")
    ap.add_argument("--latency-ms", type=float, default=1.0)
    ap.add_argument("--state-dir", default=str(REPO / "bench" / "results" / "state"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    mix = [(float(s), parse_rate(r)) for s, r in (item.split(":") for item in args.mix.split(","))]
    prof = get_profile(args.state_dir, MODEL["model"], batch_size=MODEL["batch_size"], image_size=MODEL["image_size"])
    shapes = param_shapes(MODEL["model"])
    rows = [simulate(n, mix, prof, shapes, args.latency_ms / 1000) for n in SIZES]
    doc = {"model": MODEL, "mix": args.mix, "latency_ms": args.latency_ms, "rows": rows,
           "param_bytes": sum(u.param_bytes for u in prof.units), "powersgd_bytes": powersgd_bytes(shapes)}
    out = REPO / "bench" / "results" / "wire_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1) if args.json else table(doc))
    return 0


def table(doc: dict) -> str:
    cols = ("ddp", "ddp_powersgd", "dsparse_memory", "dsparse_time", "dsparse_time_finetune")
    lines = ["| boards | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in doc["rows"]:
        cells = [f"{r[c + '_s']:.2f} s (+{r[c + '_latency_s']:.2f})" for c in cols]
        lines.append(f"| {r['boards']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
