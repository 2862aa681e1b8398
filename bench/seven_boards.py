"""The seven-board example (examples/seven-boards.yaml) against a full-update DDP run (issues #3, #4).

    python bench/seven_boards.py               # table; results in bench/results/seven_boards.json
    python bench/seven_boards.py --json        # the results JSON only

Two runs of `dsparse train --dataset digits` on this machine, same seed, data, epochs, per-board
batch and learning rate, seven `local: true` boards each:

* sparse: under the example's plan (`dsparse plan --cluster <copy of the example>`); the six
  small boards update only the last blocks.
* ddp: the same seven board names with 64 GiB limits, so the planner gives every board every
  unit: one AllReduce over all ranks of every gradient, every step. That is exactly
  DistributedDataParallel's semantics (tests/unit/test_equivalence.py checks the weights against
  torch's DistributedDataParallel after k steps); using `dsparse train` for it keeps the data
  shards, seed, model build, schedule and evaluation identical to the sparse run.

Defaults: mobilenet_v2 planned at batch 64 (the example's calibration), trained at batch 32 per
board (digits has 1437 training images: 6 steps per epoch on 7 boards instead of 3), 40 epochs
(both runs are on their plateau from about epoch 25), lr 0.1 (cosine), seed 0: about 16 minutes
on a busy 2-core machine (7 workers + 7 torchrun agents per run); `--epochs 20` halves that.
The first plan measures the profile (1-2 minutes) unless --profiles points at a cached one.

Printed: both final accuracies (rank 0's sharded eval on the digits test split) and the gap;
per board the peak training memory (bytes above the worker's RSS right before its first step)
from the heartbeat (`status.json`, as `dsparse train --json` reports it) and from the worker's
final `summary.json`, next to the plan's prediction, the predicted full-update figure and the
same board's measured peak in the DDP run; then the whole-process peak vs the predicted peak
and the budget. The measured training figure starts from a cold base (before the first step's
one-time allocations), the plan's from a warm one, so compare whole-process peaks for the
prediction's accuracy; and measured figures are at the train batch, predictions at the plan's.
Exit 0 when the gap is within --max-gap points, 1 when it is not, 2 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _example import measured_floor_mib, rebased  # noqa: E402
from _runner import BenchError, dsparse, free_port, json_of, tail  # noqa: E402
sys.path.insert(0, str(REPO))
EXAMPLE = REPO / "examples" / "seven-boards.yaml"
MiB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example", type=Path, default=EXAMPLE, help="cluster.yaml of the sparse run")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--plan-batch-size", type=int, default=64, help="batch the plan is made for (default 64)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="per-board train batch (default 32: 6 steps per epoch of digits on 7 boards; 0 = the plan's)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="sparse,ddp", help="which runs: sparse, ddp or both (default)")
    p.add_argument("--max-gap", type=float, default=1.5, help="accuracy gap allowed, in points (default 1.5)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per dsparse command")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "seven_boards.json")
    p.add_argument("--profiles", type=Path, default=None,
                   help="reuse measured profiles from this folder (a .dsparse/profiles; default: measure)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir, kept (default: a temp dir, removed)")
    p.add_argument("--json", action="store_true", help="print the results JSON only")
    p.add_argument("--no-rebase", dest="rebase", action="store_false",
                   help="use the example's limits as written (default: move them by the drift of what training "
                        "the classifier needs here from the 1228.8 MiB they were derived for; see bench/_example.py)")
    a = p.parse_args(argv)
    a.runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if not a.runs or any(r not in ("sparse", "ddp") for r in a.runs):
        p.error("--runs takes sparse, ddp or sparse,ddp")
    if a.batch_size > a.plan_batch_size:
        p.error("--batch-size must not exceed --plan-batch-size (the plan's memory is for that batch)")
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- running dsparse ---------------------------------------------------------------------


# --- clusters and plans --------------------------------------------------------------------
def board_names(example: Path) -> list[str]:
    from dsparse_cli.errors import DsparseError
    from dsparse_cli.inventory import load_inventory

    try:
        return [b.name for b in load_inventory(example).boards]
    except DsparseError as exc:
        raise BenchError(str(exc)) from None


def ddp_cluster(path: Path, names: list[str]) -> Path:
    """The same boards, each with far more memory than a full update needs."""
    lines = ["name: seven-boards-ddp", "master:", "  addr: 127.0.0.1", "boards:"]
    lines += [f"  - {{name: {n}, local: true, memory_limit: 64GiB}}" for n in names]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plan(args, cluster: Path) -> dict:
    res = dsparse(["plan", "--cluster", str(cluster), "--model", args.model, "--batch-size",
                   str(args.plan_batch_size), "--json"], cluster.parent, args.timeout)
    if res.returncode != 0:
        raise BenchError(f"dsparse plan --cluster {cluster} failed (exit {res.returncode}): {tail(res.stderr)}")
    return json_of(res, "dsparse plan")


def share_profiles(src_state: Path, dst_state: Path) -> None:
    """Profiles are cached by a key of every measuring input: the second plan reuses the first's."""
    src = src_state / "profiles"
    if src.is_dir():
        shutil.copytree(src, dst_state / "profiles", dirs_exist_ok=True)


