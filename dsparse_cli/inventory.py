"""cluster.yaml: the inventory of boards, checked, with ~/.ssh/config applied.

Precedence for a board's connection settings: the board's own keys, then the matching
`~/.ssh/config` entry (HostName, User, Port, IdentityFile, ProxyCommand), then `defaults`.
Host-specific settings beat generic defaults, as they do for ssh itself.

Every mistake in the file is reported at once, one line each with its line number. A board whose
entry is right but whose surroundings are not (its identity file does not exist) still loads: the
problem rides on its `Target.error` and is raised by `Target.check()` when the board is contacted,
so one broken board does not block commands that never use it.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsparse_cli.contract import ALLOCATORS
from dsparse_cli.errors import ConfigError
from dsparse_cli.sizes import parse_rate, parse_size

DEFAULT_PYTHON = "python3"
DEFAULT_WORKDIR = "~/.dsparse-work"
DEFAULT_MASTER_PORT = 29500
LAUNCHERS = ("dsparse", "torchrun")   # the first is the default: runtime/supervise.py, no torch in it
KINDS = ("jetson", "rpi", "x86", "auto")


@dataclass(frozen=True)
class Target:
    """Everything needed to reach one board, with ~/.ssh/config already applied."""

    name: str
    host: str
    port: int
    user: str | None
    identity_files: list[str]
    proxy_command: str | None
    python: str
    workdir: str
    local: bool
    memory_limit: int | None
    iface: str | None
    kind: str
    known_hosts: str | None = None
    error: str | None = None    # why this board cannot be used as written; raised by check()
    data_dir: str | None = None  # where this board keeps its dataset files (`dsparse data push`)
    training_memory: int | None = None   # simulated boards: budget = measured base + launcher + this
    link: float | None = None   # the board's link rate to the others, bytes/s (`link: 100mbit`)
    threads: int | None = None  # torch threads of its worker (default: the CPUs it may really use)
    allocator: str = ALLOCATORS[0]   # its worker's memory allocator (contract.ALLOCATORS)

    def check(self) -> Target:
        """This target, or the ConfigError its cluster.yaml entry holds for whoever contacts it."""
        if self.error:
            raise ConfigError(self.error)
        return self


@dataclass
class Inventory:
    name: str
    boards: list[Target]
    master_addr: str
    master_port: int
    path: Path | None
    builtin: bool = False
    state_dir: Path = field(default_factory=lambda: Path(".dsparse"))
    master_explicit: bool = False   # master.addr was written in cluster.yaml (else: the first board's host)
    warnings: list[str] = field(default_factory=list)   # loads, but looks wrong: the CLI prints these
    launcher: str = LAUNCHERS[0]    # what starts the worker on each board (`launcher:` in cluster.yaml)

    def board(self, name: str) -> Target:
        for b in self.boards:
            if b.name == name:
                return b
        raise ConfigError(f"no board named {name!r} in cluster {self.name!r}",
                          _did_you_mean(name, [b.name for b in self.boards]))


# The built-in demo cluster: four simulated boards on this machine. Each is given a training
# allowance, not an absolute limit: its budget is the process base measured by `dsparse plan`
# plus the launcher plus this much training memory, so the demo plans the same on any machine
# (the base moves by +-130 MiB between environments). Sized for `make demo` (mobilenet_v2,
# batch 32, 64x64), whose last k units need 33.3 MiB (k=1), 74.3 (13) / 84.2 (14), 112.2 (16) /
# 141.2 (17) / 189.3 (18) and 215.8 MiB (all 20) of training memory, as a worker
# reports it (profile format 5: private memory, within 0.5 MiB in three environments here):
# each allowance sits between two steps, so the boards train 20 / 17 / 16 / 13 units, four
# different nested plans.
BUILTIN_BOARDS = (("demo-x86", "256MiB"), ("demo-jetson", "165MiB"), ("demo-rpi4", "126MiB"),
                  ("demo-rpi3", "79MiB"))


def builtin_cluster(state_dir: Path | None = None) -> Inventory:
    state_dir = (state_dir or Path.cwd() / ".dsparse").resolve()
    boards = [
        Target(name, "127.0.0.1", 22, None, [], None, os.environ.get("DSPARSE_PYTHON", sys.executable),
               f"{state_dir}/boards/{name}", True, None, None, "auto", training_memory=parse_size(allowance))
        for name, allowance in BUILTIN_BOARDS
    ]
    return Inventory("demo", boards, "127.0.0.1", DEFAULT_MASTER_PORT, None, True, state_dir, master_explicit=True)


def _did_you_mean(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def load_inventory(path: str | Path | None, *, ssh_config: str | Path | None = None) -> Inventory:
    """Load and check cluster.yaml. `path=None` looks for ./cluster.yaml and falls back to the
    built-in demo cluster. Raises one ConfigError that lists every problem of the file."""
    if path is None:
        if not Path("cluster.yaml").exists():
            return builtin_cluster()
        path = "cluster.yaml"
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"cluster file {path} does not exist", "create it from cluster.yaml.example")
    name, defaults, master, specs, warnings, launcher = _check(_read_yaml(path), path)
    lookup = _ssh_config_lookup(ssh_config)
    boards = [_resolve(b, line, defaults, lookup, path) for b, line in specs]
    addr = master.get("addr")
    return Inventory(name, boards, addr or boards[0].host, master.get("port", DEFAULT_MASTER_PORT), path, False,
                     path.resolve().parent / ".dsparse", master_explicit=bool(addr), warnings=warnings,
                     launcher=launcher)


# --- reading: YAML that keeps line numbers ----------------------------------------------------

class _Map(dict):   # a YAML mapping that knows the line of each key
    lines: dict = {}


class _Seq(list):   # a YAML list that knows the line of each item
    lines: list = []


class _Loader(yaml.SafeLoader):
    """A SafeLoader whose mappings and lists know the line of each key and item."""

    def mapping(self, node: yaml.MappingNode):
        m = _Map()
        yield m
        m.update(self.construct_mapping(node))
        m.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}

    def sequence(self, node: yaml.SequenceNode):
        s = _Seq()
        yield s
        s.extend(self.construct_sequence(node))
        s.lines = [item.start_mark.line + 1 for item in node.value]


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.sequence)


def _read_yaml(path: Path) -> _Map:
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: malformed YAML at column {mark.column + 1}" if mark else "malformed YAML"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: line 1: expected a mapping with `name:` and `boards:`, got {_show(raw)}",
                          "see cluster.yaml.example")
    return raw


# --- checking: each key's rule, and every problem of the file noted with its line --------------

def _show(value) -> str:
    return "nothing" if value is None else "a list" if isinstance(value, list) else \
        "a mapping" if isinstance(value, dict) else repr(value)


def _rule(accepts, wanted: str, convert=lambda value: value):
    """A key's rule: the value (converted) if `accepts` it, else a ValueError 'must be <wanted>'."""
    def rule(value):
        if not accepts(value):
            raise ValueError(f"must be {wanted}, got {_show(value)}")
        return convert(value)
    return rule


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)   # YAML's `true` is no number


