"""Helpers shared by the command modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from dsparse_cli.console import info
from dsparse_cli.inventory import Inventory, load_inventory


def inventory(cluster: Optional[Path], *, quiet: bool = False) -> Inventory:
    """Load --cluster (or ./cluster.yaml); say so when falling back to the built-in demo cluster."""
    inv = load_inventory(cluster)
    if inv.builtin and not quiet:
        info("no cluster.yaml here: using the built-in demo cluster of "
             f"{len(inv.boards)} local simulated boards (see cluster.yaml.example)")
    return inv


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def unit_ranges(units: list[int]) -> str:
    """[3,4,5,9] -> '3-5,9'."""
    out, start = [], None
    for i, u in enumerate(units):
        if start is None:
            start = u
        if i + 1 == len(units) or units[i + 1] != u + 1:
            out.append(f"{start}" if start == u else f"{start}-{u}")
            start = None
    return ",".join(out) or "none"
