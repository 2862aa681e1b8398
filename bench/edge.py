"""dsparse against real DDP on the wire (issue "Beat DDP on the wire", item 5).

    python bench/edge.py                # 4 boards, mobilenet_v2, 60 steps; table + bench/results/edge.{json,md}
    python bench/edge.py --smoke        # 2 boards, tiny_cnn, batch 16, 4 steps, fine-tuned, every method
    python bench/edge.py --json         # the results JSON only
    sudo .venv/bin/python bench/edge.py --testbed --finetune --image-size 64   # the emulated cluster, over SSH
    sudo .venv/bin/python bench/edge.py --testbed --profile paper7 --finetune --image-size 64

Five methods, each with the same seed, digits shards, per-board batch, learning rate (dsparse's
default, cosine over the run) and number of steps:

* ddp: `torchrun` + `torch.nn.parallel.DistributedDataParallel` (bench/peers/ddp_train.py).
* ddp_powersgd: the same with PowerSGD rank 1 (start_powerSGD_iter=2, one gloo group per bucket).
* dsparse_memory: `dsparse plan --objective memory`, then `dsparse train`.
* dsparse_time: `dsparse plan --objective time --sync-every 4`, then `dsparse train`.
* dsparse_time_pbgc: that plan, `dsparse train --compression pbgc`.
* dsparse_frozen (with --finetune only): `--objective time --allow-frozen`: units no board needs
  to train stay at the pretrained weights everywhere and are never sent.

The dsparse boards are `local: true` boards in a scratch cluster.yaml with `link:` (--link,
default 100mbit for all; on local boards only a planning input: with equal links the time plan
can come out as the memory plan, `--link 1gbit,20mbit` deals mixed rates to b0, b1, ...).
Their memory limits are graded from a full update down to ~15 % of the training memory above
the planner's minimum (a first plan with room for everything gives both), so the memory plan
nests instead of being DDP under another name (`--ungraded` skips the grading to get exactly
that: what the implementation costs apart from a plan). For a model as small as tiny_cnn the limits'
slack exceeds that range and every board trains everything.
The peers run on 127.0.0.1 with `torchrun --nproc-per-node N`.

Figures per method and board: step_ms (training time / steps: forward, backward, aggregation,
optimizer step; evaluation and start-up excluded), agg_ms_per_step (dsparse: the time aggregation
held the step up, its mean, and the median and p90 of the steps' own figures (each the largest over
the boards); DDP overlaps its all-reduce with the backward, so for the peers it is the exposed part:
the step less the same step timed without the all-reduce), the link floor (the longest any board's
link needs for what that board sends per step, at its rate) and agg_ms_per_step's ratio to it,
the exposed wire time (the step less the slowest board's compute, `exposed_wire_ms`) and its
ratio to the planner's wire model (the plan's predicted aggregation; DDP's ring for the peer; none
for compression, which the model does not cover),
bytes_sent_per_step (each board's link, ring all-reduce model 2(n-1)/n x payload for all-reduces, as
dsparse's aggregator counts its own), peak_process_bytes (peak RSS of the training process;
torchrun's agent and dsparse's launcher not included), peak_training_bytes (the private memory above
the point right before the first step, the worker's meter on both sides; the DDP peer runs with
glibc's allocator defaults, the worker with its `allocator:`, lean unless --allocator fast), final
accuracy on the digits test split, the accuracy at each epoch's end over the training seconds so far
(`history`; both sides evaluate there) and from it the training seconds to a target accuracy, and
wall_s (the whole command, start-up included).

`--repeat N` runs every method N times, round after round, and reports each method's run with the
median step time (its own figures, every run's step time next to it): one run's step on this
shared 2-core machine has moved by 32 % on the same command.
`--finetune` first trains the model on digits 0-4 (bench/peers/pretrain.py, one process) and
starts every method from those weights (the 5-class head re-initialised for ten digits).
`--testbed` runs every method on `scripts/edge-testbed` boards over SSH (bench/edge_testbed.py):
real shaped links, a cgroup memory limit and CPU quota per board, DDP under torchrun on every
board. Without it every process shares this machine and loopback, and times measure compute
contention, not links.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _runner import BenchError, check_methods, dsparse, free_port, json_of, tail  # noqa: E402
from compression import _fmt, board_summaries, sparse_limits  # noqa: E402
import edge_testbed  # noqa: E402
import yaml  # noqa: E402

from dsparse_cli.sizes import format_size as _size, parse_rate  # noqa: E402

METHODS = ("ddp", "ddp_powersgd", "dsparse_memory", "dsparse_time", "dsparse_time_pbgc", "dsparse_frozen")
# the plan each dsparse method trains under: `dsparse plan --objective OBJECTIVE` + these flags
PLANS = {"dsparse_memory": "memory", "dsparse_time": "time", "dsparse_time_pbgc": "time", "dsparse_frozen": "frozen"}
PEER = REPO / "bench" / "peers" / "ddp_train.py"
SMOKE = {"boards": 2, "model": "tiny_cnn", "batch_size": 16, "steps": 4, "finetune": True, "pretrain_steps": 10}


# --- set-up ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boards", type=int, default=4)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per board")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default: dsparse train's")
    p.add_argument("--link", default="100mbit",
                   help="the boards' link: in cluster.yaml (planning input); a comma list is dealt to b0, b1, ... "
                        "in turn, e.g. 1gbit,20mbit")
    p.add_argument("--sync-every", type=int, default=4, help="--objective time's broadcast period")
    p.add_argument("--allocator", default="lean", choices=("lean", "fast"),
                   help="every dsparse board's `allocator:` in cluster.yaml (fast: glibc's defaults, as the peers run)")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS)
                   + " (default: all; dsparse_frozen only with --finetune)")
    p.add_argument("--smoke", action="store_true", help="2 boards, tiny_cnn, 4 steps, every method")
    p.add_argument("--finetune", action="store_true",
                   help="start every method from weights first trained on digits 0-4 (bench/peers/pretrain.py)")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="for time to accuracy (a fraction; default: DDP's final accuracy less one point)")
    p.add_argument("--testbed", action="store_true",
                   help="boards on the emulated edge cluster, over SSH (needs root; bench/edge_testbed.py)")
    p.add_argument("--memory", default="2GiB", help="--testbed: each board's cgroup memory limit")
    p.add_argument("--cpus", type=float, default=0.4, help="--testbed: each board's CPU quota")
    p.add_argument("--delay", default="1ms", help="--testbed: each link's one-way delay")
    p.add_argument("--profile", default="uniform", choices=("uniform", "paper7"),
                   help="--testbed: uniform boards (--boards, --memory, --cpus, --link, --delay) or paper7's seven")
    p.add_argument("--ungraded", action="store_true",
                   help="no graded allowances: every dsparse board holds a full update, so the memory plan "
                        "is DDP's aggregation (to tell a plan's cost from the implementation's)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every method N times, round after round; a method's row is its run with the "
                        "median step time, every run's step in step_ms_runs (this machine's steps move ~30 %%)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    p.add_argument("--out", type=Path, default=None, help="results JSON, the markdown table next to it as .md "
                   "(default bench/results/edge.json; edge-smoke.json with --smoke, so a smoke never overwrites a run)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    p.add_argument("--json", action="store_true", help="print the results JSON only")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    if a.out is None:
        a.out = REPO / "bench" / "results" / ("edge-smoke.json" if a.smoke else "edge.json")
    if a.lr is None:
        from dsparse_cli.contract import JobSpec
        a.lr = JobSpec().lr
    a.weights = None   # set by --finetune's pretraining
    if a.profile == "paper7":
        if not a.testbed:
            p.error("--profile paper7 needs --testbed")
        a.boards = 7
    if a.methods is None:
        a.methods = ",".join(m for m in METHODS if a.finetune or m != "dsparse_frozen")
    check_methods(p, a, METHODS)
    if a.repeat < 1:
        p.error(f"--repeat {a.repeat} must be at least 1")
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def epochs_for(args) -> int:
    """dsparse train counts epochs; enough of them that --max-steps is what stops it."""
    from dsparse_cli.runtime import data as datamod
    n_train = datamod.load_dataset("digits", image_size=8).train.size
    spe = datamod.steps_per_epoch(n_train, args.boards, args.batch_size)
    if spe < 1:
        raise BenchError(f"digits is too small for {args.boards} boards at batch {args.batch_size}")
    return math.ceil(args.steps / spe)


# --- the DDP peers -----------------------------------------------------------------------
def peer_argv(args, method: str) -> list[str]:
    argv = ["--model", args.model, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--seed", str(args.seed), "--lr", str(args.lr)]
    return argv + (["--powersgd"] if method == "ddp_powersgd" else []) + (["--weights", args.weights] if args.weights else [])


def run_peer(args, work: Path, method: str, cluster: Path | None) -> dict:
    if cluster is not None:
        doc, wall = edge_testbed.run_peer(args, work, cluster, method, peer_argv(args, method))
        return peer_row(method, doc["ranks"], wall)
    out = work / f"{method}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.boards),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(PEER),
           *peer_argv(args, method), "--out", str(out)]
    t0 = time.time()
    res = _run(cmd, work, args.timeout)
    wall = time.time() - t0
    if res.returncode != 0 or not out.exists():
        raise BenchError(f"torchrun {method} exited {res.returncode}: {tail(res.stderr, 6)}")
    return peer_row(method, json.loads(out.read_text())["ranks"], wall)


def peer_row(method: str, ranks: list[dict], wall: float) -> dict:
    boards = [{"name": f"rank{r['rank']}", "step_ms": r["step_ms"], "step_ms_median": r["step_ms_median"],
               "agg_ms_per_step": exposed_agg_ms(r), "bytes_sent_per_step": r["bytes_sent_per_step"],
               "last_step_bytes_sent": r["last_step_bytes_sent"], "buffer_bytes_per_step": r["buffer_bytes_per_step"],
               "gradient_bytes": r["gradient_bytes"], "peak_process_bytes": r["peak_process_bytes"],
               "peak_training_bytes": r.get("peak_training_bytes"), "steps": r["steps"], "train_s": r["train_s"],
               "weights": r.get("weights")} for r in ranks]
    return method_row(method, boards, ranks[0]["accuracy"], wall, ranks[0].get("history"))


def exposed_agg_ms(rank: dict) -> float | None:
    """What DDP's overlapped all-reduce adds to a step: its step less the same step without the
    all-reduce (the peer's `compute_ms_median`); None from a peer that did not time it."""
    compute = rank.get("compute_ms_median")
    return None if compute is None else max(0.0, rank["step_ms"] - compute)


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run in its own session so a timeout stops torchrun and every rank it started."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BenchError(f"{Path(cmd[-1]).name} ran past {timeout:.0f}s and was stopped") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- dsparse -----------------------------------------------------------------------------
def write_cluster(args, work: Path, limits: list) -> Path:
    links = [x.strip() for x in args.link.split(",") if x.strip()]
    lines = ["name: bench-edge", "master:", "  addr: 127.0.0.1", f"  port: {free_port()}", "boards:"]
    lines += [f"  - {{name: b{i}, local: true, memory_limit: {lim}, link: {links[i % len(links)]}, "
              f"allocator: {args.allocator}}}" for i, lim in enumerate(limits)]
    path = work / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def plan(args, work: Path, cluster: Path, kind: str) -> dict:
    """`kind`: a PLANS value."""
    objective = "memory" if kind == "memory" else "time"
    argv = ["plan", "--cluster", str(cluster), "--model", args.model, "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--objective", objective, "--json"]
    if objective == "time":
        argv += ["--sync-every", str(args.sync_every)] + (["--allow-frozen"] if kind == "frozen" else [])
    res = dsparse(argv, work, args.timeout)
    if res.returncode != 0:
        raise BenchError(f"dsparse plan ({kind}) failed (exit {res.returncode}): {tail(res.stderr)}")
    return json_of(res, "dsparse plan")


def graded_cluster(args, work: Path) -> Path:
    """Plan once with room for everything, then grade the limits (see the docstring)."""
    roomy = write_cluster(args, work, ["8GiB"] * args.boards)
    if args.ungraded:
        return roomy
    first = plan(args, work, roomy, "memory")
    return write_cluster(args, work, sparse_limits(first, args.boards))


def run_dsparse(args, work: Path, cluster: Path, method: str, epochs: int) -> dict:
    """Train under the plan `dsparse plan` just wrote to the state dir."""
    argv = ["train", "--cluster", str(cluster), "--dataset", "digits", "--epochs", str(epochs),
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--lr", str(args.lr), "--master-port", str(free_port()), "--json"]
    if method.endswith("_pbgc"):
        argv += ["--compression", "pbgc"]
    if args.weights:
        argv += ["--weights", args.weights]
    t0 = time.time()
    res = dsparse(argv, work, args.timeout)
    wall = time.time() - t0
    if res.returncode != 0:
        raise BenchError(f"dsparse train ({method}) failed (exit {res.returncode}): "
                         f"{tail(res.stdout if res.stdout.strip().startswith('{') else res.stderr)}")
    summary = json_of(res, f"dsparse train ({method})")
    docs = board_summaries(work, summary)
    boards = [{"name": d["name"], "step_ms": 1000 * d["train_s"] / max(1, d["steps"]), "step_ms_median": None,
               "agg_ms_per_step": d.get("agg_ms_per_step"), "agg_ms_median": d.get("agg_ms_median"),
               "agg_ms_p90": d.get("agg_ms_p90"), "bytes_sent_per_step": d.get("bytes_sent_per_step"),
               "updated_units": d.get("updated_units"), "peak_process_bytes": d.get("peak_process_bytes"),
               "peak_training_bytes": d.get("peak_memory_bytes"), "steps": d["steps"], "train_s": d["train_s"]}
              for d in docs]
    history = next((d.get("history") for d in docs if d.get("rank") == 0), None)
    return method_row(method, boards, summary.get("accuracy"), wall, history)


def pretrain(args, work: Path) -> str:
    out = work / "pretrained.pt"
    cmd = [sys.executable, str(REPO / "bench" / "peers" / "pretrain.py"), "--model", args.model, "--image-size",
           str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.pretrain_steps),
           "--out", str(out)]
    log(f"pretraining on digits 0-4 ({args.pretrain_steps} steps) ...")
    res = _run(cmd, work, args.timeout)
    if res.returncode != 0 or not out.exists():
        raise BenchError(f"pretraining exited {res.returncode}: {tail(res.stderr, 6)}")
    log("  " + res.stderr.strip().splitlines()[-1])
    return str(out)


def on_testbed(args, work: Path) -> tuple[list[dict], list[dict], dict]:
    """`edge-testbed up` in `work`, every method on its boards, `down` always."""
    from wire_check import prepare, testbed

    try:
        testbed(work, "up", *edge_testbed.up_args(args))
        cluster = prepare(work, args.link)
        if args.allocator != "lean":
            doc = yaml.safe_load(cluster.read_text())
            doc.setdefault("defaults", {})["allocator"] = args.allocator
            cluster.write_text(yaml.safe_dump(doc, sort_keys=False))
        if args.profile == "paper7":
            args.link = edge_testbed.links_from_record(work, cluster)
        return run_all(args, work, cluster)
    finally:
        testbed(work, "down")


# --- figures -----------------------------------------------------------------------------
def method_row(method: str, boards: list[dict], accuracy, wall: float, history: list[dict] | None) -> dict:
    """The slowest board sets a synchronous step, the busiest link the wire time. `history`: the
    accuracy at each epoch's end with the training seconds so far (evaluation and start-up excluded)."""
    def most(key):
        vals = [b[key] for b in boards if b.get(key) is not None]
        return max(vals) if vals else None
    return {"name": method, "step_ms": most("step_ms"), "agg_ms_per_step": most("agg_ms_per_step"),
            "agg_ms_median": most("agg_ms_median"), "agg_ms_p90": most("agg_ms_p90"),
            "max_bytes_sent_per_step": most("bytes_sent_per_step"),
            "total_bytes_sent_per_step": sum(b["bytes_sent_per_step"] or 0.0 for b in boards),
            "peak_process_bytes": most("peak_process_bytes"), "peak_training_bytes": most("peak_training_bytes"),
            "exposed_wire_ms": exposed_wire_ms(boards),
            "final_accuracy": accuracy, "steps": boards[0]["steps"], "wall_s": wall, "boards": boards,
            "history": [{k: h.get(k) for k in ("global_step", "train_s", "accuracy")} for h in history or []]}


def exposed_wire_ms(boards: list[dict]) -> float | None:
    """The wire time a synchronous step exposes: the step less the slowest board's compute (a
    board's step less the aggregation it waited for; for the peers, the step under `no_sync()`)."""
    if any(b.get("agg_ms_per_step") is None for b in boards):
        return None
    return max(b["step_ms"] for b in boards) - max(b["step_ms"] - b["agg_ms_per_step"] for b in boards)


def compute_ms(row: dict) -> float | None:
    """The slowest board's compute per step: its step less the aggregation it waited for."""
    if any(b.get("agg_ms_per_step") is None for b in row["boards"]):
        return None
    return max(b["step_ms"] - b["agg_ms_per_step"] for b in row["boards"])


def planned_compute_ms(doc: dict, method: str) -> float | None:
    """The time plan's slowest predicted compute (planning/compute.py); None for memory plans."""
    figures = (doc.get("plans") or {}).get(PLANS.get(method), {}).get("predicted_compute_s") or {}
    known = [s for s in figures.values() if s is not None]
    return 1000 * max(known) if known else None


def model_ms(doc: dict, method: str) -> float | None:
    """The planner's wire model for a method (planning/wire.py): its plan's predicted aggregation,
    or DDP's ring at the same links; None for compression, which the model does not cover."""
    plans = doc.get("plans") or {}
    if method == "ddp":
        s = next((p.get("ddp_agg_s_per_step") for p in plans.values()), None)
    elif method in PLANS and method != "dsparse_time_pbgc":
        s = plans.get(PLANS[method], {}).get("predicted_agg_s_per_step")
    else:
        s = None
    return None if s is None else 1000 * s


def target_accuracy(args, rows: list[dict]) -> float | None:
    """--target-accuracy, else DDP's final accuracy less one point (the issue's "within 1 point")."""
    if args.target_accuracy is not None:
        return args.target_accuracy
    ddp = next((r for r in rows if r["name"] == "ddp" and r["final_accuracy"] is not None), None)
    return ddp["final_accuracy"] - 0.01 if ddp else None


def time_to(target: float | None, history: list[dict]) -> float | None:
    """Training seconds until the first evaluation at or above `target`; None if never."""
    if target is None:
        return None
    return next((h["train_s"] for h in history if h["train_s"] is not None and (h["accuracy"] or 0) >= target), None)


def run_all(args, work: Path, testbed: Path | None = None) -> tuple[list[dict], list[dict], dict]:
    """Every method in turn, --repeat rounds; `testbed`: the emulated cluster's cluster.yaml
    (boards over SSH)."""
    runs: dict[str, list[dict]] = {}
    failures, plans, cluster = [], {}, None
    for rnd in range(args.repeat):
        if args.repeat > 1:
            log(f"round {rnd + 1} of {args.repeat}")
        rows, failed, cluster = _one_round(args, work, testbed, plans, cluster)
        failures += failed
        for r in rows:
            runs.setdefault(r["name"], []).append(r)
    plans.pop("current", None)
    return [median_run(rs) for rs in runs.values()], failures, plans


def median_run(rows: list[dict]) -> dict:
    """The run with the median step time (the lower one of an even count), all figures its own,
    with every run's step time next to it."""
    row = dict(sorted(rows, key=lambda r: r["step_ms"])[(len(rows) - 1) // 2])
    row["step_ms_runs"] = [r["step_ms"] for r in rows]
    row["history_runs"] = [r["history"] for r in rows]
    return row


def _one_round(args, work: Path, testbed: Path | None, plans: dict,
               cluster: Path | None) -> tuple[list[dict], list[dict], Path | None]:
    """Every method once; `plans` (brief, by kind) is filled in; the graded cluster is made on the
    first dsparse method and kept for the next rounds."""
    rows, failures = [], []
    epochs = epochs_for(args)
    for method in args.methods:
        log(f"{method} ...")
        try:
            if method.startswith("ddp"):
                rows.append(run_peer(args, work, method, testbed))
            else:
                if cluster is None:
                    cluster = (edge_testbed.graded_cluster(args, testbed, partial(plan, args, work, testbed))
                               if testbed else graded_cluster(args, work))
                kind = PLANS[method]
                if plans.get("current") != kind:
                    p = plan(args, work, cluster, kind)
                    plans["current"], plans[kind] = kind, _plan_brief(p)
                rows.append(run_dsparse(args, work, cluster, method, epochs))
        except BenchError as exc:
            failures.append({"name": method, "error": str(exc)})
            log(f"  {method}: {exc}")
            continue
        r = rows[-1]
        log(f"  {method}: {r['step_ms']:.0f} ms/step, {_size(r['max_bytes_sent_per_step'])}/step, "
            f"accuracy {_fmt(r['final_accuracy'], '{:.4f}')}, {r['wall_s']:.0f}s")
    return rows, failures, cluster


def _plan_brief(p: dict) -> dict:
    return {"groups": [{"op": g["op"], "ranks": g["ranks"], "units": len(g["units"])} for g in p["groups"]],
            "predicted_agg_s_per_step": p.get("predicted_agg_s_per_step"),
            "ddp_agg_s_per_step": p.get("ddp_agg_s_per_step"), "predicted_step_s": p.get("predicted_step_s"),
            "predicted_compute_s": {d["name"]: d.get("predicted_compute_s_per_step") for d in p["devices"]}}


# --- output ------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    c = doc["config"]
    tb = c.get("testbed")
    where = (f"local boards, link {c['link']} (planning input)" if not tb else
             f"paper7 testbed boards over SSH (links {c['link']})" if tb.get("profile") == "paper7" else
             f"testbed boards over SSH ({tb['cpus']:g} CPU, {tb['memory']}, link {c['link']}, {tb['delay']} delay)")
    start = f", fine-tuned from digits 0-4 ({c['pretrain_steps']} steps)" if c.get("finetune") else ""
    start += f", dsparse allocator {c['allocator']}" if c.get("allocator", "lean") != "lean" else ""
    head = (f"{c['model']} {c['image_size']}x{c['image_size']} on digits{start}, {c['boards']} {where}, "
            f"batch {c['batch_size']}, {c['steps']} steps, seed {c['seed']}, lr {c['lr']:g}\n\n")
    cols = ["method", "step ms", "agg ms/step", "agg ms median / p90", "sent/step (busiest board)",
            "link floor ms/step", "agg / floor", "exposed wire ms (/ model)", "compute ms (/ model)",
            "sent/step (all boards)",
            "peak training", "peak RSS",
            "final accuracy", "training s to target", "wall s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rates = [parse_rate(x) for x in c["link"].split(",") if x.strip()]   # dealt to b0 (rank 0), b1, ...
    for r in doc["methods"]:   # the link that needs longest for what its board sends
        floor = max(1000 * (b["bytes_sent_per_step"] or 0) / rates[i % len(rates)] for i, b in enumerate(r["boards"]))
        spread = f"{_fmt(r.get('agg_ms_median'), '{:.0f}')} / {_fmt(r.get('agg_ms_p90'), '{:.0f}')}"
        cells = [r["name"], _step(r), _fmt(r["agg_ms_per_step"], "{:.1f}"), spread,
                 _size(r["max_bytes_sent_per_step"]), f"{floor:.0f}", _ratio(r["agg_ms_per_step"], floor),
                 _wire(r.get("exposed_wire_ms"), model_ms(doc, r["name"])),
                 _wire(compute_ms(r), planned_compute_ms(doc, r["name"])),
                 _size(r["total_bytes_sent_per_step"]), _size(r["peak_training_bytes"]),
                 _size(r["peak_process_bytes"]), _fmt(r["final_accuracy"], "{:.2%}"),
                 _reached(r), _fmt(r["wall_s"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    fails = [f"\nfailed: {f['name']}: {f['error']}" for f in doc["failed"]]
    target = doc.get("target_accuracy")
    foot = (f"\ntarget accuracy {target:.2%} (DDP's final less one point unless --target-accuracy); training "
            "seconds exclude evaluation and start-up; - : not reached in the run\n") if target is not None else ""
    return head + "\n".join(lines) + "\n" + foot + "".join(fails)


def _ratio(agg_ms: float | None, floor_ms: float) -> str:
    return "-" if agg_ms is None or floor_ms <= 0 else f"{agg_ms / floor_ms:.2f}x"


def _wire(exposed: float | None, model: float | None) -> str:
    if exposed is None:
        return "-"
    return f"{exposed:.0f} ({_ratio(exposed, model) if model else '-'})"


def _step(row: dict) -> str:
    """The step time; with --repeat, every run's range after it."""
    runs = row.get("step_ms_runs") or []
    spread = f" ({min(runs):.0f}-{max(runs):.0f}, {len(runs)} runs)" if len(runs) > 1 else ""
    return _fmt(row["step_ms"], "{:.1f}") + spread


def _reached(row: dict) -> str:
    t = row.get("time_to_target_s")
    return "-" if t is None else f"{t:.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsparse-bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        where = "testbed boards over SSH" if args.testbed else "local boards"
        log(f"{args.model}, {args.boards} {where}, {args.steps} steps, in {work}")
        if args.finetune:
            args.weights = pretrain(args, work)
        rows, failures, plans = on_testbed(args, work) if args.testbed else run_all(args, work)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    target = target_accuracy(args, rows)
    for r in rows:
        r["time_to_target_s"] = time_to(target, r["history"])
        if "history_runs" in r:
            r["time_to_target_s_runs"] = [time_to(target, h) for h in r.pop("history_runs")]
    doc = {"methods": rows, "failed": failures, "plans": plans, "target_accuracy": target, "config": {
        "dataset": "digits", "model": args.model, "image_size": args.image_size, "boards": args.boards,
        "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed, "lr": args.lr, "link": args.link,
        "sync_every": args.sync_every, "allocator": args.allocator, "repeat": args.repeat,
        "ungraded": args.ungraded, "smoke": args.smoke, "host_cpus": os.cpu_count(),
        "finetune": args.finetune, "pretrain_steps": args.pretrain_steps if args.finetune else None,
        "testbed": ({"profile": "paper7"} if args.profile == "paper7" else
                    {"memory": args.memory, "cpus": args.cpus, "delay": args.delay}) if args.testbed else None,
        "bench_s": time.time() - t0, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    args.out.with_suffix(".md").write_text(table)
    print(json.dumps(doc, indent=2) if args.json else table)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