def plan_summary(doc: dict) -> dict:
    n = len(doc["units"])
    covered = sorted(set().union(*[d["units"] for d in doc["devices"]]))
    savings = [1 - d["predicted_training_bytes"] / d["full_update_training_bytes"] for d in doc["devices"]]
    return {"units": n, "covered_units": len(covered), "every_unit_trained": covered == list(range(n)),
            "predicted_average_saving": sum(savings) / len(savings), "base_bytes": doc["base_bytes"],
            "groups": len(doc["groups"]), "limit_shift_mib": doc.get("limit_shift_mib", 0.0)}


def check_ddp_plan(doc: dict) -> None:
    n = len(doc["units"])
    partial = [d["name"] for d in doc["devices"] if d["units"] != list(range(n))]
    if partial:
        raise BenchError(f"the DDP baseline plan does not update every unit on {', '.join(partial)}")


# --- training --------------------------------------------------------------------------------
def train(args, cluster: Path, plan_doc: dict) -> dict:
    argv = ["train", "--cluster", str(cluster), "--dataset", "digits", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size or plan_doc["batch_size"]), "--lr", str(args.lr),
            "--seed", str(args.seed), "--master-port", str(free_port()), "--json"]
    t0 = time.monotonic()
    res = dsparse(argv, cluster.parent, args.timeout)
    wall = time.monotonic() - t0
    doc = json_of(res, "dsparse train")
    if res.returncode != 0 or doc.get("state") != "finished":
        raise BenchError(f"dsparse train --cluster {cluster} ended {doc.get('state')} (exit {res.returncode}), "
                         f"failed board {doc.get('failed_board')}: {tail(res.stderr)}")
    doc["wall_s"] = wall
    doc["worker_summaries"] = worker_summaries(cluster.parent / ".dsparse")
    return doc


def worker_summaries(state_dir: Path) -> dict[str, dict]:
    """Each board's final summary.json, found through the local job record."""
    from dsparse_cli.jobs import records

    rec = records.load(state_dir)
    out = {}
    for b in rec.boards:
        path = Path(b.run_dir) / "summary.json"
        if not path.exists():
            raise BenchError(f"board {b.name} wrote no summary.json in {b.run_dir}")
        out[b.name] = json.loads(path.read_text())
    return out


# --- results ---------------------------------------------------------------------------------
def board_rows(run: dict, ddp: dict | None) -> list[dict]:
    ddp_peak = {b["name"]: b.get("peak_memory_bytes") for b in (ddp or {}).get("boards", [])}
    rows = []
    for b in run["boards"]:
        s = run["worker_summaries"][b["name"]]
        row = {"name": b["name"], "rank": b["rank"], "units": b["units"],
               "heartbeat_peak_training_bytes": b.get("peak_memory_bytes"),
               "summary_peak_training_bytes": s.get("peak_memory_bytes"),
               "predicted_training_bytes": b.get("predicted_training_bytes"),
               "full_update_training_bytes": b.get("full_update_training_bytes"),
               "ddp_measured_training_bytes": ddp_peak.get(b["name"]),
               "base_memory_bytes": s.get("base_memory_bytes"), "peak_process_bytes": s.get("peak_process_bytes"),
               "predicted_peak_bytes": b.get("predicted_peak_bytes"), "budget_bytes": b.get("budget_bytes"), "agg_ms_per_step": b.get("agg_ms_per_step"),
               "bytes_per_step": b.get("bytes_per_step")}
        meas, full = row["summary_peak_training_bytes"], row["ddp_measured_training_bytes"]
        row["measured_saving_vs_ddp"] = 1 - meas / full if meas and full else None
        rows.append(row)
    return rows


def run_doc(run: dict, ddp: dict | None) -> dict:
    s0 = next(iter(run["worker_summaries"].values()))
    return {"job": run["job"], "accuracy": run["accuracy"], "wall_s": run["wall_s"], "steps": s0.get("steps"),
            "history": s0.get("history"), "boards": board_rows(run, ddp)}


