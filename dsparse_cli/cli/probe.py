"""`dsparse probe`: reach every board in parallel and measure what it really has."""

from __future__ import annotations

import typer

from dsparse_cli.cli.app import AcceptNewOpt, app, done, inventory, options, print_json
from dsparse_cli.errors import EXIT_BOARD_FAILED, EXIT_OK

CONTRACT_KEYS = ("name", "ok", "error", "kind", "model", "arch", "cpus", "mem_total_bytes",
                 "mem_available_bytes", "cgroup_limit_bytes", "usable_memory_bytes", "python",
                 "torch", "iface", "address")


@app.command()
def probe(accept_new_host_keys: bool = AcceptNewOpt,
          links: bool = typer.Option(False, "--links", help="Also time a short transfer from each board to the "
                                     "master board: each board's link rate, for `plan`.")) -> None:
    """Measure every board: memory (with cgroup limits), model, CPUs, torch, network.

    Exit 0 when every board answered, 1 when any failed. Results are cached in
    .dsparse/probe.json next to the inventory."""
    from dsparse_cli import render
    from dsparse_cli.console import info, show, spinner
    from dsparse_cli.probing.collect import probe_all, write_cache

    inv = inventory()
    with spinner(f"probing {len(inv.boards)} boards...", quiet=options.json):
        infos = probe_all(inv, connect_timeout=options.connect_timeout, accept_new_host_keys=accept_new_host_keys)
    if links:
        infos = _with_links(inv, infos, accept_new_host_keys)
    cache = write_cache(inv, infos)
    if options.json:
        print_json({"cluster": inv.name, "boards": [_contract(i.to_dict()) for i in infos]})
    else:
        show(render.probe_table(inv.name, infos))
        info(f"cached in {cache}")
    done(EXIT_OK if all(i.ok for i in infos) else EXIT_BOARD_FAILED)


def _with_links(inv, infos, accept_new_host_keys: bool):
    """The probe results with each board's measured link; nothing is cached when a board fails."""
    from dataclasses import replace

    from dsparse_cli.console import spinner
    from dsparse_cli.errors import RemoteError
    from dsparse_cli.probing.links import measure_links

    failed = [i for i in infos if not i.ok]
    if failed:
        raise RemoteError(f"board {failed[0].name} could not be probed: {failed[0].error}",
                          "fix it before measuring links (nothing was cached)")
    with spinner("timing each board's link to the master...", quiet=options.json):
        rates = measure_links(inv, connect_timeout=options.connect_timeout, accept_new_host_keys=accept_new_host_keys)
    return [replace(i, link_bytes_per_s=rates[i.name]) for i in infos]


def _contract(board: dict) -> dict:
    """Contract keys first (always present), then every extra fact the probe found."""
    head = {k: board.get(k) for k in CONTRACT_KEYS}
    return {**head, **{k: v for k, v in board.items() if k not in head}}
