"""bench/edge.py's methods on the emulated edge cluster (`--testbed`, needs root).

The boards are `scripts/edge-testbed` boards: each its own network namespace, sshd, memory cgroup
(`--memory`), CPU quota (`--cpus`) and emulated link (`--link`, `--delay`), so bytes cross a
shaped link and a board's speed is its own CPU allowance, not the luck of contention.

`--profile paper7` builds the seven mixed boards of docs/testbed.md instead (their own memory,
CPUs, rates and delays; each board's rate is its `link:`).

* dsparse: the testbed's cluster.yaml with `link:` and graded `training_memory:` allowances (from
  a full update down to 15 % of the way above training the head alone, as the local run grades
  its limits), `dsparse probe`, then plan and train over SSH as for any board.
* the DDP peers: `torchrun --nnodes N --node-rank I --nproc-per-node 1` started on every board
  over SSH (the system client, the testbed's key and known_hosts), rendezvous on b0; the same
  script as the local run (bench/peers/ddp_train.py). Rank 0 writes its JSON on the filesystem
  the boards share with this machine.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import yaml

from _runner import BenchError, free_port, tail
from compression import allocator_bytes, graded_shares
from wire_check import cli_for, grade

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / "bench" / "peers" / "ddp_train.py"


def up_args(args) -> list[str]:
    if args.profile == "paper7":   # each board its own memory, CPUs, rate and delay
        return ["--profile", "paper7"]
    return ["--boards", str(args.boards), "--memory", args.memory, "--cpus", str(args.cpus),
            "--rate", args.link, "--delay", args.delay]


def links_from_record(work: Path, cluster: Path) -> str:
    """Write each board's emulated rate into cluster.yaml as its `link:` (paper7's differ);
    -> the rates as a comma list, b0 first (what --link would have said)."""
    rates = [f"{b['rate_bps']}bit" for b in json.loads((work / "testbed.json").read_text())["boards"]]
    doc = yaml.safe_load(cluster.read_text())
    for board, rate in zip(doc["boards"], rates):
        board["link"] = rate
    cluster.write_text(yaml.safe_dump(doc, sort_keys=False))
    return ",".join(rates)


def graded_cluster(args, cluster: Path, plan) -> Path:
    """Probe, plan once with the boards' cgroup limits (`plan(kind)`: edge.py's), then give graded
    training allowances."""
    cli_for(cluster)("probe", "--accept-new-host-keys", timeout=args.timeout)
    if args.ungraded:   # every board's cgroup limit is its budget
        return cluster
    first = plan("memory")
    full = max(d["full_update_training_bytes"] for d in first["devices"])
    least = first["min_peak_bytes"] - first["base_bytes"] + allocator_bytes(first)
    grade(cluster, least, full, graded_shares(args.boards))
    return cluster


def run_peer(args, work: Path, cluster: Path, method: str, peer_argv: list[str]) -> tuple[dict, float]:
    """torchrun on every board over SSH -> (rank 0's JSON document, wall seconds)."""
    doc = yaml.safe_load(cluster.read_text())
    boards, d = doc["boards"], doc.get("defaults", {})
    out = work / f"{method}.json"
    out.unlink(missing_ok=True)
    master, port = boards[0]["host"], free_port()
    procs = []
    t0 = time.time()
    for i, b in enumerate(boards):
        remote = (f"cd {shlex.quote(str(REPO))} && {shlex.quote(d['python'])} -m torch.distributed.run "
                  f"--nnodes {len(boards)} --node-rank {i} --nproc-per-node 1 --master-addr {master} "
                  f"--master-port {port} {shlex.quote(str(PEER))} "
                  + " ".join(shlex.quote(a) for a in [*peer_argv, "--out", str(out)]))
        ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={d['known_hosts']}",
               "-o", "StrictHostKeyChecking=yes", "-i", d["identity_file"], f"{d.get('user', 'root')}@{b['host']}",
               remote]
        procs.append(subprocess.Popen(ssh, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    for b, p in zip(boards, procs):
        try:
            _, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            errors.append(f"{b['name']}: ran past {args.timeout:.0f}s")
            continue
        if p.returncode:
            errors.append(f"{b['name']}: exit {p.returncode}: {tail(err, 12)}")
    wall = time.time() - t0
    if errors or not out.exists():
        raise BenchError(f"torchrun {method} over SSH failed: " + "; ".join(errors or ["rank 0 wrote nothing"]))
    return json.loads(out.read_text()), wall