def results(args, plans: dict, runs: dict) -> dict:
    ddp = runs.get("ddp")
    doc = {"config": {"example": str(args.example), "model": args.model, "dataset": "digits",
                      "epochs": args.epochs, "plan_batch_size": args.plan_batch_size,
                      "batch_size": args.batch_size or args.plan_batch_size, "lr": args.lr, "seed": args.seed,
                      "boards": 7, "max_gap_points": args.max_gap},
           "plans": plans, "runs": {k: run_doc(v, ddp) for k, v in runs.items()}}
    if "sparse" in runs and ddp:
        gap = 100 * (ddp["accuracy"] - runs["sparse"]["accuracy"])
        measured = [r["measured_saving_vs_ddp"] for r in doc["runs"]["sparse"]["boards"]]
        doc["accuracy_gap_points"] = gap
        doc["within_max_gap"] = abs(gap) <= args.max_gap
        doc["measured_average_saving_vs_ddp"] = (sum(measured) / len(measured)
                                                 if all(m is not None for m in measured) else None)
    return doc


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_table(doc: dict) -> None:
    c = doc["config"]
    print(f"seven boards: {c['model']} on digits, {c['epochs']} epochs, batch {c['batch_size']}/board "
          f"(plan for {c['plan_batch_size']}), lr {c['lr']}, seed {c['seed']}")
    if "sparse" in doc["plans"]:
        p = doc["plans"]["sparse"]
        print(f"plan: predicted average training-memory saving {_pct(p['predicted_average_saving'])}, "
              f"every unit trained: {p['every_unit_trained']}, base {_mib(p['base_bytes'])} MiB, "
              f"limits moved {p['limit_shift_mib']:+.1f} MiB")
    for name, run in doc["runs"].items():
        print(f"{name:6s} accuracy {100 * run['accuracy']:.2f}%  ({run['steps']} steps, {run['wall_s']:.0f} s)")
    if "accuracy_gap_points" in doc:
        verdict = "within" if doc["within_max_gap"] else "OUTSIDE"
        print(f"gap (ddp - sparse) {doc['accuracy_gap_points']:+.2f} points: {verdict} {c['max_gap_points']}")
    if "sparse" in doc["runs"]:
        print("\nper-device peak training memory, MiB (above the process base):")
        print(f"{'board':10s} {'units':>6s} {'heartbeat':>9s} {'summary':>8s} {'predicted':>9s} "
              f"{'full pred':>9s} {'ddp meas':>8s} {'saving':>7s}")
        for r in doc["runs"]["sparse"]["boards"]:
            units = f"{r['units'][0]}-{r['units'][-1]}" if r["units"] else "-"
            print(f"{r['name']:10s} {units:>6s} {_mib(r['heartbeat_peak_training_bytes']):>9s} "
                  f"{_mib(r['summary_peak_training_bytes']):>8s} {_mib(r['predicted_training_bytes']):>9s} "
                  f"{_mib(r['full_update_training_bytes']):>9s} {_mib(r['ddp_measured_training_bytes']):>8s} "
                  f"{_pct(r['measured_saving_vs_ddp']):>7s}")
        print(f"\nwhole process, MiB: {'board':10s} {'measured peak':>13s} {'predicted peak':>14s} {'budget':>8s}")
        for r in doc["runs"]["sparse"]["boards"]:
            print(f"{'':20s} {r['name']:10s} {_mib(r['peak_process_bytes']):>13s} "
                  f"{_mib(r['predicted_peak_bytes']):>14s} {_mib(r['budget_bytes']):>8s}")
        if doc.get("measured_average_saving_vs_ddp") is not None:
            print(f"measured average saving vs the DDP run: {_pct(doc['measured_average_saving_vs_ddp'])}")


# --- main ------------------------------------------------------------------------------------
def run_all(args, work: Path) -> dict:
    sparse_yaml = work / "sparse" / "cluster.yaml"
    sparse_yaml.parent.mkdir(parents=True)
    if args.profiles:
        shutil.copytree(args.profiles, sparse_yaml.parent / ".dsparse" / "profiles")
    log(f"planning the example (profiles {args.model} on first use, a few minutes) in {work}")
    floor = measured_floor_mib(sparse_yaml.parent / ".dsparse", args.model, args.plan_batch_size)
    text, shift = rebased(args.example.read_text(), floor) if args.rebase else (args.example.read_text(), 0.0)
    sparse_yaml.write_text(text)
    log(f"training the classifier needs {floor:.1f} MiB here: example limits moved by {shift:+.1f} MiB")
    plans = {"sparse": plan(args, sparse_yaml)}
    plans["sparse"]["limit_shift_mib"] = shift
    ddp_yaml = ddp_cluster(work / "ddp" / "cluster.yaml", board_names(args.example))
    share_profiles(sparse_yaml.parent / ".dsparse", ddp_yaml.parent / ".dsparse")
    plans["ddp"] = plan(args, ddp_yaml)
    check_ddp_plan(plans["ddp"])
    runs = {}
    for name in ("ddp", "sparse"):
        if name in args.runs:
            log(f"training {name} ({args.epochs} epochs)")
            runs[name] = train(args, ddp_yaml if name == "ddp" else sparse_yaml, plans[name])
            log(f"{name}: accuracy {runs[name]['accuracy']:.4f} in {runs[name]['wall_s']:.0f} s")
    return results(args, {k: plan_summary(v) for k, v in plans.items()}, runs)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsparse-seven-"))
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        log(f"error: --workdir {args.workdir} is not empty")
        return 2
    try:
        doc = run_all(args, work)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_table(doc)
        log(f"results: {args.out}")
    return 0 if doc.get("within_max_gap", True) else 1


if __name__ == "__main__":
    sys.exit(main())
