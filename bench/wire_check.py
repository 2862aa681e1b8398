"""The wire model against a measured run on the emulated cluster (needs root).

    sudo .venv/bin/python bench/wire_check.py                 # table; bench/results/wire_check.json
    sudo .venv/bin/python bench/wire_check.py --rate 20mbit --boards 3 --steps 10

Builds `scripts/edge-testbed up --boards N --rate R` (each board its own namespace, sshd, memory
cgroup and emulated link), writes `link: R` into its cluster.yaml and gives the boards graded
training allowances (100 %, 60 %, 35 %, 15 % of the way from training the head alone to a full
update) so the plan nests (board 0 trains everything, the others fewer units: both an
all-reduce and a broadcast cross the wire). Then `dsparse probe`, `plan --objective memory`, and
`train --dataset digits --max-steps K`; per board it puts the plan's predicted bytes and seconds
per step (`planning/wire.py`) next to what the worker measured (`bytes_per_step`,
`agg_ms_per_step`). The issue asks for within 20 %.

What the measured time holds that the model does not: the dense all-reduce overlaps backward
(the part hidden behind compute is not in `agg_ms`), waiting for a slower board's compute counts
as aggregation (the boards share this machine's cores), and the first steps' connection set-up.
`down` always runs at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _runner import BenchError, dsparse, free_port, save_and_show  # noqa: E402

SHARES = (1.0, 0.6, 0.35, 0.15)   # each board's allowance: this share of the way from the least to a full update


def testbed(directory: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "edge-testbed"), *args, "--dir", str(directory)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise BenchError(f"edge-testbed {args[0]} failed: {(r.stderr or r.stdout).strip()[-300:]}")


def bench_on_testbed(name: str, up_args: list[str], rate: str, as_json: bool, table, body) -> int:
    """`edge-testbed up UP_ARGS` in a scratch dir, `body(directory, cluster.yaml)` -> the results
    document, `down` always; saved and shown as bench/results/NAME.json. The exit status."""
    with tempfile.TemporaryDirectory(prefix=f"{name.replace('_', '-')}-") as tmp:
        directory = Path(tmp)
        try:
            testbed(directory, "up", *up_args)
            doc = body(directory, prepare(directory, rate))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            testbed(directory, "down")
    return save_and_show(name, doc, as_json, table)


def prepare(directory: Path, rate: str) -> Path:
    """The testbed's cluster.yaml with the link rate."""
    path = directory / "cluster.yaml"
    doc = yaml.safe_load(path.read_text())
    doc.setdefault("defaults", {})["link"] = rate
    doc["master"] = {**doc.get("master", {}), "port": free_port()}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def grade(path: Path, least: int, full: int, shares=SHARES) -> None:
    """Graded training allowances (`shares` of the way from the head alone to a full update) so the
    plan nests."""
    doc = yaml.safe_load(path.read_text())
    for board, share in zip(doc["boards"], shares):
        board["training_memory"] = f"{(least + share * (full - least)) / 2**20 + 1:.1f}MiB"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def cli_for(cluster: Path):
    """`dsparse -c CLUSTER ARGS` run in the cluster's folder; a failure is a BenchError."""
    def cli(*argv, timeout=1800):
        r = dsparse(["-c", str(cluster), *argv], cluster.parent, timeout)
        if r.returncode:
            raise BenchError(f"dsparse {argv[0]} failed: {(r.stderr or r.stdout).strip()[-400:]}")
        return r
    return cli


def run(cluster: Path, args) -> dict:
    cli = cli_for(cluster)
    cli("probe", "--accept-new-host-keys", timeout=300)
    plan_args = ["plan", "--model", args.model, "--batch-size", str(args.batch_size), "--json"]
    first = json.loads(cli(*plan_args).stdout)
    grade(cluster, first["min_peak_bytes"] - first["base_bytes"], first["devices"][0]["full_update_training_bytes"])
    plan = json.loads(cli(*plan_args).stdout)
    train = json.loads(cli("train", "--dataset", "digits", "--max-steps", str(args.steps), "--json",
                           timeout=1800).stdout)
    return compare(plan, train)


def compare(plan: dict, train: dict) -> dict:
    measured = {b["name"]: b for b in train["boards"]}
    rows = []
    for d in plan["devices"]:
        m = measured.get(d["name"], {})
        pred_s, meas_ms = d.get("predicted_link_s_per_step"), m.get("agg_ms_per_step")
        rows.append({"board": d["name"], "units": len(d["units"]), "budget_bytes": d["budget_bytes"],
                     "allowance_bytes": plan["probe"][d["name"]].get("training_allowance_bytes"),
                     "predicted_sent_bytes": d["predicted_sent_bytes_per_step"], "measured_sent_bytes": m.get("bytes_per_step"),
                     "predicted_s": pred_s, "measured_agg_s": meas_ms / 1000 if meas_ms is not None else None})
    for r in rows:
        r["time_ratio"] = r["measured_agg_s"] / r["predicted_s"] if r["predicted_s"] and r["measured_agg_s"] else None
    return {"predicted_agg_s_per_step": plan.get("predicted_agg_s_per_step"), "rows": rows,
            "accuracy": train.get("accuracy")}


def table(doc: dict) -> str:
    lines = ["| board | units | bytes sent/step predicted | measured | link s/step predicted | agg s/step measured | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ratio = f"{r['time_ratio']:.2f}" if r["time_ratio"] else "-"
        lines.append(f"| {r['board']} | {r['units']} | {r['predicted_sent_bytes'] / 2**20:.2f} MiB | "
                     f"{(r['measured_sent_bytes'] or 0) / 2**20:.2f} MiB | {r['predicted_s'] or 0:.3f} | "
                     f"{r['measured_agg_s'] or 0:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", type=int, default=3)
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--delay", default="1ms")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    up = ["--boards", str(args.boards), "--rate", args.rate, "--delay", args.delay, "--memory", "1500MiB"]
    return bench_on_testbed("wire_check", up, args.rate, args.json, table, lambda _, cluster: {
        "boards": args.boards, "rate": args.rate, "delay": args.delay, "model": args.model,
        "batch_size": args.batch_size, "steps": args.steps, **run(cluster, args)})


if __name__ == "__main__":
    sys.exit(main())
