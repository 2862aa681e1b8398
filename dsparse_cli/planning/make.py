"""The cluster's plan for `dsparse plan` and `train`: budgets from the probe cache or the inventory,
the plan written to .dsparse/plan.json, then optionally verified on this machine and pushed to the
boards. No Typer and no tables: progress and warnings go through the console helpers."""

from __future__ import annotations

import time
from pathlib import Path

from dsparse_cli.console import info, spinner, success, warning
from dsparse_cli.errors import ConfigError
from dsparse_cli.inventory import Inventory
from dsparse_cli.sizes import format_size

PROBE_FRESH_S = 24 * 3600


def make_plan(inv: Inventory, *, model: str = "mobilenet_v2", batch_size: int = 64, image_size: int = 32,
              num_classes: int = 10, optimizer: str = "sgd-momentum", headroom: float = 0.15,
              sync_every: int = 1, importance: str = "depth", allow_frozen: bool = False,
              exclude_small: bool = False, objective: str = "auto", quiet: bool = False) -> dict:
    """Profile (cached), plan, write .dsparse/plan.json; return the plan document. `plan_cluster`
    checks every option before anything is measured."""
    from dsparse_cli.planning import plan_cluster, write_plan

    facts = _budget_sources(inv)
    with spinner(f"measuring {model} (batch {batch_size}, {image_size}x{image_size}, {optimizer})", quiet):
        doc = plan_cluster(cluster=inv.name, boards=[(b.name, facts[b.name]) for b in inv.boards],
                           state_dir=inv.state_dir, model=model, num_classes=num_classes, image_size=image_size,
                           batch_size=batch_size, optimizer=optimizer, headroom=headroom, sync_every=sync_every,
                           importance=importance, allow_frozen=allow_frozen, exclude_small=exclude_small,
                           launcher=inv.launcher, objective=objective)
    write_plan(inv.state_dir / "plan.json", doc)
    for e in doc.get("excluded", []):
        warning(f"board {e['name']} is left out of the plan: {e['reason']}")
    return doc


def _budget_sources(inv: Inventory) -> dict[str, dict]:
    """Per board: usable memory and the probe facts the plan records. From the probe cache, else
    the inventory's memory_limit; a board with neither is an error."""
    from dsparse_cli.probing.collect import read_cache

    cache = read_cache(inv)
    probed = cache.answered() if cache else {}
    facts = {}
    for board in inv.boards:
        p = probed.get(board.name)
        if p and p.stale_error:
            age_min = (time.time() - (p.probed_at or 0)) / 60
            warning(f"board {board.name} did not answer the last probe ({p.stale_error}); "
                    f"planning with its result from {age_min:.0f} min ago")
        if p and p.usable_memory_bytes:
            facts[board.name] = {"usable_memory_bytes": p.usable_memory_bytes, "source": "probe",
                                 "torch": p.torch, "cuda": p.cuda, "kind": p.kind, "arch": p.arch}
        elif board.memory_limit or board.training_memory:
            facts[board.name] = {"usable_memory_bytes": board.memory_limit, "source": "inventory",
                                 "torch": None, "cuda": False, "kind": board.kind, "arch": None}
        else:
            raise ConfigError(f"no probe result and no memory_limit for board {board.name}",
                              "run `dsparse probe` (or `dsparse plan --probe`), or set memory_limit")
        if board.training_memory:
            facts[board.name]["training_allowance_bytes"] = board.training_memory
        if board.allocator != "lean":
            facts[board.name]["allocator"] = board.allocator
        if p and p.cpu_quota:
            facts[board.name]["cpu_quota"] = p.cpu_quota   # the time objective's CPU share
        link = board.link or (p.link_bytes_per_s if p else None)   # cluster.yaml's, else measured
        if link:
            facts[board.name]["link_bytes_per_s"] = link
    return facts


def probe_if_needed(inv: Inventory, connect_timeout: float, accept_new: bool, quiet: bool) -> None:
    """Probe every board unless the probe cache is younger than PROBE_FRESH_S."""
    from dsparse_cli.probing.collect import probe_all, read_cache, write_cache

    if read_cache(inv, max_age_s=PROBE_FRESH_S):
        return
    if not quiet:
        info("probing boards first (no fresh probe cache)")
    infos = probe_all(inv, connect_timeout=connect_timeout, accept_new_host_keys=accept_new)
    write_cache(inv, infos)
    cache = read_cache(inv)
    answered = cache.answered() if cache else {}   # a board that answered before keeps that result
    failed = [i for i in infos if i.name not in answered]
    if failed:
        raise ConfigError(f"board {failed[0].name} could not be probed: {failed[0].error}",
                          "fix it or remove it from cluster.yaml", exit_code=1)


def verify(inv: Inventory, doc: dict, connect_timeout: float, accept_new: bool, quiet: bool) -> None:
    """One real training step per planned device, in a fresh process on its board (SSH boards
    over SSH, local ones here); the measured memory goes into `doc` next to the prediction."""
    from dsparse_cli.planning.verify import merge_verify, verify_plan
    from dsparse_cli.remote import connect

    def progress(row: dict) -> None:
        if not quiet:
            info(f"verified rank {row['rank']} ({row['name']}, on host {row.get('host') or '?'}): measured "
                 f"training {format_size(row['measured_training_bytes'])} vs predicted "
                 f"{format_size(row['predicted_training_bytes'])} ({row['error_pct']:+.1f}%)")

    def reach(target):
        return connect(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new)

    boards = {b.name: b for b in inv.boards}
    rows = verify_plan(doc, boards=boards, connect=reach, progress=progress)
    merge_verify(doc, rows)
    off = [r for r in rows if not r["within_tolerance"]]
    if off and not quiet:
        warning(f"{len(off)} device(s) measured more than 10% off the prediction: "
                + ", ".join(f"rank {r['rank']} {r['error_pct']:+.1f}%" for r in off))


def push(inv: Inventory, doc: dict, connect_timeout: float, accept_new: bool, quiet: bool) -> None:
    """Copy the plan to every planned board's workdir (SFTP or local copy)."""
    import json
    import tempfile

    from dsparse_cli.remote import connect, fan_out

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "plan.json"
        local.write_text(json.dumps(doc, indent=1, sort_keys=True))
        included = {d["name"] for d in doc["devices"]}

        def push_one(target):
            with connect(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new) as t:
                dest = f"{target.workdir.rstrip('/')}/plan.json"
                t.put(str(local), dest)
                return dest

        results = fan_out([b for b in inv.boards if b.name in included], push_one)
    failed = [r for r in results if not r.ok]
    if failed:
        raise ConfigError(f"could not push the plan to board {failed[0].name}: {failed[0].error}", exit_code=1)
    if not quiet:
        success(f"plan pushed to {len(results)} boards")
