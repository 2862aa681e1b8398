"""cluster.yaml: the inventory of boards, validated, with ~/.ssh/config applied.

Precedence for a board's connection settings: the board's own keys, then the matching
`~/.ssh/config` entry (HostName, User, Port, IdentityFile, ProxyCommand), then `defaults`.
Host-specific settings beat generic defaults, as they do for ssh itself.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsparse_cli.errors import ConfigError
from dsparse_cli.sizes import parse_size

DEFAULT_PYTHON = "python3"
DEFAULT_WORKDIR = "~/.dsparse-work"
DEFAULT_MASTER_PORT = 29500


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Defaults(_Strict):
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: str | None = None
    python: str | None = None
    workdir: str | None = None
    known_hosts: str | None = None   # default ~/.ssh/known_hosts


class Master(_Strict):
    addr: str | None = None
    port: int = Field(default=DEFAULT_MASTER_PORT, ge=1, le=65535)


class BoardSpec(_Strict):
    name: str = Field(min_length=1)
    host: str | None = None
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: str | None = None
    python: str | None = None
    workdir: str | None = None
    kind: Literal["jetson", "rpi", "x86", "auto"] = "auto"
    memory_limit: int | None = None
    iface: str | None = None
    local: bool = False

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, v):
        return None if v is None else parse_size(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"board name {v!r} may use only letters, digits, '.', '_' and '-'")
        return v


class ClusterSpec(_Strict):
    name: str = "cluster"
    defaults: Defaults = Defaults()
    master: Master = Master()
    boards: list[BoardSpec] = Field(min_length=1)


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

    def board(self, name: str) -> Target:
        for b in self.boards:
            if b.name == name:
                return b
        names = [b.name for b in self.boards]
        raise ConfigError(f"no board named {name!r} in cluster {self.name!r}", _did_you_mean(name, names))


# The built-in demo cluster: four simulated boards on this machine with different memory
# budgets (whole-process bytes), so probe -> plan -> train -> status runs with no hardware.
# Sized for `make demo` (mobilenet_v2, batch 32, 64x64, --exclude-small) with the CUDA build of
# torch: each board holds the worker (a process base of 733-1000 MiB, depending on the
# environment, plus 39-215 MiB of training) and torchrun's agent (~292 MiB). At a 733 MiB base
# they train 20 / 20 / 17 / 13 units; at 1000 MiB the two small ones are left out.
BUILTIN_BOARDS = (("demo-x86", "2000MiB"), ("demo-jetson", "1650MiB"), ("demo-rpi4", "1400MiB"),
                  ("demo-rpi3", "1300MiB"))


def builtin_cluster(state_dir: Path | None = None) -> Inventory:
    boards = [
        Target(name, "127.0.0.1", 22, None, [], None, os.environ.get("DSPARSE_PYTHON", _this_python()),
               f"{_state_dir(state_dir)}/boards/{name}", True, parse_size(limit), None, "auto")
        for name, limit in BUILTIN_BOARDS
    ]
    return Inventory("demo", boards, "127.0.0.1", DEFAULT_MASTER_PORT, None, True, _state_dir(state_dir),
                     master_explicit=True)


def _this_python() -> str:
    import sys

    return sys.executable


def _state_dir(state_dir: Path | None) -> Path:
    return (state_dir or Path.cwd() / ".dsparse").resolve()


def _did_you_mean(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _location(loc: tuple, raw: dict) -> str:
    """('boards', 2, 'hots') -> "boards[2] (name 'pi-1')"."""
    parts = []
    node = raw
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else f".{item}")
        node = node[item] if isinstance(node, (dict, list)) and _has(node, item) else None
        if isinstance(item, int) and isinstance(node, dict) and "name" in node:
            parts[-1] += f" ({node['name']})"
    return "".join(parts).lstrip(".")


def _has(node, key) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and key < len(node)


def _line_of(text: str, loc: tuple) -> int | None:
    """1-based line of the YAML key or item at `loc`, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for item in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == item]
            if not match:
                return line
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _validation_message(exc: ValidationError, raw: dict, path: Path, text: str) -> str:
    err = exc.errors()[0]
    loc = err["loc"]
    line = _line_of(text, loc)
    if line:
        path = f"{path}: line {line}"
    where = _location(loc[:-1], raw) if loc else ""
    if err["type"] == "extra_forbidden":
        model = {"boards": BoardSpec, "defaults": Defaults, "master": Master}.get(
            loc[0] if len(loc) > 1 else "", ClusterSpec
        )
        hint = _did_you_mean(str(loc[-1]), model.model_fields) or f"valid keys: {', '.join(model.model_fields)}"
        return f"{path}: unknown key {loc[-1]!r}{' in ' + where if where else ''} ({hint})"
    field_name = ".".join(str(x) for x in loc[-1:])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {where + '.' if where else ''}{field_name}: {msg}"


