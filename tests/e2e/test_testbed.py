"""scripts/edge-testbed: the emulated edge cluster (netns + sshd + cgroup memory limit + emulated link).

The e2e tests need root; the rest (CLI errors, profiles, link model) run anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from testbed import cgroups, cli as tb_cli, linkemu, profiles  # noqa: E402

MiB = 1 << 20
LIMIT = 600 * MiB                     # conftest.UP_ARGS: --memory 600MiB --delay 20ms
DELAY_S = 0.020
BOARD_SCRIPT = REPO / "dsparse_cli" / "probing" / "board_script.py"

# Runs on a board: TCP connect times (ms) to HOST:22, after one warm-up connect (ARP).
RTT_CODE = """
import socket, sys, time
host = sys.argv[1]
socket.create_connection((host, 22), timeout=10).close()
times = []
for _ in range(3):
    t = time.monotonic()
    socket.create_connection((host, 22), timeout=10).close()
    times.append((time.monotonic() - t) * 1000)
print(min(times))
"""

REACH_CODE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 22), timeout=2).close()
    print("reachable")
except OSError as e:
    print("unreachable", e)
"""


# ---------------------------------------------------------------- without root

def test_not_root_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert tb_cli.main(["up", "--boards", "2", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: edge-testbed needs root (network namespaces, cgroups); run it with sudo\n"
    assert not (tmp_path / "testbed.json").exists()


@pytest.mark.parametrize("missing, package", [("ip", "iproute2"), ("ssh-keygen", "openssh-client")])
def test_missing_tool_names_the_package(monkeypatch, capsys, tmp_path, missing, package):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == missing else real_which(name))
    assert tb_cli.main(["up", "--boards", "1", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"install {package}" in err[0], err
    assert not (tmp_path / "testbed.json").exists()


def test_paper7_fits_a_24gib_machine_and_keeps_every_board_trainable():
    boards = profiles.boards_for("paper7", None, "1GiB", "1mbit", "1ms", 0.0)
    assert len(boards) == 7
    # Limits are caps, not reservations (a board's cgroup peaked at ~0.7 GiB training tiny_cnn):
    # their sum may exceed half of 24 GiB a little, not the machine.
    assert sum(b.memory for b in boards) <= 14 << 30
    # Every board holds a worker (base <= 1000 MiB) + torchrun's agent (~300 MiB) within 85 %.
    assert min(b.memory for b in boards) * 0.85 >= 1300 * MiB
    assert len({b.memory for b in boards}) >= 4 and len({b.rate_bps for b in boards}) >= 3
    assert all(b.emulates for b in boards)
    with pytest.raises(Exception, match="paper7 has 7 boards"):
        profiles.boards_for("paper7", 3, "1GiB", "1mbit", "1ms", 0.0)


def test_cpu_allowances_paper7_scaled_uniform_on_request():
    paper7 = profiles.boards_for("paper7", None, "1GiB", "1mbit", "1ms", 0.0)
    assert sum(b.cpus for b in paper7) <= 2 and len({b.cpus for b in paper7}) >= 3   # a 2-core machine
    assert paper7[0].cpus == max(b.cpus for b in paper7) < 1     # the Orin leads; every worker: 1 thread
    assert profiles.boards_for("uniform", 2, "1GiB", "1mbit", "1ms", 0.0)[0].cpus is None
    assert profiles.boards_for("uniform", 2, "1GiB", "1mbit", "1ms", 0.0, "0.5")[1].cpus == 0.5
    for bad in ("0", "lots", "nan"):
        with pytest.raises(Exception, match="bad CPU allowance"):
            profiles.parse_cpus(bad)
    with pytest.raises(Exception, match="drop --cpus"):
        profiles.boards_for("paper7", None, "1GiB", "1mbit", "1ms", 0.0, "1")


def test_cpu_allowance_files_v1_and_v2(tmp_path):
    for version, name in ((1, "cpu.cfs_quota_us"), (2, "cpu.max")):
        board = tmp_path / f"v{version}"
        board.mkdir()
        cgroups.set_cpus(version, str(board), 0.25)
        assert (board / name).read_text().split()[0] == "25000"
        assert cgroups.cpus_of(version, str(board)) == 0.25
    assert (tmp_path / "v1" / "cpu.cfs_period_us").read_text().strip() == "100000"


def test_sizes_rates_and_delays_parse():
    assert profiles.parse_size("600MiB") == 600 * MiB
    assert profiles.parse_size("1.5GiB") == 1536 * MiB
    assert profiles.parse_rate("50mbit") == 50_000_000
    assert profiles.parse_delay("0.2ms") == pytest.approx(0.2)
    for bad in ("600 parsecs", "-1MiB"):
        with pytest.raises(Exception, match="bad memory size"):
            profiles.parse_size(bad)
    with pytest.raises(Exception, match="bad rate"):
        profiles.parse_rate("50mbps")


def test_link_model_serialises_at_the_rate_then_adds_the_delay():
    d = linkemu.Direction(out_fd=-1)
    d.configure(8_000_000, 0.010, 0.0)                        # 1 byte per microsecond
    first = d.schedule(b"x" * 1000, 100.0)
    second = d.schedule(b"x" * 1000, 100.0)                   # queued behind the first
    assert first == pytest.approx(100.0 + 0.001 + 0.010)
    assert second == pytest.approx(100.0 + 0.002 + 0.010)
    later = d.schedule(b"x" * 500, 200.0)                     # idle link: no queueing
    assert later == pytest.approx(200.0 + 0.0005 + 0.010)
    assert (d.frames, d.bytes, d.dropped) == (3, 2500, 0)


def test_link_model_drops_when_the_port_buffer_is_full_and_on_loss():
    d = linkemu.Direction(out_fd=-1)
    d.configure(8_000_000, 0.0, 0.0)
    times = [d.schedule(b"x" * 65536, 0.0) for _ in range(40)]
    kept = [t for t in times if t is not None]
    assert d.dropped == 40 - len(kept) > 0
    assert max(kept) <= linkemu.QUEUE_MIN_BYTES * 8 / 8_000_000 + 2 * 65536 * 8 / 8_000_000
    lossy = linkemu.Direction(out_fd=-1)
    lossy.configure(0, 0.0, 1.0)                             # 100 % loss
    assert lossy.schedule(b"x", 0.0) is None and lossy.dropped == 1


# ---------------------------------------------------------------- e2e (root)

def _py(testbed) -> str:
    return testbed.record["python"]


@pytest.mark.e2e
def test_ssh_lands_inside_the_boards_own_namespace_and_cgroup(testbed):
    rec = testbed.record
    for b in rec["boards"]:
        r = testbed.ssh(b["name"], "hostname; ip -o -4 addr show dev eth0; cat /proc/self/cgroup")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == b["name"]
        assert f"inet {b['addr']}/24" in lines[1]
        cg = "/" + os.path.relpath(b["cgroup"], rec["cgroup"]["mountpoint"])
        key = "memory" if rec["cgroup"]["version"] == 1 else ""
        assert any(line.split(":", 2)[1] == key and line.split(":", 2)[2] == cg for line in lines[2:]), \
            r.stdout


@pytest.mark.e2e
def test_memory_limit_is_real(testbed):
    rec = testbed.record
    limit_file = "memory.limit_in_bytes" if rec["cgroup"]["version"] == 1 else "memory.max"
    cg = testbed.board("b0")["cgroup"]
    assert int(Path(cg, limit_file).read_text()) == LIMIT
    inside = testbed.ssh("b0", f"cat {cg}/{limit_file}")       # what the probe reads on the board
    assert inside.returncode == 0 and int(inside.stdout) == LIMIT, inside.stderr
    big = testbed.ssh("b0", f'{_py(testbed)} -c "b = bytearray(800 << 20)"; echo rc=$?')
    assert "rc=137" in big.stdout, (big.stdout, big.stderr)   # SIGKILL by the cgroup OOM killer
    small = testbed.ssh("b0", f'{_py(testbed)} -c "b = bytearray(200 << 20); print(len(b))"')
    assert small.returncode == 0 and small.stdout.strip() == str(200 << 20), small.stderr


@pytest.mark.e2e
def test_link_delay_shows_in_round_trip_times(testbed):
    # board <-> board crosses both boards' links each way: RTT >= 2 * (20 + 20) ms
    r = testbed.ssh("b0", f"{_py(testbed)} - {testbed.board('b1')['addr']}", input=RTT_CODE)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) >= 0.95 * 2 * (DELAY_S + DELAY_S) * 1000, r.stdout
    # host (the bridge) <-> board crosses one link each way: RTT >= 2 * 20 ms
    host = subprocess.run([sys.executable, "-", testbed.board("b1")["addr"]], input=RTT_CODE,
                          capture_output=True, text=True, timeout=30)
    assert float(host.stdout) >= 0.95 * 2 * DELAY_S * 1000, host.stdout


@pytest.mark.e2e
def test_link_down_cuts_a_board_off_and_link_up_restores_it(testbed):
    b1 = testbed.board("b1")["addr"]

    def from_b0() -> str:
        r = testbed.ssh("b0", f"{_py(testbed)} - {b1}", input=REACH_CODE)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert from_b0().startswith("reachable")
    try:
        assert testbed.cli("link", "down", "b1").returncode == 0
        assert from_b0().startswith("unreachable")
        st = json.loads(testbed.cli("status", "--json").stdout)
        assert [b["link"] for b in st["boards"]] == ["UP", "DOWN"]
    finally:
        up = testbed.cli("link", "up", "b1")
    assert up.returncode == 0, up.stderr
    assert from_b0().startswith("reachable")


@pytest.mark.e2e
def test_link_set_changes_the_delay_live(testbed):
    b1 = testbed.board("b1")["addr"]
    try:
        assert testbed.cli("link", "set", "b1", "--delay", "60ms").returncode == 0
        host = subprocess.run([sys.executable, "-", b1], input=RTT_CODE, capture_output=True, text=True,
                              timeout=30)
        assert float(host.stdout) >= 0.95 * 2 * 60, host.stdout
        assert testbed.board("b1")["delay_ms"] == 60
    finally:
        restore = testbed.cli("link", "set", "b1", "--delay", "20ms")
    assert restore.returncode == 0, restore.stderr


@pytest.mark.e2e
def test_probe_sees_the_cgroup_limit_as_usable_memory(testbed):
    b1 = testbed.board("b1")
    r = testbed.ssh("b1", f"{_py(testbed)} - --workdir {b1['workdir']} --master {testbed.board('b0')['addr']}",
                    input=BOARD_SCRIPT.read_text(), timeout=90)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["usable_memory_source"] == "cgroup"
    assert info["cgroup_limit_bytes"] == LIMIT
    assert 0.95 * LIMIT <= info["usable_memory_bytes"] <= LIMIT
    assert (info["hostname"], info["iface"], info["address"]) == ("b1", "eth0", b1["addr"])
    assert info["torch"], info["warnings"]                    # the venv's torch imports under the limit


@pytest.mark.e2e
def test_cluster_yaml_is_a_ready_inventory(testbed):
    from dsparse_cli.inventory import load_inventory

    inv = load_inventory(testbed.dir / "cluster.yaml")
    rec = testbed.record
    assert [b.name for b in inv.boards] == ["b0", "b1"]
    assert [b.host for b in inv.boards] == [b["addr"] for b in rec["boards"]]
    assert inv.master_addr == rec["boards"][0]["addr"]
    for b, target in zip(rec["boards"], inv.boards):
        assert (target.user, target.port, target.python, target.workdir) == ("root", 22, rec["python"], b["workdir"])
        assert target.memory_limit is None                    # the probe must find the cgroup limit
        assert str(testbed.dir / "id_ed25519") in target.identity_files
    known = (testbed.dir / "known_hosts").read_text().splitlines()
    assert [line.split()[0] for line in known] == [b["addr"] for b in rec["boards"]]


@pytest.mark.e2e
def test_status_reports_what_exists(testbed):
    r = testbed.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["bridge_exists"] and st["linkemu_alive"]
    for b in st["boards"]:
        assert b["netns"] and b["sshd_alive"] and b["link"] == "UP"
        assert b["memory_limit"] == LIMIT and 0 < b["memory_usage"] < LIMIT
        assert b["rate"] == "50mbit" and b["delay_ms"] == 20


@pytest.mark.e2e
def test_down_removes_exactly_its_own_testbed_and_is_safe_twice(testbed, spare_testbed):
    up = spare_testbed.cli("up", "--boards", "1", "--memory", "300MiB", "--rate", "10mbit", "--delay", "1ms")
    assert up.returncode == 0, up.stderr
    rec = spare_testbed.record
    assert rec["subnet"] != testbed.record["subnet"] and rec["prefix"] != testbed.record["prefix"]
    again = spare_testbed.cli("up", "--boards", "1")
    assert again.returncode != 0 and "already up" in again.stderr
    b = rec["boards"][0]
    pids = [b["sshd_pid"], rec["linkemu"]["pid"]]
    assert all(_alive(pid) for pid in pids)
    assert spare_testbed.ssh("b0", "hostname").stdout.strip() == "b0"

    down = spare_testbed.cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert b["netns"] not in netns
    assert not any(_alive(pid) for pid in pids)
    for link in (rec["bridge"]["name"], b["host_tap"]):
        assert subprocess.run(["ip", "link", "show", "dev", link], capture_output=True).returncode != 0
    assert not os.path.exists(b["cgroup"]) and not os.path.exists(rec["cgroup"]["parent"])
    assert not os.path.exists(b["etc_netns"])
    second = spare_testbed.cli("down")
    assert second.returncode == 0 and "nothing to remove" in second.stdout
    # the module's testbed was left alone
    assert testbed.ssh("b0", "hostname").stdout.strip() == "b0"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.e2e
def test_cpus_gives_each_board_a_cpu_quota_its_probe_sees(spare_testbed):
    up = spare_testbed.cli("up", "--boards", "1", "--memory", "300MiB", "--cpus", "0.5", "--delay", "1ms")
    assert up.returncode == 0, up.stderr
    rec, b = spare_testbed.record, spare_testbed.board("b0")
    quota_file = "cpu.cfs_quota_us" if rec["cgroup"]["cpu"]["version"] == 1 else "cpu.max"
    assert Path(b["cpu_cgroup"], quota_file).read_text().split()[0] == "50000"     # of 100000 us
    probe = spare_testbed.ssh("b0", f"{_py(spare_testbed)} - --no-torch --workdir {b['workdir']}",
                              input=BOARD_SCRIPT.read_text())
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    assert (info["cpu_quota"], info["cpus_effective"]) == (0.5, 1)
    assert json.loads(spare_testbed.cli("status", "--json").stdout)["boards"][0]["cpus"] == 0.5
    assert spare_testbed.cli("down").returncode == 0
    assert not os.path.exists(b["cpu_cgroup"]) and not os.path.exists(rec["cgroup"]["cpu"]["parent"])


@pytest.mark.e2e
def test_probe_links_measures_the_emulated_rate_and_a_cut_board_writes_nothing(testbed):
    from helpers import one_line_error, run_cli

    yaml = str(testbed.dir / "cluster.yaml")
    cache = testbed.dir / ".dsparse" / "probe.json"
    r = run_cli("-c", yaml, "probe", "--links", "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    rates = {b["name"]: b["link_bytes_per_s"] for b in json.loads(r.stdout)["boards"]}
    rate = 50e6 / 8                                          # conftest.UP_ARGS: --rate 50mbit
    assert all(0.5 * rate <= v <= 1.1 * rate for v in rates.values()), rates
    before = cache.read_bytes()
    try:
        assert testbed.cli("link", "down", "b1").returncode == 0
        cut = run_cli("-c", yaml, "--connect-timeout", "3", "probe", "--links", timeout=240)
    finally:
        assert testbed.cli("link", "up", "b1").returncode == 0
    assert cut.returncode == 1 and "b1" in one_line_error(cut)
    assert cache.read_bytes() == before                      # nothing written