_text = _rule(lambda v: isinstance(v, str) or _number(v), "text", str)   # `user: 1000` is text too
_port = _rule(lambda v: _number(v) and 1 <= v <= 65535 and v == int(v), "a number from 1 to 65535", int)
_flag = _rule(lambda v: isinstance(v, bool), "true or false")


def _one_of(choices: tuple[str, ...]):
    def rule(value) -> str:
        if value not in choices:
            close = _did_you_mean(str(value), choices)
            raise ValueError(f"must be {' or '.join(choices)}, got {_show(value)}" + (f" ({close})" if close else ""))
        return value
    return rule


_launcher, _allocator = _one_of(LAUNCHERS), _one_of(ALLOCATORS)

_kind = _rule(lambda v: v in KINDS, "one of " + ", ".join(KINDS))
_threads = _rule(lambda v: _number(v) and v >= 1 and v == int(v), "a whole number of at least 1", int)
_as_is = _rule(lambda v: True, "anything")   # defaults, master, boards: _check looks inside


def _board_name(value) -> str:
    value = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"{value!r} may use only letters, digits, '.', '_' and '-'")
    return value


_REACH = {"user": _text, "port": _port, "identity_file": _text, "python": _text, "workdir": _text,
          "data_dir": _text, "link": parse_rate, "threads": _threads, "allocator": _allocator}
_KEYS = {  # section -> key -> rule (a rule returns the value to use, or raises ValueError saying why not)
    "cluster": {"name": _text, "defaults": _as_is, "master": _as_is, "boards": _as_is, "launcher": _launcher},
    "defaults": {**_REACH, "known_hosts": _text},
    "master": {"addr": _text, "port": _port},
    "board": {"name": _board_name, "host": _text, **_REACH, "kind": _kind, "memory_limit": parse_size,
              "training_memory": parse_size, "iface": _text, "local": _flag},
}


class _Problems:
    """Every problem of one file as (line, text); raised together as one ConfigError."""

    def __init__(self, path: Path):
        self.path, self.found = path, []

    def note(self, line: int, what: str, fix: str | None = None) -> None:
        self.found.append((line, f"{what} ({fix})" if fix else what))

    def keys(self, mapping, section: str, where: str, line: int) -> dict:
        """The keys of `mapping` that `section` knows, each checked by its rule; the rest noted."""
        if not isinstance(mapping, dict):
            self.note(line, f"{where} must be a mapping of keys, got {_show(mapping)}")
            return {}
        rules, prefix, checked = _KEYS[section], f"{where}: " if where else "", {}
        for key, value in mapping.items():
            at = getattr(mapping, "lines", {}).get(key, line)
            if key not in rules:
                fix = _did_you_mean(str(key), rules) or f"valid keys: {', '.join(rules)}"
                self.note(at, f"{prefix}unknown key {key!r}", fix)
            elif value is not None:
                try:
                    checked[key] = rules[key](value)
                except ValueError as exc:
                    self.note(at, f"{prefix}{key} {exc}")
        return checked

    def raise_if_any(self) -> None:
        if self.found:
            lines = sorted(self.found, key=lambda problem: problem[0])
            raise ConfigError("\n".join(f"{self.path}: line {n}: {text}" for n, text in lines))


