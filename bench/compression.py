"""Gradient compression on the real launcher: none vs fp16 vs topk vs pbgc (issue #7).

    python bench/compression.py                 # table; results in bench/results/
    python bench/compression.py --json          # {"methods": [{"name", "compression_ratio",
                                                #   "final_accuracy", "compress_ms_per_step", ...}]}

It writes a cluster.yaml of N `local: true` boards in a scratch dir, runs `dsparse plan` once and
`dsparse train --dataset digits --compression METHOD --json` once per method (same model, epochs,
seed and plan for all), then reads the train summary (rank 0's accuracy) and every board's
`summary.json` in its run dir. By default all boards get the same generous memory limit, so every
board updates every unit and one AllReduce over the world carries the whole model: the methods
are compared without sparse plans in the way. `--sparse` grades the limits to get a nested plan.

Figures (per method):
* compression_ratio: dense bytes / bytes the compressor actually sent (payload: values, indices,
  headers), summed over boards, as the compressors report it (`summary.json` "compressor").
* wire_compression_ratio (extra): the same on the aggregator's byte model, i.e. what each board
  put on its link per step: a dense ring all_reduce sends 2(n-1)/n·B, a sparse all_gather
  (n-1)·P plus the length exchange and padding, broadcasts of BatchNorm buffers included.
* compress_ms_per_step: encode + decode time per step (exchange excluded), mean over boards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _runner import BenchError, check_methods, dsparse, free_port, json_of, tail  # noqa: E402
METHODS = ("none", "fp16", "topk", "pbgc")
TARGET_RATIO = 37.1   # PBGC's best reported compression (Guo et al. 2021)
AIM_RATIO = 100.0
MAX_GAP_POINTS = 1.0  # accuracy within 1 point of `none`
HEADROOM = 0.15       # `dsparse plan`'s default


# --- set-up ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boards", type=int, default=4, help="simulated local boards (default 4)")
    p.add_argument("--model", default="resnet18", help="default resnet18: plateaus on digits in 6 epochs")
    p.add_argument("--batch-size", type=int, default=32, help="per board")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=None, help="cap the steps (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--density", type=float, default=None, help="topk (default: dsparse train's)")
    p.add_argument("--key-fraction", type=float, default=None, help="pbgc (default: dsparse train's)")
    p.add_argument("--entropy-bins", type=int, default=None, help="pbgc (default: dsparse train's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="topk/pbgc (default: dsparse train's)")
    p.add_argument("--sparse", action="store_true", help="graded memory limits: a nested (DSparse) plan")
    p.add_argument("--memory-limit", default="8GiB", help="each board's limit without --sparse")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per dsparse command")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compression.json",
                   help="results JSON (a .png plot next to it when matplotlib is installed)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    p.add_argument("--json", action="store_true", help="print the results JSON only")
    a = p.parse_args(argv)
    check_methods(p, a, METHODS)
    return a


def write_cluster(work: Path, limits: list[str | int]) -> Path:
    """cluster.yaml of `local: true` boards b0..; the state dir is work/.dsparse."""
    lines = ["name: bench-compression", "master:", "  addr: 127.0.0.1", f"  port: {free_port()}", "boards:"]
    lines += [f"  - {{name: b{i}, local: true, memory_limit: {lim}}}" for i, lim in enumerate(limits)]
    path = work / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def log(args, msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- running dsparse ---------------------------------------------------------------------


def make_plan(args, work: Path) -> tuple[Path, dict]:
    cluster = write_cluster(work, [args.memory_limit] * args.boards)
    plan = run_plan(args, work, cluster)
    if args.sparse:
        cluster = write_cluster(work, sparse_limits(plan, args.boards))
        plan = run_plan(args, work, cluster)
    return cluster, plan


def run_plan(args, work: Path, cluster: Path) -> dict:
    res = dsparse(["plan", "--cluster", str(cluster), "--model", args.model, "--batch-size", str(args.batch_size),
                   "--json"], work, args.timeout)
    if res.returncode != 0:
        raise BenchError(f"dsparse plan failed (exit {res.returncode}): {tail(res.stderr)}")
    return json_of(res, "dsparse plan")


def sparse_limits(plan: dict, n: int, slack_mib: int = 8) -> list[str]:
    """Memory limits from a full update down to 15 % of the training memory above the minimum the
    planner accepts, launcher included: the planner then nests the boards' unit sets. `slack_mib`
    absorbs the base the next plan measures afresh."""
    extra = int(plan.get("launcher_bytes") or 0)
    lo = int(plan["min_peak_bytes"]) + extra + allocator_bytes(plan)
    hi = max(int(d["full_update_peak_bytes"]) for d in plan["devices"]) + extra
    keep = 1 - float(plan.get("headroom", HEADROOM))
    return [f"{math.ceil((lo + share * (hi - lo)) / keep / 2**20) + slack_mib}MiB" for share in graded_shares(n)]


def allocator_bytes(plan: dict) -> int:
    """What `allocator: fast` adds to a board's figures in this plan (0 with lean boards only)."""
    return max((d.get("predicted_breakdown") or {}).get("allocator", 0) for d in plan["devices"])


