"""Command line of scripts/edge-testbed."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from . import status, testbed
from .errors import TestbedError
from .profiles import boards_for, parse_delay, parse_rate, parse_size

NOT_ROOT = "edge-testbed needs root (network namespaces, cgroups); run it with sudo"
TOOLS = [("ip", "iproute2"), ("ssh-keygen", "openssh-client"), ("unshare", "util-linux")]
DEFAULT_MTU = 9000


def default_python() -> str:
    venv = testbed.REPO / ".venv" / "bin" / "python"      # not resolved: the venv needs its own path
    return str(venv) if venv.exists() else (shutil.which("python3") or sys.executable)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-testbed", description=(
        "Emulated edge cluster: one network namespace per board on a bridge, each with its own sshd, "
        "a real memory limit (cgroup) and a real link (rate, delay, loss). See docs/testbed.md."))
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create the boards and write DIR/cluster.yaml")
    u.add_argument("--boards", type=int, help="number of boards (uniform profile)")
    u.add_argument("--profile", default="uniform", choices=["uniform", "paper7"])
    u.add_argument("--memory", default="1200MiB", help="memory limit per board (uniform)")
    u.add_argument("--rate", default="100mbit", help="link rate per board, each direction (uniform)")
    u.add_argument("--cpus", default=None, help="CPU allowance per board, a cgroup quota, e.g. 0.5 "
                                                "(uniform; default unlimited)")
    u.add_argument("--delay", default="5ms", help="one-way link latency per board, each direction")
    u.add_argument("--loss", type=float, default=0.0, help="random loss per direction, percent")
    u.add_argument("--python", default=None, help="interpreter with torch, as boards see it "
                                                  "(default: this repo's .venv/bin/python)")
    u.add_argument("--mtu", type=int, default=DEFAULT_MTU, help="MTU of the emulated links")
    for name in ("down", "status"):
        s = sub.add_parser(name, help={"down": "remove exactly what up made (safe to repeat)",
                                       "status": "show what exists"}[name])
        if name == "status":
            s.add_argument("--json", action="store_true")
    lk = sub.add_parser("link", help="take a board's link down/up, or change it: link set BOARD --delay 50ms")
    lk.add_argument("action", choices=["up", "down", "set"])
    lk.add_argument("board")
    lk.add_argument("--rate")
    lk.add_argument("--delay")
    lk.add_argument("--loss", type=float)
    rb = sub.add_parser("reboot", help="power-cycle a board: kill everything on it, then start its sshd again")
    rb.add_argument("board")
    rb.add_argument("--down-for", type=float, default=2.0, metavar="SECONDS", help="how long it stays off")
    mem = sub.add_parser("memory", help="change a board's memory limit, live: memory BOARD 900MiB")
    mem.add_argument("board")
    mem.add_argument("size")
    mem.add_argument("--above-idle", action="store_true",
                     help="SIZE on top of what the board's own processes (its sshd) hold now")
    for s in sub.choices.values():
        s.add_argument("--dir", default=".testbed", help="testbed directory (default .testbed/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        preflight(args.cmd)
        return run(args)
    except TestbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def preflight(cmd: str) -> None:
    if os.geteuid() != 0:
        raise TestbedError(NOT_ROOT, 2)
    if cmd != "up":
        return
    for tool, package in TOOLS:
        if not shutil.which(tool):
            raise TestbedError(f"`{tool}` not found: install {package}", 2)
    if not os.path.exists("/usr/sbin/sshd"):
        raise TestbedError("/usr/sbin/sshd not found: install openssh-server", 2)
    if not os.path.exists("/dev/net/tun"):
        raise TestbedError("/dev/net/tun missing: the kernel needs TUN/TAP support (modprobe tun)", 2)


def run(args) -> int:
    directory = Path(args.dir).resolve()
    if args.cmd == "up":
        if args.mtu < 576 or args.mtu > 65000:
            raise TestbedError("--mtu must be between 576 and 65000", 2)
        specs = boards_for(args.profile, args.boards, args.memory, args.rate, args.delay, args.loss,
                           args.cpus)
        rec = testbed.up(directory, specs, args.python or default_python(), args.mtu)
        print(f"up: {len(rec['boards'])} boards on {rec['subnet']}; inventory {directory}/cluster.yaml, "
              f"known_hosts {directory}/known_hosts")
        return 0
    if args.cmd == "down":
        return 1 if testbed.down(directory) else 0
    if args.cmd == "status":
        st = status.collect(directory)
        if st is None:
            print(json.dumps(None) if args.json else f"no testbed in {directory}")
            return 1
        print(json.dumps(st, indent=2) if args.json else status.format_text(st))
        return 0
    if args.cmd == "reboot":
        b = testbed.reboot(directory, args.board, max(0.0, args.down_for))
        print(f"reboot {b['name']}: back up (sshd pid {b['sshd_pid']})")
        return 0
    if args.cmd == "memory":
        b = testbed.memory(directory, args.board, parse_size(args.size), args.above_idle)
        print(f"memory {b['name']}: limit {b['memory'] >> 20} MiB")
        return 0
    rate = parse_rate(args.rate) if args.rate else None
    delay = parse_delay(args.delay) if args.delay else None
    if args.action == "set" and rate is None and delay is None and args.loss is None:
        raise TestbedError("link set needs --rate, --delay or --loss", 2)
    b = testbed.link(directory, args.board, args.action, rate, delay, args.loss)
    print(f"link {b['name']}: {args.action}")
    return 0
