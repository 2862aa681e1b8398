"""Files written for users of the testbed: cluster.yaml, known_hosts, per-board /etc/hosts."""

from __future__ import annotations

import json
from pathlib import Path

from .profiles import MiB, format_rate


def _q(text: str) -> str:
    return json.dumps(str(text))           # a JSON string is a valid YAML scalar


def cluster_yaml(rec: dict) -> str:
    d = rec["dir"]
    lines = [
        f"# Emulated edge cluster made by scripts/edge-testbed (testbed {rec['prefix']}, "
        f"subnet {rec['subnet']}).",
        f"# Boards' host keys are in {d}/known_hosts (named below), not ~/.ssh/known_hosts;",
        f"# for plain ssh use `ssh -o UserKnownHostsFile={d}/known_hosts -i {d}/id_ed25519 root@ADDR`.",
        "# memory_limit is deliberately unset: the probe finds each board's cgroup limit itself;",
        "# threads too: each worker sizes torch's threads from its cgroup's CPU allowance.",
        f"# Tear down with: scripts/edge-testbed down --dir {d}",
        f"name: {_q('testbed-' + rec['id'])}",
        "",
        "defaults:",
        "  user: root",
        "  port: 22",
        f"  identity_file: {_q(d + '/id_ed25519')}",
        f"  known_hosts: {_q(d + '/known_hosts')}",
        f"  python: {_q(rec['python'])}",
        "",
        "master:",
        f"  addr: {_q(rec['boards'][0]['addr'])}",
        "",
        "boards:",
    ]
    for b in rec["boards"]:
        about = (f"{b['memory'] // MiB} MiB, {format_rate(b['rate_bps'])}, {b['delay_ms']:g} ms"
                 + (f", {b['loss_pct']:g}% loss" if b["loss_pct"] else "")
                 + (f", {b['cpus']:g} CPU" if b.get("cpus") else ""))
        if b.get("emulates"):
            about = f"{b['emulates']} -> {about}"
        lines += [f"  - name: {b['name']}                # {about}",
                  f"    host: {_q(b['addr'])}",
                  f"    workdir: {_q(b['workdir'])}"]
    return "\n".join(lines) + "\n"


def known_hosts(rec: dict, host_keys: dict[str, str]) -> str:
    return "".join(f"{b['addr']} {host_keys[b['name']]}\n" for b in rec["boards"])


def board_hosts(rec: dict) -> str:
    """/etc/hosts seen inside every board (ip netns exec binds /etc/netns/NS/hosts over it):
    a board's hostname resolves to its own address, as on a real board (gloo relies on it)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{rec['bridge']['addr']}\ttestbed-host"]
    lines += [f"{b['addr']}\t{b['name']}" for b in rec["boards"]]
    return "\n".join(lines) + "\n"


# No nameserver: glibc then asks 127.0.0.1, which refuses at once, so lookups of unknown names
# fail fast on a board instead of waiting on an unreachable resolver outside the testbed.
BOARD_RESOLV_CONF = "# edge-testbed board: no DNS, names are in /etc/hosts\noptions timeout:1 attempts:1\n"


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