def graded_shares(n: int) -> list[float]:
    """Board i's share of the way from the least to a full update: 1.0 down to 0.15."""
    return [1.0 - 0.85 * i / max(1, n - 1) for i in range(n)]


def train_argv(args, cluster: Path, method: str) -> list[str]:
    argv = ["train", "--cluster", str(cluster), "--dataset", "digits", "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--lr", str(args.lr), "--compression", method,
            "--master-port", str(free_port()), "--json"]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    opts = {"topk": [("--density", args.density), ("--warmup-steps", args.warmup_steps)],
            "pbgc": [("--key-fraction", args.key_fraction), ("--entropy-bins", args.entropy_bins),
                     ("--warmup-steps", args.warmup_steps)]}.get(method, [])
    for flag, value in opts:
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_method(args, work: Path, cluster: Path, method: str) -> dict:
    t0 = time.time()
    res = dsparse(train_argv(args, cluster, method), work, args.timeout)
    wall = time.time() - t0
    if res.returncode != 0:
        raise BenchError(f"dsparse train --compression {method} failed (exit {res.returncode}): "
                         f"{tail(res.stdout if res.stdout.strip().startswith('{') else res.stderr)}")
    summary = json_of(res, f"dsparse train --compression {method}")
    return method_row(args, method, summary, board_summaries(work, summary), wall)


def board_summaries(work: Path, summary: dict) -> list[dict]:
    """Each board's summary.json: <state_dir>/boards/<name>/runs/<job>/summary.json, or the run
    dir the job record names."""
    state = work / ".dsparse"
    run_dirs = {}
    record = state / "jobs" / f"{summary['job']}.json"
    if record.exists():
        run_dirs = {b["name"]: Path(b["run_dir"]) for b in json.loads(record.read_text())["boards"]}
    docs = []
    for b in summary["boards"]:
        run = run_dirs.get(b["name"], state / "boards" / b["name"] / "runs" / summary["job"])
        path = run / "summary.json"
        if not path.exists():
            raise BenchError(f"board {b['name']} wrote no summary.json in {run}")
        docs.append(json.loads(path.read_text()))
    return docs


# --- figures -----------------------------------------------------------------------------
def _sum(docs, key, sub="compressor") -> float:
    return sum(float((d.get(sub) or {}).get(key) or 0.0) if sub else float(d.get(key) or 0.0) for d in docs)


def method_row(args, method: str, summary: dict, boards: list[dict], wall: float) -> dict:
    n = len(boards)
    dense, sent = _sum(boards, "dense_bytes_per_step"), _sum(boards, "sent_bytes_per_step")
    wire, wire_dense = _sum(boards, "bytes_sent_per_step", None), _sum(boards, "dense_bytes_per_step", None)
    comp = boards[0].get("compressor") or {}
    return {
        "name": method,
        "compression_ratio": dense / sent if sent else None,
        "final_accuracy": summary.get("accuracy"),
        "compress_ms_per_step": _sum(boards, "compress_ms_per_step", None) / n,
        # extras
        "dense_bytes_per_step": dense / n,          # one board's bucket(s), float32
        "sent_bytes_per_step": sent / n,            # one board's payload, indices included
        "wire_bytes_per_step": wire,                # all boards' link traffic (byte model)
        "dense_wire_bytes_per_step": wire_dense,    # the same with dense float32 all_reduce
        "wire_compression_ratio": wire_dense / wire if wire else None,
        "agg_ms_per_step": max(float(b.get("agg_ms_per_step") or 0.0) for b in boards),
        "steps": boards[0].get("steps"),
        "train_s": max(float(b.get("train_s") or 0.0) for b in boards),
        "wall_s": wall,
        "accuracy_history": [h.get("accuracy") for h in boards[0].get("history") or []],
        "options": boards[0].get("compression"),
        "extras": {k: v for k, v in comp.items() if k.startswith(("pbgc_", "topk_"))},
        "job": summary["job"], "model": args.model, "epochs": args.epochs, "seed": args.seed,
    }


