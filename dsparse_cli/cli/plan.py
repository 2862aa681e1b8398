"""`dsparse plan`: measure the model's per-unit costs and give each board a sparse-update plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dsparse_cli.cli import ClusterOpt, JsonOpt, VerboseOpt, app, done
from dsparse_cli.cli.common import inventory, print_json, unit_ranges
from dsparse_cli.console import console, info, success, warning
from dsparse_cli.errors import EXIT_OK, ConfigError
from dsparse_cli.inventory import Inventory, format_size

PROBE_FRESH_S = 24 * 3600


@app.command()
def plan(
    cluster: Optional[Path] = ClusterOpt,
    model: str = typer.Option("mobilenet_v2", help="mobilenet_v2, mobilenet_v3_small, resnet18, shufflenet_v2_x0_5, tiny_cnn."),
    batch_size: int = typer.Option(64, "--batch-size", help="Per-board batch size."),
    image_size: int = typer.Option(32, "--image-size", help="Input height and width."),
    num_classes: int = typer.Option(10, "--num-classes"),
    optimizer: str = typer.Option("sgd-momentum", help="sgd, sgd-momentum or adam."),
    headroom: float = typer.Option(0.15, help="Fraction of usable memory kept free."),
    sync_every: int = typer.Option(1, "--sync-every", help="Broadcast updated weights every N steps."),
    importance: str = typer.Option("depth", help="depth (later layers first) or grad (measured)."),
    allow_frozen: bool = typer.Option(False, "--allow-frozen", help="Allow units no board trains (fine-tuning)."),
    exclude_small: bool = typer.Option(False, "--exclude-small", help="Leave out boards too small to train."),
    probe_first: bool = typer.Option(False, "--probe", help="Probe the boards first if the cache is missing or old."),
    push: bool = typer.Option(False, "--push", help="Copy each board's plan to its workdir."),
    verify: bool = typer.Option(False, "--verify", help="Run one real step per board; show measured vs predicted."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout"),
    accept_new_host_keys: bool = typer.Option(False, "--accept-new-host-keys"),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Plan which units each board trains, and the AllReduce/Broadcast groups that aggregate them.

    Budgets and peaks are whole-process bytes: the measured process base plus training memory."""
    inv = inventory(cluster, quiet=json_out)
    if probe_first:
        _probe_if_needed(inv, connect_timeout, accept_new_host_keys, json_out)
    doc = make_plan(inv, model=model, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
                    optimizer=optimizer, headroom=headroom, sync_every=sync_every, importance=importance,
                    allow_frozen=allow_frozen, exclude_small=exclude_small, quiet=json_out)
    if verify:
        _verify(doc, json_out)
    if push:
        _push(inv, doc, connect_timeout, accept_new_host_keys, json_out)
    if json_out:
        print_json(doc)
    else:
        _show(doc)
    done(EXIT_OK)


def make_plan(inv: Inventory, *, model: str = "mobilenet_v2", batch_size: int = 64, image_size: int = 32,
              num_classes: int = 10, optimizer: str = "sgd-momentum", headroom: float = 0.15,
              sync_every: int = 1, importance: str = "depth", allow_frozen: bool = False,
              exclude_small: bool = False, quiet: bool = False) -> dict:
    """Profile (cached), plan, write .dsparse/plan.json; return the plan document."""
    from dsparse_cli.planning import plan_cluster, write_plan

    facts = _budget_sources(inv)
    with _progress(f"measuring {model} (batch {batch_size}, {image_size}x{image_size}, {optimizer})", quiet):
        doc = plan_cluster(cluster=inv.name, boards=[(b.name, facts[b.name]) for b in inv.boards],
                           state_dir=inv.state_dir, model=model, num_classes=num_classes, image_size=image_size,
                           batch_size=batch_size, optimizer=optimizer, headroom=headroom, sync_every=sync_every,
                           importance=importance, allow_frozen=allow_frozen, exclude_small=exclude_small)
    write_plan(inv.state_dir / "plan.json", doc)
    for e in doc.get("excluded", []):
        warning(f"board {e['name']} is left out of the plan: {e['reason']}")
    return doc


def _progress(message: str, quiet: bool):
    import contextlib

    return contextlib.nullcontext() if quiet else console.status(message, spinner="dots")


def _budget_sources(inv: Inventory) -> dict[str, dict]:
    """Per board: usable memory and the probe facts the plan records. From the probe cache, else
    the inventory's memory_limit; a board with neither is an error."""
    from dsparse_cli.probing.collect import read_cache

    cache = read_cache(inv)
    probed = {b["name"]: b for b in (cache or {}).get("boards", []) if b.get("ok")}
    facts = {}
    for board in inv.boards:
        p = probed.get(board.name)
        if p and p.get("usable_memory_bytes"):
            facts[board.name] = {"usable_memory_bytes": p["usable_memory_bytes"], "source": "probe",
                                 "torch": p.get("torch"), "cuda": bool(p.get("cuda")),
                                 "kind": p.get("kind"), "arch": p.get("arch")}
        elif board.memory_limit:
            facts[board.name] = {"usable_memory_bytes": board.memory_limit, "source": "inventory",
                                 "torch": None, "cuda": False, "kind": board.kind, "arch": None}
        else:
            raise ConfigError(f"no probe result and no memory_limit for board {board.name}",
                              "run `dsparse probe` (or `dsparse plan --probe`), or set memory_limit")
    return facts


