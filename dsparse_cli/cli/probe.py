"""`dsparse probe`: reach every board in parallel and measure what it really has."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from dsparse_cli.cli import ClusterOpt, JsonOpt, VerboseOpt, app, done
from dsparse_cli.cli.common import inventory, print_json
from dsparse_cli.console import console, info
from dsparse_cli.errors import EXIT_BOARD_FAILED, EXIT_OK
from dsparse_cli.inventory import format_size

CONTRACT_KEYS = ("name", "ok", "error", "kind", "model", "arch", "cpus", "mem_total_bytes",
                 "mem_available_bytes", "cgroup_limit_bytes", "usable_memory_bytes", "python",
                 "torch", "iface", "address")


@app.command()
def probe(
    cluster: Optional[Path] = ClusterOpt,
    json_out: bool = JsonOpt,
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="Seconds to wait for each board."),
    accept_new_host_keys: bool = typer.Option(
        False, "--accept-new-host-keys", help="Record host keys of boards not yet in ~/.ssh/known_hosts."),
    verbose: bool = VerboseOpt,
) -> None:
    """Measure every board: memory (incl. cgroup limits), model, CPUs, torch, network.

    Exit 0 when every board answered, 1 when any failed. Results are cached in
    .dsparse/probe.json next to the inventory."""
    from dsparse_cli.probing.collect import probe_all, write_cache

    inv = inventory(cluster, quiet=json_out)
    with console.status(f"probing {len(inv.boards)} boards...", spinner="dots") if not json_out else _null():
        infos = probe_all(inv, connect_timeout=connect_timeout, accept_new_host_keys=accept_new_host_keys)
    cache = write_cache(inv, infos)
    if json_out:
        print_json({"cluster": inv.name, "boards": [_contract(i.model_dump(mode="json")) for i in infos]})
    else:
        console.print(_table(inv.name, infos))
        info(f"cached in {cache}")
    done(EXIT_OK if all(i.ok for i in infos) else EXIT_BOARD_FAILED)


def _contract(board: dict) -> dict:
    """Contract keys first (always present), then every extra fact the probe found."""
    head = {k: board.get(k) for k in CONTRACT_KEYS}
    return {**head, **{k: v for k, v in board.items() if k not in head}}


def _table(name: str, infos) -> Table:
    t = Table(title=f"cluster {name}", title_justify="left")
    for col in ("board", "kind", "model", "arch", "cpus", "mem total", "available", "cgroup limit",
                "usable", "torch", "address"):
        t.add_column(col, overflow="fold")
    for i in infos:
        if not i.ok:
            t.add_row(f"[red]{i.name}[/]", f"[red]failed: {escape(i.error)}[/]", *[""] * 9)
            continue
        t.add_row(i.name, i.kind or "-", i.model or "-", i.arch or "-", str(i.cpus or "-"),
                  format_size(i.mem_total_bytes), format_size(i.mem_available_bytes),
                  format_size(i.cgroup_limit_bytes), f"[bold]{format_size(i.usable_memory_bytes)}[/]",
                  i.torch or "[yellow]missing[/]", f"{i.address or '-'} ({i.iface or '-'})")
    return t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
