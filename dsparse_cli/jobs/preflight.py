"""Preflight: every board checked before anything starts anywhere, in one table.

Per board, by a standard-library script (no torch import: slow on a Pi): the board's python runs,
torch and torchvision are installed (package metadata), the interface gloo will use carries the
route to the master, the workdir's disk has room for the checkpoints, and on rank 0 the
rendezvous port is free. From the probe cache: torch was built with gloo (some Jetson wheels are
not). Across boards: the same torch version everywhere. Each failure is one line naming the board
and the fix; `train` shows the table and refuses to start (exit 1) when any board has one.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from dsparse_cli.contract import Plan
from dsparse_cli.errors import EXIT_BOARD_FAILED, ConfigError, JobError
from dsparse_cli.inventory import Target
from dsparse_cli.remote.base import Transport
from dsparse_cli.sizes import format_size

DISK_MARGIN = 64 << 20   # logs, the runtime, temporary files next to the checkpoints

# argv: port (0: not rank 0), master address, interface ('' when unknown), workdir
SCRIPT = r"""
import importlib.util as u, os, shutil, socket, struct, sys
port, master, iface, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print('home=' + os.path.expanduser('~'))
print('missing=' + ','.join(m for m in ('torch', 'torchvision') if u.find_spec(m) is None))
for m in ('torch', 'torchvision'):
    try:
        from importlib.metadata import version; print(m + '=' + version(m))
    except Exception: pass
path = os.path.expanduser(workdir)
while not os.path.isdir(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
print('disk_free=%d' % shutil.disk_usage(path).free)
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((master, 9))   # sends nothing
    print('route_src=' + s.getsockname()[0])
except OSError as e:
    print('route_error=%s' % (e.strerror or e))
if iface:
    try:
        import fcntl
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack('256s', iface.encode()[:15]))   # SIOCGIFADDR
        print('iface_addr=' + socket.inet_ntoa(raw[20:24]))
    except (OSError, ImportError) as e:
        print('iface_error=%s' % (e.strerror or e))
if port:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try: s.bind(('', port)); print('port=free')
    except OSError: print('port=busy')
"""


@dataclass
class BoardCheck:
    """One board's row of the preflight table."""
    name: str
    rank: int
    found: dict = field(default_factory=dict)      # what the script printed
    cells: dict = field(default_factory=dict)      # column -> shown value
    problems: list = field(default_factory=list)   # one line each: what is wrong (the fix)

    def fail(self, column: str, cell: str, problem: str) -> None:
        """`problem` is the whole line: what is wrong on which board (and the fix)."""
        self.cells[column] = cell
        self.problems.append(problem)


def checkpoint_bytes(plan: Plan) -> int:
    """Room a run needs in the workdir: two checkpoints and the trained model (weights, buffers
    and optimizer state each), with a margin."""
    state = sum(u.param_bytes + u.buffer_bytes + int(u.extra.get("optimizer_bytes", 0)) for u in plan.units)
    return 3 * state + DISK_MARGIN


def check_board(transport: Transport, target: Target, *, rank: int, master: str, port: int | None,
                iface: str | None, need_disk: int, gloo: bool | None) -> BoardCheck:
    """Run the script on the board and judge what it found (a board whose python is missing or
    whose script fails is a ConfigError: nothing else can be told about it)."""
    argv = " ".join(shlex.quote(a) for a in (str(port or 0), master, iface or "", target.workdir))
    result = transport.run(f"{shlex.quote(target.python)} - {argv}", timeout=60, input=SCRIPT.encode())
    if result.rc in (126, 127):
        raise ConfigError(f"python {target.python!r} not found on board {target.name}",
                          "install python3 there or set `python:` for the board in cluster.yaml")
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if result.rc != 0 or "missing" not in found:
        raise ConfigError(f"preflight check failed on board {target.name}: {result.last_error('no output')}")
    check = BoardCheck(target.name, rank, found, cells={"python": "ok"})
    _packages(check, target)
    _gloo(check, gloo)
    _route(check, iface, master)
    _disk(check, need_disk)
    _port(check, port)
    return check


def _packages(check: BoardCheck, target: Target) -> None:
    missing = check.found["missing"]
    if missing:
        check.fail("torch", "missing", f"board {check.name} has no {' and no '.join(missing.split(','))} for {target.python} "
                                       "(install torch and torchvision there; see `dsparse probe`)")
    else:
        check.cells["torch"] = check.found.get("torch", "?")


def _gloo(check: BoardCheck, gloo: bool | None) -> None:
    if gloo is False:
        check.fail("gloo", "missing", f"the torch on board {check.name} was built without gloo (torch.distributed) "
                                      "(install a torch wheel with distributed support)")
    else:
        check.cells["gloo"] = "ok" if gloo else "?"


def _route(check: BoardCheck, iface: str | None, master: str) -> None:
    found = check.found
    if "route_error" in found:
        return check.fail("iface", "no route", f"board {check.name} has no route to the master {master} ({found['route_error']}) "
                                               "(check its network and master.addr)")
    if not iface:
        check.cells["iface"] = "?"
        return
    if "iface_error" in found:
        return check.fail("iface", f"{iface}: absent", f"board {check.name} has no interface {iface} with an IPv4 address "
                                                       f"({found['iface_error']}) (fix iface: in cluster.yaml)")
    src, own = found.get("route_src"), found.get("iface_addr")
    loopback = iface == "lo" and ((src or "").startswith("127.") or src == master)   # the master is this board
    if src != own and not loopback:
        return check.fail("iface", f"{iface}: wrong", f"board {check.name} reaches the master {master} from {src}, not through "
                                                      f"{iface} ({own}) (set iface: to the interface that routes "
                                                      "to the master, or fix the route)")
    check.cells["iface"] = f"{iface} -> {master}"


def _disk(check: BoardCheck, need: int) -> None:
    free = int(check.found.get("disk_free", 0))
    if free < need:
        check.fail("disk", format_size(free), f"board {check.name} has {format_size(free)} free in its workdir, a run needs "
                                              f"{format_size(need)} for checkpoints (free space or move workdir:)")
    else:
        check.cells["disk"] = format_size(free)


def _port(check: BoardCheck, port: int | None) -> None:
    if port and check.found.get("port") == "busy":
        check.fail("port", f"{port} busy", f"port {port} is already in use on board {check.name} (the "
                                           "rendezvous master) (stop what holds it or pass --master-port)")
    else:
        check.cells["port"] = f"{port} free" if port else "-"


def same_torch(checks: list[BoardCheck]) -> None:
    """Every board with rank 0's torch version (the local part, e.g. +cu124, may differ)."""
    first = min(checks, key=lambda c: c.rank)
    want = first.found.get("torch", "").split("+")[0]
    for c in checks:
        have = c.found.get("torch", "").split("+")[0]
        if want and have and have != want:
            c.fail("torch", f"{c.found['torch']} (≠)", f"board {c.name} has torch {c.found['torch']}, rank 0 ({first.name}) has "
                                                      f"{first.found['torch']} (install one version everywhere)")


COLUMNS = ("board", "python", "torch", "gloo", "iface", "disk", "port")


class PreflightError(JobError):
    """Boards that failed the preflight: the first problem as the error line, every problem and
    the table's rows for whoever shows them."""

    def __init__(self, problems: list[str], table_rows: list[tuple]):
        more = f" (and {len(problems) - 1} more problem(s): see the preflight table)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}; nothing was started", exit_code=EXIT_BOARD_FAILED)
        self.problems, self.rows, self.columns = problems, table_rows, COLUMNS


def rows(checks: list[BoardCheck]) -> list[tuple]:
    return [(c.name, *(c.cells.get(col, "-") for col in COLUMNS[1:])) for c in sorted(checks, key=lambda c: c.rank)]
