"""What broadcasting less often costs in accuracy (issue "Beat DDP on the wire", item 2).

    python bench/sync_every.py --finetune                 # 4 boards, mobilenet_v2 64x64, 1,2,4,8
    python bench/sync_every.py --intervals 1,4 --steps 20 # fewer

One graded cluster of local boards (as bench/edge.py makes it: b0 can hold a full update, the
others less, so the memory plan nests and b0 broadcasts the units only it trains), one plan per
interval (`dsparse plan --objective memory --sync-every N`: every broadcast group every N
steps), then `dsparse train` with the same seed, shards, weights and steps. Reported per
interval: the bytes each board sends per step, and the accuracy at each epoch's end and at the
end. The boards share this machine, so step times measure its two cores, not the links;
bench/edge.py --testbed is where time is measured. Results: bench/results/sync-every.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import edge  # noqa: E402
from _runner import BenchError, dsparse, json_of, tail  # noqa: E402
from compression import _fmt  # noqa: E402

from dsparse_cli.contract import JobSpec  # noqa: E402
from dsparse_cli.sizes import format_size as _size  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--intervals", default="1,2,4,8", help="comma list of --sync-every values")
    p.add_argument("--boards", type=int, default=4)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="per board")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default: dsparse train's")
    p.add_argument("--finetune", action="store_true", help="start from weights trained on digits 0-4 first")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--allocator", default="lean", choices=("lean", "fast"), help="the boards' `allocator:`")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sync-every.json")
    a = p.parse_args(argv)
    a.intervals = [int(x) for x in a.intervals.split(",") if x.strip()]
    if not a.intervals or min(a.intervals) < 1:
        p.error("--intervals takes whole numbers of at least 1, e.g. 1,2,4,8")
    a.lr = JobSpec().lr if a.lr is None else a.lr
    a.link, a.weights = "100mbit", None   # what edge's helpers read: link is a planning input only here
    return a


def plan(args, work: Path, cluster: Path, every: int) -> dict:
    argv = ["plan", "--cluster", str(cluster), "--model", args.model, "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--objective", "memory", "--sync-every", str(every), "--json"]
    res = dsparse(argv, work, args.timeout)
    if res.returncode != 0:
        raise BenchError(f"dsparse plan --sync-every {every} failed (exit {res.returncode}): {tail(res.stderr)}")
    return json_of(res, "dsparse plan")


def run(args, work: Path) -> list[dict]:
    if args.finetune:
        args.weights = edge.pretrain(args, work)
    cluster, epochs, rows = edge.graded_cluster(args, work), edge.epochs_for(args), []
    for every in args.intervals:
        edge.log(f"--sync-every {every} ...")
        p = plan(args, work, cluster, every)
        row = edge.run_dsparse(args, work, cluster, f"sync_every_{every}", epochs)
        row["sync_every"] = every
        row["units"] = [len(d["units"]) for d in p["devices"]]
        row["broadcast_bytes_per_step"] = sum(g["bytes_per_step"] for g in p["groups"] if g["op"] == "broadcast")
        edge.log(f"  accuracy {_fmt(row['final_accuracy'], '{:.4f}')}, {_size(row['max_bytes_sent_per_step'])}/step")
        rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    c = doc["config"]
    start = f", fine-tuned from digits 0-4 ({c['pretrain_steps']} steps)" if c["finetune"] else ", from scratch"
    head = (f"{c['model']} {c['image_size']}x{c['image_size']} on digits{start}, {c['boards']} local boards "
            f"(units updated: {doc['rows'][0]['units'] if doc['rows'] else '-'}), batch {c['batch_size']}, "
            f"{c['steps']} steps, seed {c['seed']}, lr {c['lr']:g}\n\n")
    lines = ["| sync every | broadcast bytes/step (planned) | sent/step (busiest board) | accuracy at each epoch's end "
             "| final accuracy |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        curve = ", ".join(f"{100 * h['accuracy']:.1f}" for h in r["history"] if h.get("accuracy") is not None)
        lines.append(f"| {r['sync_every']} | {_size(r['broadcast_bytes_per_step'])} | "
                     f"{_size(r['max_bytes_sent_per_step'])} | {curve} | {_fmt(r['final_accuracy'], '{:.2%}')} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dsparse-bench-sync-") as tmp:
        try:
            rows = run(args, Path(tmp))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    doc = {"rows": rows, "config": {"model": args.model, "image_size": args.image_size, "boards": args.boards,
                                    "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed,
                                    "lr": args.lr, "finetune": args.finetune, "pretrain_steps": args.pretrain_steps,
                                    "allocator": args.allocator,
                                    "bench_s": time.time() - t0, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
