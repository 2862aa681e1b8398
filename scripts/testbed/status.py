"""`edge-testbed status`: what of the recorded testbed exists right now."""

from __future__ import annotations

import json
from pathlib import Path

from . import cgroups, net, procs, record
from .profiles import MiB, format_rate


def collect(directory: Path) -> dict | None:
    rec = record.load(directory)
    if rec is None:
        return None
    namespaces = net.netns_list()
    stats = _read_json(rec["linkemu"]["stats"]) or {}
    version = rec["cgroup"]["version"]
    boards = []
    for b in rec["boards"]:
        boards.append({
            "name": b["name"], "addr": b["addr"], "netns": b["netns"] in namespaces,
            "sshd_pid": b["sshd_pid"], "sshd_alive": procs.is_ours(b["sshd_pid"], b["run_dir"]),
            "memory_limit": cgroups.limit_of(version, b["cgroup"]),
            "memory_usage": cgroups.usage_of(version, b["cgroup"]),
            "cpus": cgroups.cpus_of(rec["cgroup"]["cpu"]["version"], b["cpu_cgroup"])
            if b.get("cpu_cgroup") else None,
            "link": net.link_state(b["host_tap"]), "rate": format_rate(b["rate_bps"]),
            "delay_ms": b["delay_ms"], "loss_pct": b["loss_pct"], "emulates": b.get("emulates", ""),
            "traffic": stats.get(b["name"]),
        })
    return {"dir": rec["dir"], "prefix": rec["prefix"], "state": rec["state"], "subnet": rec["subnet"],
            "bridge": rec["bridge"]["name"], "bridge_exists": net.link_exists(rec["bridge"]["name"]),
            "linkemu_pid": rec["linkemu"]["pid"],
            "linkemu_alive": procs.is_ours(rec["linkemu"]["pid"], rec["linkemu"]["config"]),
            "cgroup": rec["cgroup"]["parent"], "cgroup_version": version, "boards": boards}


def format_text(st: dict) -> str:
    lines = [f"testbed {st['prefix']} ({st['state']}) in {st['dir']}: subnet {st['subnet']}, "
             f"bridge {st['bridge']} {'present' if st['bridge_exists'] else 'MISSING'}, "
             f"link emulator pid {st['linkemu_pid']} {'alive' if st['linkemu_alive'] else 'DEAD'}, "
             f"cgroup v{st['cgroup_version']} {st['cgroup']}",
             f"{'board':6} {'address':14} {'netns':6} {'sshd':14} {'memory used/limit':22} {'cpus':5} "
             f"{'link':28} traffic up/down"]
    for b in st["boards"]:
        mem = (f"{(b['memory_usage'] or 0) / MiB:.0f}/{b['memory_limit'] / MiB:.0f} MiB"
               if b["memory_limit"] else "-")
        sshd_txt = f"{b['sshd_pid']} {'up' if b['sshd_alive'] else 'DEAD'}"
        link = f"{b['link'] or 'MISSING'} {b['rate']} {b['delay_ms']:g}ms" + \
            (f" {b['loss_pct']:g}%loss" if b["loss_pct"] else "")
        t = b["traffic"] or {}
        traffic = "/".join(f"{t.get(d, {}).get('bytes', 0) / MiB:.1f}" for d in ("up", "down")) + " MiB"
        cpus = f"{b['cpus']:g}" if b.get("cpus") else "-"
        lines.append(f"{b['name']:6} {b['addr']:14} {'yes' if b['netns'] else 'NO':6} {sshd_txt:14} "
                     f"{mem:22} {cpus:5} {link:28} {traffic}")
    return "\n".join(lines)


def _read_json(path: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
