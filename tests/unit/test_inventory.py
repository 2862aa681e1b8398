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
    ("1.5GiB", int(1.5 * 1024**3)), ("4096B", 4096), ("100 KiB", 100 * 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2XB", "GiB", "-1GiB", "0", 0, "two gigs", "0GiB", True, 4096, "4096"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("bare,fix", [(2048, "write 2048MiB or 2GiB"), ("1500", "write 1500MiB"), (2, "write 2GiB")])
def test_size_without_unit_is_refused_with_the_fix(bare, fix):
    with pytest.raises(ValueError, match=f"^{bare} has no unit \\({fix}\\)$"):
        parse_size(bare)


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
    assert len({b.training_memory for b in inv.boards}) == len(inv.boards)   # distinct allowances


def test_the_launcher_is_dsparse_unless_torchrun_is_asked_for(tmp_path):
    assert load_inventory(write(tmp_path, "boards:\n  - {name: a, local: true}\n")).launcher == "dsparse"
    asked = write(tmp_path, "launcher: torchrun\nboards:\n  - {name: a, local: true}\n")
    assert load_inventory(asked).launcher == "torchrun"


def test_no_file_falls_back_to_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_inventory(None).builtin


JARGON = ("Input should", "boards.0", "instance of", "Field required", "Value error", "validation error")


@pytest.mark.parametrize("text,needle", [
    ("boards:\n  - {name: a, host: h\n", "malformed YAML"),
    ("boards:\n  - {name: a, host: h\n", "line 3"),
    ("boards:\n  - name: a\n    hots: x\n", "line 3: board 'a': unknown key 'hots' (did you mean 'host'?)"),
    ("boards:\n  - {name: a, host: h, color: red}\n", "unknown key 'color' (valid keys: name, host, user,"),
    ("defaults: {usr: x}\nboards:\n  - {name: a, local: true}\n", "line 1: defaults: unknown key 'usr' (did you mean 'user'?)"),
    ("bords: []\n", "unknown key 'bords' (did you mean 'boards'?)"),
    ("launcher: torchrn\nboards:\n  - {name: a, local: true}\n",
     "line 1: launcher must be dsparse or torchrun, got 'torchrn' (did you mean 'torchrun'?)"),
    ("boards:\n  - {name: a, local: true, allocator: fsat}\n",
     "line 2: board 'a': allocator must be lean or fast, got 'fsat' (did you mean 'fast'?)"),
    ("boards:\n  - {name: a, local: true}\n  - {name: a, local: true}\n",
     "line 3: duplicate board name 'a' (line 2 has it too; each board needs its own name)"),
    ("boards:\n  - {name: a}\n", "line 2: board 'a' has no host (add `host:` or `local: true`)"),
    ("boards:\n  - {host: h}\n", "line 2: board #1 has no name (add `name: ...`)"),
    ("boards:\n  - {name: a, local: true, memory_limit: 2XB}\n", "board 'a': memory_limit 2XB is not a memory size"),
    ("boards:\n  - {name: a, local: true, memory_limit: 2048}\n",
     "line 2: board 'a': memory_limit 2048 has no unit (write 2048MiB or 2GiB)"),
    ("boards: []\n", "line 1: boards is empty"),
    ("name: x\n", "no boards (list each board under `boards:` as `- name: ...`)"),
    ("boards: {a: 1}\n", "boards must be a list, got a mapping"),
    ("boards:\n  - {name: a, local: true}\n  - pi-2\n", "line 3: board #2 must be a mapping of keys, got 'pi-2'"),
    ("defaults: [x]\nboards:\n  - {name: a, local: true}\n", "defaults must be a mapping of keys, got a list"),
    ("- just a list\n", "expected a mapping"),
    ("", "got nothing"),
    ("boards:\n  - {name: a, host: h, port: 70000}\n", "board 'a': port must be a number from 1 to 65535, got 70000"),
    ("boards:\n  - {name: a, host: h, port: '22'}\n", "port must be a number from 1 to 65535, got '22'"),
    ("master: {port: 0}\nboards:\n  - {name: a, local: true}\n", "line 1: master: port must be a number"),
    ("boards:\n  - {name: a, local: maybe}\n", "board 'a': local must be true or false, got 'maybe'"),
    ("boards:\n  - {name: a, host: h, kind: pi}\n", "kind must be one of jetson, rpi, x86, auto, got 'pi'"),
    ("boards:\n  - {name: a, host: [h]}\n", "board 'a': host must be text, got a list"),
    ("boards:\n  - {name: 'a b', local: true}\n", "name 'a b' may use only letters, digits, '.', '_' and '-'"),
])
def test_bad_inventory(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_inventory(write(tmp_path, text))
    message = exc.value.one_line()
    assert needle in message
    assert all(line.startswith(f"{tmp_path / 'cluster.yaml'}: line ") for line in message.splitlines())
    assert not any(word in message for word in JARGON)


def test_every_error_of_a_file_at_once_each_on_its_line(tmp_path):
    path = write(tmp_path, """name: lab
boards:
  - name: pi-1
    host: 10.0.0.1
    port: 0
  - name: pi-2
    hots: 10.0.0.2
    local: true
    memory_limit: 2048
""")
    with pytest.raises(ConfigError) as exc:
        load_inventory(path)
    assert exc.value.one_line().splitlines() == [
        f"{path}: line 5: board 'pi-1': port must be a number from 1 to 65535, got 0",
        f"{path}: line 7: board 'pi-2': unknown key 'hots' (did you mean 'host'?)",
        f"{path}: line 9: board 'pi-2': memory_limit 2048 has no unit (write 2048MiB or 2GiB)",
    ]


def test_local_board_with_a_host_loads_with_a_warning(tmp_path):
    path = write(tmp_path, "boards:\n  - {name: a, host: h}\n  - name: x\n    local: true\n    host: 10.0.0.3\n")
    inv = load_inventory(path)
    assert inv.board("x").local and inv.board("x").host == "127.0.0.1"
    assert inv.warnings == [f"{path}: line 3: board 'x' is local: its host: is ignored"]
    assert load_inventory(write(tmp_path, "boards:\n  - {name: a, host: h}\n")).warnings == []


def test_a_missing_identity_file_is_only_the_error_of_its_board(tmp_path):
    """#16: a broken board must not block commands about the others; it fails when contacted."""
    key = tmp_path / "id"
    key.write_text("k")
    path = write(tmp_path, f"boards:\n  - {{name: a, host: h, identity_file: {key}}}\n"
                           "  - {name: new, host: h2, identity_file: /nonexistent/key}\n")
    inv = load_inventory(path)
    assert inv.board("a").check() is inv.board("a") and inv.board("a").error is None
    with pytest.raises(ConfigError) as exc:
        inv.board("new").check()
    assert exc.value.one_line() == (f"{path}: line 3: board 'new': identity file /nonexistent/key does not exist "
                                    "(fix identity_file or create the key with ssh-keygen)")
    assert exc.value.exit_code == 2


def test_yaml_merge_keys_and_anchors_still_work(tmp_path):
    inv = load_inventory(write(tmp_path, "boards:\n  - &a {name: a, host: h, user: pi}\n  - {<<: *a, name: b}\n"))
    assert [(b.name, b.user) for b in inv.boards] == [("a", "pi"), ("b", "pi")]


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


def test_link_and_threads_per_board_or_from_defaults(tmp_path):
    inv = load_inventory(write(tmp_path, "defaults: {link: 100mbit, threads: 1}\nboards:\n"
                               "  - {name: a, host: 10.0.0.1}\n"
                               "  - {name: b, host: 10.0.0.2, link: 1gbit, threads: 2}\n"
                               "  - {name: c, local: true, link: 12.5MB/s}\n"))
    assert [(b.link, b.threads) for b in inv.boards] == [(12.5e6, 1), (125e6, 2), (12.5e6, 1)]


def test_bad_link_and_threads_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_inventory(write(tmp_path, "boards:\n  - {name: a, host: 10.0.0.1, link: fast, threads: 0}\n"))
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert "link fast is not a link rate" in lines[0] and "threads must be a whole number" in lines[1]


def test_allocator_is_lean_unless_fast_is_asked_for_per_board_or_in_defaults(tmp_path):
    inv = load_inventory(write(tmp_path, "boards:\n  - {name: a, local: true}\n"
                               "  - {name: b, host: 10.0.0.2, allocator: fast}\n"))
    assert [b.allocator for b in inv.boards] == ["lean", "fast"]
    inv = load_inventory(write(tmp_path, "defaults: {allocator: fast}\nboards:\n  - {name: a, host: 10.0.0.1}\n"
                               "  - {name: b, local: true, allocator: lean}\n"))
    assert [b.allocator for b in inv.boards] == ["fast", "lean"]


def test_training_memory_holds_for_ssh_boards_too(tmp_path):
    inv = load_inventory(write(tmp_path, "boards:\n  - {name: a, host: 10.0.0.1, training_memory: 80MiB}\n"
                               "  - {name: b, local: true, training_memory: 40MiB}\n"))
    assert [b.training_memory for b in inv.boards] == [80 * 2**20, 40 * 2**20]
