"""Control side of the probe: run the board script on every board in parallel, keep the cache."""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dsparse_cli.errors import ConfigError, RemoteError
from dsparse_cli.inventory import Inventory, Target
from dsparse_cli.probing import board_script_source
from dsparse_cli.probing.parse import DeviceInfo, parse_probe_output
from dsparse_cli.remote import connect, fan_out

PROBE_TIMEOUT_S = 120.0  # importing torch on a Raspberry Pi can take a minute
CACHE_NAME = "probe.json"


def probe_board(target: Target, master: str, *, connect_timeout: float, accept_new_host_keys: bool) -> DeviceInfo:
    """Run the stdlib probe script with the board's python; one DeviceInfo or a RemoteError."""
    transport = connect(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new_host_keys)
    try:
        argv = [target.python, "-", "--master", master, "--workdir", target.workdir]
        if target.memory_limit:
            argv += ["--memory-limit", str(target.memory_limit)]
        result = transport.run(_quote(argv), timeout=PROBE_TIMEOUT_S, input=board_script_source().encode())
    finally:
        transport.close()
    if result.rc in (126, 127):
        raise RemoteError(f"python {target.python!r} not found on board {target.name}",
                          "install python3 there or set `python:` for the board in cluster.yaml")
    if result.rc != 0:
        raise RemoteError(f"probe script failed on board {target.name} (exit {result.rc}): "
                          f"{result.last_error('no output')[:200]}")
    return parse_probe_output(target.name, result.stdout)


def _quote(argv: list[str]) -> str:
    # A leading ~ must stay unquoted so the board's shell expands it.
    return " ".join(a if a.startswith("~/") and shlex.quote(a[2:]) == a[2:] else shlex.quote(a) for a in argv)


def probe_all(inv: Inventory, *, connect_timeout: float, accept_new_host_keys: bool) -> list[DeviceInfo]:
    results = fan_out(inv.boards, lambda t: probe_board(t, inv.master_addr, connect_timeout=connect_timeout,
                                                        accept_new_host_keys=accept_new_host_keys))
    return [r.value if r.ok else DeviceInfo.failed(r.name, r.error) for r in results]


@dataclass
class ProbeCache:
    """`.dsparse/probe.json`: the last probe of every board of a cluster."""

    cluster: str
    time: float
    boards: list[DeviceInfo]

    def answered(self) -> dict[str, DeviceInfo]:
        """The boards that answered, by name (in this probe, or in an earlier one: `stale_error`)."""
        return {b.name: b for b in self.boards if b.ok}


def write_cache(inv: Inventory, infos: list[DeviceInfo]) -> Path:
    """Save this probe. A board that failed it but answered before keeps that earlier result,
    marked stale with the new error, so one bad probe does not take a board out of the plan."""
    try:
        previous = {b.name: b for b in _load(inv.state_dir / CACHE_NAME).boards}
    except ConfigError:   # missing or unreadable: no earlier results to keep
        previous = {}
    now = time.time()
    kept = []
    for info in infos:
        last = previous.get(info.name)
        if info.ok:
            kept.append(replace(info, probed_at=now, stale_error=None))
        elif last is not None and last.ok:
            kept.append(replace(last, stale_error=info.error))
        else:
            kept.append(info)
    inv.state_dir.mkdir(parents=True, exist_ok=True)
    path = inv.state_dir / CACHE_NAME
    doc = {"cluster": inv.name, "time": now, "boards": [i.to_dict() for i in kept]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def _load(path: Path) -> ProbeCache:
    try:
        doc = json.loads(path.read_text())
        return ProbeCache(doc.get("cluster", ""), float(doc.get("time", 0)),
                          [DeviceInfo.from_dict(b) for b in doc.get("boards", [])])
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"probe cache {path} is unreadable ({str(exc).splitlines()[0]})",
                          "delete it and run `dsparse probe`") from None


def read_cache(inv: Inventory, *, max_age_s: float | None = None) -> ProbeCache | None:
    """The cached probe, or None when missing, too old or for other boards."""
    path = inv.state_dir / CACHE_NAME
    if not path.exists():
        return None
    cache = _load(path)
    if max_age_s is not None and time.time() - cache.time > max_age_s:
        return None
    if sorted(b.name for b in cache.boards) != sorted(b.name for b in inv.boards):
        return None
    return cache
