"""Network plumbing through `ip`: the bridge, one namespace per board, its eth0 and routes."""

from __future__ import annotations

import ipaddress
import subprocess

from .errors import TestbedError

SUBNET_FMT = "10.213.{}.0/24"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that no route or address on this machine touches yet."""
    used = _used_networks()
    for i in range(250):
        net = ipaddress.ip_network(SUBNET_FMT.format(1 + (seed + i) % 250))
        if not any(net.overlaps(u) for u in used):
            return net
    raise TestbedError("no free 10.213.X.0/24 subnet left (is every one routed here?)")


def _used_networks() -> list[ipaddress.IPv4Network]:
    words = [line.split()[:2] for line in ip("-4", "route", "show", "table", "all").stdout.splitlines()]
    words += [line.split()[3:4] for line in ip("-4", "-o", "addr").stdout.splitlines()]
    nets = []
    for candidates in words:
        for word in candidates:          # route lines may start with a type: "local 127.0.0.1 ..."
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if net.prefixlen > 0:        # the default route overlaps everything: skip it
                nets.append(net)
            break
    return nets


def link_exists(name: str, netns: str | None = None) -> bool:
    args = (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return ip(*args, check=False).returncode == 0


def link_state(name: str) -> str | None:
    """'UP' / 'DOWN' (administrative state) or None when missing."""
    proc = ip("-o", "link", "show", "dev", name, check=False)
    if proc.returncode != 0:
        return None
    flags = proc.stdout.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in proc.stdout else []
    return "UP" if "UP" in flags else "DOWN"


def netns_list() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def create_bridge(name: str, cidr: str, mtu: int) -> None:
    ip("link", "add", "name", name, "type", "bridge")
    ip("link", "set", "dev", name, "mtu", str(mtu))
    ip("addr", "add", cidr, "dev", name)
    ip("link", "set", "dev", name, "up")


def attach_to_bridge(tap: str, bridge: str, mtu: int) -> None:
    ip("link", "set", "dev", tap, "mtu", str(mtu), "master", bridge)
    ip("link", "set", "dev", tap, "up")


def setup_board_ns(netns: str, tap: str, cidr: str, gateway: str, mtu: int) -> None:
    """Move the board's TAP into its namespace as eth0 with address, loopback and default route."""
    ip("link", "set", "dev", tap, "netns", netns)
    ip("-n", netns, "link", "set", "dev", tap, "name", "eth0")
    ip("-n", netns, "link", "set", "dev", "eth0", "mtu", str(mtu))
    ip("-n", netns, "addr", "add", cidr, "dev", "eth0")
    ip("-n", netns, "link", "set", "dev", "eth0", "up")
    ip("-n", netns, "link", "set", "dev", "lo", "up")
    ip("-n", netns, "route", "add", "default", "via", gateway)


def delete_link(name: str) -> None:
    ip("link", "del", "dev", name, check=False)


def delete_netns(name: str) -> None:
    ip("netns", "del", name, check=False)