def _probe_if_needed(inv: Inventory, connect_timeout: float, accept_new: bool, quiet: bool) -> None:
    from dsparse_cli.probing.collect import probe_all, read_cache, write_cache

    if read_cache(inv, max_age_s=PROBE_FRESH_S):
        return
    if not quiet:
        info("probing boards first (no fresh probe cache)")
    infos = probe_all(inv, connect_timeout=connect_timeout, accept_new_host_keys=accept_new)
    write_cache(inv, infos)
    failed = [i for i in infos if not i.ok]
    if failed:
        raise ConfigError(f"board {failed[0].name} could not be probed: {failed[0].error}",
                          "fix it or remove it from cluster.yaml", exit_code=1)


def _verify(doc: dict, quiet: bool) -> None:
    """One real training step per device, in a fresh process each; measured vs predicted."""
    from dsparse_cli.planning.verify import merge_verify, verify_plan

    def progress(row: dict) -> None:
        if not quiet:
            info(f"verified rank {row['rank']}: measured training {format_size(row['measured_training_bytes'])}"
                 f" vs predicted {format_size(row['predicted_training_bytes'])} ({row['error_pct']:+.1f}%)")

    rows = verify_plan(doc, progress=progress)
    merge_verify(doc, rows)
    off = [r for r in rows if not r["within_tolerance"]]
    if off and not quiet:
        warning(f"{len(off)} device(s) measured more than 10% off the prediction: "
                + ", ".join(f"rank {r['rank']} {r['error_pct']:+.1f}%" for r in off))


def _push(inv: Inventory, doc: dict, connect_timeout: float, accept_new: bool, quiet: bool) -> None:
    """Copy the plan to every board's workdir (SFTP or local copy)."""
    import json
    import tempfile

    from dsparse_cli.remote import connect, fan_out

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "plan.json"
        local.write_text(json.dumps(doc, indent=1, sort_keys=True))
        included = {d["name"] for d in doc["devices"]}

        def push_one(target):
            t = connect(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new)
            try:
                dest = f"{target.workdir.rstrip('/')}/plan.json"
                t.put(str(local), dest)
                return dest
            finally:
                t.close()

        results = fan_out([b for b in inv.boards if b.name in included], push_one)
    failed = [r for r in results if not r.ok]
    if failed:
        raise ConfigError(f"could not push the plan to board {failed[0].name}: {failed[0].error}", exit_code=1)
    if not quiet:
        success(f"plan pushed to {len(results)} boards")


def _show(doc: dict) -> None:
    names = {u["index"]: u["name"] for u in doc["units"]}
    t = Table(title=f"plan: {doc['model']}, batch {doc['batch_size']}, {doc['optimizer']} "
                    f"({len(doc['units'])} units)", title_justify="left")
    for col in ("rank", "board", "budget", "predicted peak", "full-update peak", "training saving", "units updated"):
        t.add_column(col)
    verify = any("measured_peak_bytes" in d for d in doc["devices"])
    if verify:
        t.add_column("measured training / predicted")
    for d in doc["devices"]:
        full_t, pred_t = d.get("full_update_training_bytes"), d.get("predicted_training_bytes")
        saving = f"{100 * (1 - pred_t / full_t):.0f}%" if full_t and pred_t else "-"
        units = d["units"]
        first = f" ({names[units[0]]}..{names[units[-1]]})" if units else ""
        row = [str(d["rank"]), d["name"], format_size(d["budget_bytes"]), format_size(d["predicted_peak_bytes"]),
               format_size(d["full_update_peak_bytes"]), saving, unit_ranges(units) + first]
        if verify:
            m = d.get("measured_training_bytes")
            row.append(f"{format_size(m)} / {format_size(pred_t)} ({100 * (m / pred_t - 1):+.1f}%)" if m and pred_t else "-")
        t.add_row(*row)
    console.print(t)
    if doc.get("launcher_bytes"):
        console.print(f"peaks are the worker's; each budget also holds torchrun's agent "
                      f"({format_size(doc['launcher_bytes'])} of private memory)", highlight=False)
    g = Table(title="aggregation groups (created in this order on every rank)", title_justify="left")
    for col in ("group", "op", "ranks", "root", "units", "bytes/step"):
        g.add_column(col)
    for grp in doc["groups"]:
        g.add_row(str(grp.get("id", "")), grp["op"], ",".join(map(str, grp["ranks"])), str(grp.get("root", "")),
                  unit_ranges(grp["units"]), format_size(grp["bytes_per_step"]))
    console.print(g)
