"""cluster.yaml loading: defaults, ~/.ssh/config, local boards, and every bad input."""

from pathlib import Path

import pytest

from dsparse_cli.errors import ConfigError
from dsparse_cli.inventory import builtin_cluster, load_inventory
from dsparse_cli.render import unit_ranges
from dsparse_cli.sizes import format_size, parse_size


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 1024**3), ("1500MiB", 1500 * 1024**2), ("512M", 512 * 1024**2), ("2GB", 2 * 10**9),
    ("1.5GiB", int(1.5 * 1024**3)), (4096, 4096), ("100 KiB", 100 * 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2XB", "GiB", "-1GiB", "0", 0, "two gigs"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert format_size(1536 * 1024**2) == "1.5 GiB"
    assert format_size(None) == "-"


def test_unit_ranges():
    assert unit_ranges([3, 4, 5, 9]) == "3-5,9" and unit_ranges([0]) == "0" and unit_ranges([]) == "none"


def test_defaults_inherited_and_overridden(tmp_path):
    key = tmp_path / "id"
    key.write_text("k")
    inv = load_inventory(write(tmp_path, f"""
name: lab
defaults: {{user: pi, port: 2200, identity_file: {key}, python: /usr/bin/python3, workdir: /w}}
master: {{addr: 10.0.0.9, port: 29400}}
boards:
  - {{name: a, host: 10.0.0.1}}
  - {{name: b, host: 10.0.0.2, user: nvidia, port: 22, python: /opt/py, kind: jetson, memory_limit: 2GiB, iface: eth1}}
"""))
    a, b = inv.boards
    assert (a.user, a.port, a.identity_files, a.python, a.workdir) == ("pi", 2200, [str(key)], "/usr/bin/python3", "/w")
    assert (b.user, b.port, b.python, b.kind, b.memory_limit, b.iface) == ("nvidia", 22, "/opt/py", "jetson", 2 * 1024**3, "eth1")
    assert (inv.name, inv.master_addr, inv.master_port) == ("lab", "10.0.0.9", 29400)
    assert inv.state_dir == tmp_path.resolve() / ".dsparse"


def test_master_defaults_to_first_board(tmp_path):
    inv = load_inventory(write(tmp_path, "boards:\n  - {name: a, host: 10.1.1.1}\n  - {name: b, host: 10.1.1.2}\n"))
    assert inv.master_addr == "10.1.1.1" and inv.master_port == 29500


def test_ssh_config_alias_honoured(tmp_path):
    key = tmp_path / "alias_key"
    key.write_text("k")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host pi-lab\n  HostName 192.0.2.7\n  User alice\n  Port 2022\n  IdentityFile {key}\n"
                   "  ProxyCommand ssh -W %h:%p jump\n")
    inv = load_inventory(write(tmp_path, "defaults: {user: bob}\nboards:\n  - {name: p, host: pi-lab}\n"),
                         ssh_config=cfg)
    t = inv.boards[0]
    assert (t.host, t.user, t.port, t.identity_files) == ("192.0.2.7", "alice", 2022, [str(key)])
    assert t.proxy_command == "ssh -W 192.0.2.7:2022 jump"


def test_board_keys_beat_ssh_config(tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host pi-lab\n  HostName 192.0.2.7\n  User alice\n")
    inv = load_inventory(write(tmp_path, "boards:\n  - {name: p, host: pi-lab, user: carol}\n"), ssh_config=cfg)
    assert inv.boards[0].user == "carol"


def test_local_board(tmp_path):
    inv = load_inventory(write(tmp_path, "defaults: {python: /usr/bin/python3}\nboards:\n  - {name: here, local: true, memory_limit: 700MiB}\n"))
    t = inv.boards[0]
    assert t.local and t.memory_limit == 700 * 1024**2
    assert t.python != "/usr/bin/python3"  # remote defaults do not apply to this machine
    assert t.workdir == str(tmp_path.resolve() / ".dsparse" / "boards" / "here")


def test_builtin_cluster_has_distinct_budgets():
    inv = builtin_cluster()
    assert inv.builtin and len(inv.boards) >= 3
    assert all(b.local for b in inv.boards)
    assert len({b.memory_limit for b in inv.boards}) == len(inv.boards)


def test_no_file_falls_back_to_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_inventory(None).builtin


@pytest.mark.parametrize("text,needle", [
    ("boards:\n  - {name: a, host: h\n", "malformed YAML"),
    ("boards:\n  - {name: a, host: h\n", "line 3"),
    ("boards:\n  - name: a\n    hots: x\n", "unknown key 'hots'"),           # typo
    ("boards:\n  - name: a\n    hots: x\n", "did you mean 'host'"),
    ("boards:\n  - name: a\n    hots: x\n", "line 3"),
    ("defaults: {usr: x}\nboards:\n  - {name: a, local: true}\n", "did you mean 'user'"),
    ("boards:\n  - {name: a, local: true}\n  - {name: a, local: true}\n", "duplicate board name 'a'"),
    ("boards:\n  - {name: a}\n", "has no host"),
    ("boards:\n  - {name: a, local: true, memory_limit: 2XB}\n", "not a memory size"),
    ("boards:\n  - {name: a, host: h, identity_file: /nonexistent/key}\n", "identity file /nonexistent/key"),
    ("boards: []\n", "boards"),
    ("- just a list\n", "expected a mapping"),
    ("boards:\n  - {name: a, host: h, port: 70000}\n", "port"),
    ("boards:\n  - {name: 'a b', local: true}\n", "may use only"),
])
def test_bad_inventory(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_inventory(write(tmp_path, text))
    assert needle in exc.value.one_line()
    assert "\n" not in exc.value.one_line()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_inventory(tmp_path / "nope.yaml")


def test_master_follows_rank_0_when_the_plan_leaves_the_first_board_out(tmp_path):
    from dsparse_cli.errors import ConfigError
    from dsparse_cli.contract import Plan, PlanDevice
    from dsparse_cli.jobs.launch import settle_master

    boards = "boards:\n  - {name: a, host: 10.1.1.1}\n  - {name: b, host: 10.1.1.2}\n  - {name: c, host: 10.1.1.3}\n"
    plan = Plan("m", 10, 32, 8, "sgd", units=[], groups=[],
                devices=[PlanDevice("b", 0, []), PlanDevice("c", 1, [])])   # a excluded as too small
    inv = load_inventory(write(tmp_path, boards))
    assert inv.master_addr == "10.1.1.1" and not inv.master_explicit
    settle_master(inv, plan)
    assert inv.master_addr == "10.1.1.2"

    explicit = load_inventory(write(tmp_path, "master: {addr: 10.1.1.1}\n" + boards))
    with pytest.raises(ConfigError, match="master.addr 10.1.1.1 is board a's, which the plan leaves out"):
        settle_master(explicit, plan)
    with pytest.raises(ConfigError, match="is board c's, not rank 0"):
        settle_master(load_inventory(write(tmp_path, "master: {addr: 10.1.1.3}\n" + boards)), plan)
    other_iface = load_inventory(write(tmp_path, "master: {addr: 192.168.7.2}\n" + boards))
    settle_master(other_iface, plan)    # not a board's host: maybe rank 0's other interface
    assert other_iface.master_addr == "192.168.7.2"