def verdict(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    pb, base = by.get("pbgc"), by.get("none")
    out = {"pbgc_ratio_target": TARGET_RATIO, "pbgc_ratio_aim": AIM_RATIO, "max_accuracy_gap_points": MAX_GAP_POINTS}
    if pb and pb.get("compression_ratio") is not None:
        out["pbgc_ratio"] = pb["compression_ratio"]
        out["meets_target_ratio"] = pb["compression_ratio"] >= TARGET_RATIO
        out["meets_aim_ratio"] = pb["compression_ratio"] >= AIM_RATIO
    if pb and base and pb.get("final_accuracy") is not None and base.get("final_accuracy") is not None:
        gap = 100.0 * (base["final_accuracy"] - pb["final_accuracy"])
        out["pbgc_accuracy_gap_points"] = gap
        out["accuracy_within_1_point"] = gap <= MAX_GAP_POINTS
    return out


# --- output ------------------------------------------------------------------------------
def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = doc["config"]
    t = Table(title=f"compression on {c['dataset']}: {c['model']}, {c['boards']} boards x batch {c['batch_size']}, "
                    f"{c['epochs']} epochs, seed {c['seed']}{', sparse plan' if c['sparse'] else ''}",
              title_justify="left")
    for col in ("method", "compression ratio", "final accuracy", "compress ms/step", "sent/board/step",
                "wire ratio", "agg ms/step", "wall s"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in doc["methods"]:
        t.add_row(r["name"], _fmt(r["compression_ratio"], "{:.1f}x"), _fmt(r["final_accuracy"], "{:.2%}"),
                  _fmt(r["compress_ms_per_step"], "{:.1f}"), _size(r["sent_bytes_per_step"]),
                  _fmt(r["wire_compression_ratio"], "{:.1f}x"), _fmt(r["agg_ms_per_step"], "{:.0f}"),
                  _fmt(r["wall_s"], "{:.0f}"))
    console = Console(width=None if sys.stdout.isatty() else 130)  # pipes: no 80-column squeeze
    console.print(t)
    for line in verdict_lines(doc["verdict"]):
        console.print(line, highlight=False)


def verdict_lines(v: dict) -> list[str]:
    lines = []
    if "pbgc_ratio" in v:
        ok = "meets" if v["meets_target_ratio"] else "MISSES"
        aim = "reaches" if v["meets_aim_ratio"] else "falls short of"
        lines.append(f"pbgc ratio {v['pbgc_ratio']:.1f}x: {ok} the paper's {TARGET_RATIO}x; {aim} the {AIM_RATIO:.0f}x aim")
    if "pbgc_accuracy_gap_points" in v:
        ok = "within" if v["accuracy_within_1_point"] else "NOT within"
        lines.append(f"pbgc accuracy gap to none: {v['pbgc_accuracy_gap_points']:+.2f} points ({ok} {MAX_GAP_POINTS:g})")
    return lines


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def write_results(doc: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    written = [out]
    png = plot(doc, out.with_suffix(".png"))
    return written + ([png] if png else [])


def plot(doc: dict, path: Path) -> Path | None:
    """Accuracy against compression ratio; skipped when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in doc["methods"] if r["compression_ratio"] and r["final_accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.scatter(r["compression_ratio"], 100 * r["final_accuracy"])
        ax.annotate(r["name"], (r["compression_ratio"], 100 * r["final_accuracy"]), textcoords="offset points",
                    xytext=(4, 4))
    ax.axvline(TARGET_RATIO, ls="--", lw=0.8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense / sent)")
    ax.set_ylabel("final accuracy (%)")
    ax.set_title(f"{doc['config']['model']} on digits, {doc['config']['boards']} boards")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main --------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsparse-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    try:
        log(args, f"planning {args.model} (batch {args.batch_size}) on {args.boards} local boards in {work}")
        cluster, plan = make_plan(args, work)
        for method in args.methods:
            log(args, f"training with --compression {method} ...")
            try:
                row = run_method(args, work, cluster, method)
            except BenchError as exc:
                failures.append({"name": method, "error": str(exc)})
                log(args, f"  {method}: {exc}")
                continue
            rows.append(row)
            log(args, f"  {method}: ratio {_fmt(row['compression_ratio'], '{:.1f}x')}, accuracy "
                      f"{_fmt(row['final_accuracy'], '{:.4f}')}, {row['wall_s']:.0f}s")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"methods": rows, "failed": failures, "verdict": verdict(rows), "config": {
        "dataset": "digits", "model": args.model, "boards": args.boards, "batch_size": args.batch_size,
        "epochs": args.epochs, "max_steps": args.max_steps, "seed": args.seed, "lr": args.lr, "sparse": args.sparse,
        "plan_groups": [{"op": g["op"], "ranks": g["ranks"], "units": len(g["units"])} for g in plan["groups"]],
        "host_cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    written = write_results(doc, args.out)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
        log(args, "wrote " + ", ".join(str(p) for p in written) +
            ("" if len(written) > 1 else " (no plot: matplotlib is not installed)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