def load_inventory(path: str | Path | None, *, ssh_config: str | Path | None = None) -> Inventory:
    """Load and validate cluster.yaml. `path=None` looks for ./cluster.yaml and falls back to
    the built-in demo cluster."""
    if path is None:
        if not Path("cluster.yaml").exists():
            return builtin_cluster()
        path = "cluster.yaml"
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"cluster file {path} does not exist", "create it from cluster.yaml.example")
    raw = _read_yaml(path)
    try:
        spec = ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, raw, path, path.read_text())) from None
    _check_unique(spec, path)
    lookup = _ssh_config_lookup(ssh_config)
    boards = [_resolve(b, spec.defaults, lookup, path) for b in spec.boards]
    master_addr = spec.master.addr or boards[0].host
    state_dir = path.resolve().parent / ".dsparse"
    return Inventory(spec.name, boards, master_addr, spec.master.port, path, False, state_dir,
                     master_explicit=bool(spec.master.addr))


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'name' and 'boards', got {type(raw).__name__}")
    return raw


def _check_unique(spec: ClusterSpec, path: Path) -> None:
    seen: set[str] = set()
    for b in spec.boards:
        if b.name in seen:
            raise ConfigError(f"{path}: duplicate board name {b.name!r}", "each board needs its own name")
        seen.add(b.name)


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


def _resolve(b: BoardSpec, d: Defaults, lookup, path: Path) -> Target:
    if b.local:  # runs here: this interpreter, a workdir next to the inventory
        local_dir = Path(b.workdir).expanduser() if b.workdir else path.resolve().parent / ".dsparse" / "boards" / b.name
        return Target(b.name, "127.0.0.1", 22, None, [], None, b.python or _this_python(), str(local_dir),
                      True, b.memory_limit, b.iface, b.kind)
    python = b.python or d.python or DEFAULT_PYTHON
    workdir = b.workdir or d.workdir or DEFAULT_WORKDIR
    if not b.host:
        raise ConfigError(f"{path}: board {b.name!r} has no host", "add `host:` or `local: true`")
    ssh = lookup(b.host)
    identity = b.identity_file or _first(ssh.get("identityfile")) or d.identity_file
    identity = str(_relative_to(path, identity)) if identity else None
    if identity and not Path(identity).exists():
        raise ConfigError(f"{path}: identity file {identity} for board {b.name!r} does not exist",
                          "fix identity_file or create the key with ssh-keygen")
    port = b.port or _int(ssh.get("port")) or d.port or 22
    user = b.user or ssh.get("user") or d.user
    known_hosts = str(_relative_to(path, d.known_hosts)) if d.known_hosts else None
    return Target(b.name, ssh.get("hostname", b.host), port, user,
                  [str(Path(identity).expanduser())] if identity else [], ssh.get("proxycommand"),
                  python, workdir, False, b.memory_limit, b.iface, b.kind, known_hosts)


def _relative_to(inventory: Path, value: str) -> Path:
    """A relative path in cluster.yaml is relative to the file, not to the current directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else inventory.resolve().parent / p


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _int(value) -> int | None:
    return int(value) if value else None