def _check(raw: _Map, path: Path) -> tuple[str, dict, dict, list[tuple[dict, int]], list[str], str]:
    """The file's name, defaults, master and boards (each with its line), its warnings and launcher."""
    problems = _Problems(path)
    top = problems.keys(raw, "cluster", "", 1)
    defaults = problems.keys(top.get("defaults", {}), "defaults", "defaults", raw.lines.get("defaults", 1))
    master = problems.keys(top.get("master", {}), "master", "master", raw.lines.get("master", 1))
    items, at = top.get("boards"), raw.lines.get("boards", 1)
    if not isinstance(items, list) or not items:
        what = "no boards" if items is None else "boards is empty" if items == [] else \
            f"boards must be a list, got {_show(items)}"
        problems.note(at, what, "list each board under `boards:` as `- name: ...`")
        items = _Seq()
    boards, warnings, first_line = [], [], {}
    for i, item in enumerate(items):
        raw_name, line = item.get("name") if isinstance(item, dict) else None, items.lines[i]
        where = f"board {raw_name!r}" if isinstance(raw_name, str) else f"board #{i + 1}"
        board = problems.keys(item, "board", where, line)
        name = board.get("name")
        if isinstance(item, dict) and raw_name is None:
            problems.note(line, f"{where} has no name", "add `name: ...`")
        if name in first_line:
            problems.note(line, f"duplicate board name {name!r}",
                          f"line {first_line[name]} has it too; each board needs its own name")
        elif name:
            first_line[name] = line
        if board.get("local") and "host" in board:
            warnings.append(f"{path}: line {line}: {where} is local: its host: is ignored")
        elif isinstance(item, dict) and not item.get("local") and item.get("host") is None \
                and not difflib.get_close_matches("host", map(str, item)):   # else a typo of it was named
            problems.note(line, f"{where} has no host", "add `host:` or `local: true`")
        boards.append((board, line))
    problems.raise_if_any()
    return top.get("name", "cluster"), defaults, master, boards, warnings, top.get("launcher", LAUNCHERS[0])


# --- resolving: a checked board entry -> Target -------------------------------------------------

def _ssh_config_lookup(ssh_config: str | Path | None):
    import paramiko

    cfg_path = Path(ssh_config or Path.home() / ".ssh" / "config").expanduser()
    if not cfg_path.exists():
        return lambda host: {}
    try:
        cfg = paramiko.SSHConfig.from_path(str(cfg_path))
    except Exception as exc:  # paramiko raises several types for bad files
        raise ConfigError(f"cannot parse ssh config {cfg_path}: {exc}") from None
    return cfg.lookup


def _resolve(b: dict, line: int, d: dict, lookup, path: Path) -> Target:
    name, limit, iface, kind = b["name"], b.get("memory_limit"), b.get("iface"), b.get("kind", "auto")
    if b.get("local"):  # runs here: this interpreter, a workdir next to the inventory
        workdir = Path(b["workdir"]).expanduser() if "workdir" in b else path.resolve().parent / ".dsparse" / "boards" / name
        return Target(name, "127.0.0.1", 22, None, [], None, b.get("python") or sys.executable, str(workdir),
                      True, limit, iface, kind, data_dir=b.get("data_dir") or d.get("data_dir"),
                      training_memory=b.get("training_memory"), **_shared(b, d))
    ssh = lookup(b["host"])
    identity = b.get("identity_file") or (ssh.get("identityfile") or [None])[0] or d.get("identity_file")
    identity = str(_relative_to(path, identity)) if identity else None
    error = None
    if identity and not Path(identity).exists():   # only this board's problem, raised when it is contacted
        error = (f"{path}: line {line}: board {name!r}: identity file {identity} does not exist "
                 "(fix identity_file or create the key with ssh-keygen)")
    known_hosts = str(_relative_to(path, d["known_hosts"])) if "known_hosts" in d else None
    return Target(name, ssh.get("hostname", b["host"]), b.get("port") or int(ssh.get("port", 0)) or d.get("port") or 22,
                  b.get("user") or ssh.get("user") or d.get("user"), [identity] if identity else [],
                  ssh.get("proxycommand"), b.get("python") or d.get("python") or DEFAULT_PYTHON,
                  b.get("workdir") or d.get("workdir") or DEFAULT_WORKDIR, False, limit, iface, kind, known_hosts, error,
                  b.get("data_dir") or d.get("data_dir"), training_memory=b.get("training_memory"), **_shared(b, d))


def _shared(b: dict, d: dict) -> dict:
    """Keys a board takes from `defaults` when it does not set them, local or not."""
    shared = {key: b.get(key, d.get(key)) for key in ("link", "threads", "allocator")}
    return {key: value for key, value in shared.items() if value is not None}


def _relative_to(inventory: Path, value: str) -> Path:
    """A relative path in cluster.yaml is relative to the file, not to the current directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else inventory.resolve().parent / p

