"""The preflight before a launch (jobs/preflight.py), run by its real script on this machine
through the local transport: each check can fail, and each failure is one line naming the board
and the fix."""

from __future__ import annotations

import socket
import sys

import pytest

from dsparse_cli.inventory import Target
from dsparse_cli.jobs import preflight
from dsparse_cli.remote.local import LocalTransport

GiB = 1 << 30


def board(tmp_path, name="b1", python=sys.executable) -> Target:
    return Target(name, "127.0.0.1", 22, None, [], None, python, str(tmp_path / "work" / name), True, None, None, "auto")


def check(tmp_path, **kw):
    args = {"rank": 1, "master": "127.0.0.1", "port": None, "iface": "lo", "need_disk": 1 << 20, "gloo": True}
    args.update(kw)
    target = board(tmp_path, python=args.pop("python", sys.executable))
    with LocalTransport(target) as t:
        return preflight.check_board(t, target, **args)


def test_a_healthy_board_passes_every_check(tmp_path):
    c = check(tmp_path)
    assert c.problems == []
    assert c.cells["python"] == "ok" and c.cells["gloo"] == "ok" and c.cells["iface"] == "lo -> 127.0.0.1"
    assert c.cells["torch"] == c.found["torch"] and int(c.found["disk_free"]) > 0


@pytest.mark.parametrize("kw,needle", [
    ({"iface": "nosuch0"}, "board b1 has no interface nosuch0"),
    ({"need_disk": 1 << 60}, "board b1 has"),
    ({"gloo": False}, "the torch on board b1 was built without gloo"),
])
def test_each_failed_check_is_one_line_naming_the_board_and_the_fix(tmp_path, kw, needle):
    c = check(tmp_path, **kw)
    assert len(c.problems) == 1 and c.problems[0].startswith(needle) and "(" in c.problems[0]


def test_disk_need_counts_two_checkpoints_and_the_model():
    from dsparse_cli.contract import PlanUnit

    class P:
        units = [PlanUnit(0, "a", ["a"], param_bytes=GiB, buffer_bytes=0, extra={"optimizer_bytes": GiB})]
    assert preflight.checkpoint_bytes(P()) == 3 * 2 * GiB + preflight.DISK_MARGIN


def test_the_rendezvous_port_must_be_free_on_rank_0(tmp_path):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        c = check(tmp_path, rank=0, port=port)
    assert c.cells["port"] == f"{port} busy" and f"port {port} is already in use on board b1" in c.problems[0]


def test_an_interface_that_does_not_carry_the_route_to_the_master_is_named(tmp_path):
    """The master on loopback, the interface another one with an address: gloo would bind there."""
    for _, name in socket.if_nameindex():
        c = check(tmp_path, iface=name)
        if name != "lo" and "iface_addr" in c.found:
            assert c.problems == [f"board b1 reaches the master 127.0.0.1 from 127.0.0.1, not through {name} "
                                  f"({c.found['iface_addr']}) (set iface: to the interface that routes to the "
                                  "master, or fix the route)"]
            return
    pytest.skip("no interface but lo has an IPv4 address here")


def test_lo_is_right_when_the_master_is_this_board_by_another_address(tmp_path):
    ip = _non_loopback_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert check(tmp_path, master=ip, iface="lo").problems == []


def test_boards_with_another_torch_than_rank_0_are_named():
    checks = [preflight.BoardCheck("b0", 0, {"torch": "2.5.1+cu124"}), preflight.BoardCheck("b1", 1, {"torch": "2.5.1"}),
              preflight.BoardCheck("b2", 2, {"torch": "2.3.0"})]
    preflight.same_torch(checks)
    assert [c.problems for c in checks[:2]] == [[], []]   # the local part (+cu124) may differ
    assert checks[2].problems == ["board b2 has torch 2.3.0, rank 0 (b0) has 2.5.1+cu124 (install one version everywhere)"]


def test_a_missing_python_is_a_config_error(tmp_path):
    from dsparse_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="python '/nonexistent/python3' not found on board b1"):
        check(tmp_path, python="/nonexistent/python3")


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))   # TEST-NET-1: connect() on UDP only picks a route, sends nothing
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip
