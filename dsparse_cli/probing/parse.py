"""Control side of the probe: turn the board script's stdout into a `DeviceInfo`.

Never imports torch (`dsparse probe` must stay fast).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dsparse_cli.contract import ContractError, _emit, _take   # the contract's record reader and writer
from dsparse_cli.errors import RemoteError

_CONTEXT_CHARS = 120


@dataclass
class DeviceInfo:
    """One board as probed. Field names are the `dsparse probe --json` contract; keys a newer
    board script prints are kept in `extra` (read like the contract's records, `contract._take`)."""

    name: str
    ok: bool = True
    error: str | None = None

    hostname: str | None = None
    kind: str = "unknown"                      # jetson|rpi|x86|arm|unknown
    model: str | None = None
    l4t_release: str | None = None
    arch: str | None = None
    cpus: int | None = None
    cpus_allowed: int | None = None
    cpu_quota: float | None = None
    cpus_effective: int | None = None          # min(affinity, quota rounded down), >= 1: its torch threads
    cpu_model: str | None = None
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None
    zram_bytes: int | None = None
    nvmap_bytes: int | None = None
    cgroup_version: int | None = None
    cgroup_limit_bytes: int | None = None
    cgroup_usage_bytes: int | None = None
    memory_limit_bytes: int | None = None
    usable_memory_bytes: int | None = None
    usable_memory_source: str | None = None    # meminfo|cgroup|inventory
    python: str | None = None
    python_executable: str | None = None
    torch: str | None = None
    torch_timed_out: bool = False              # `import torch` was too slow to tell
    torchvision: str | None = None
    gloo: bool | None = None                   # torch.distributed with gloo (some Jetson wheels lack it)
    link_bytes_per_s: float | None = None      # measured by `probe --links` (to the master board)
    cuda: bool = False
    cuda_device: str | None = None
    cuda_memory_bytes: int | None = None
    cuda_shared_memory: bool = False           # Jetson: GPU memory IS usable_memory
    disk_free_bytes: int | None = None
    workdir: str | None = None
    iface: str | None = None
    address: str | None = None
    warnings: list = field(default_factory=list)
    # Kept by the probe cache: a board that fails a later probe keeps its last good result.
    probed_at: float | None = None             # when this result was measured (this machine's clock)
    stale_error: str | None = None             # why the newest probe of the board failed
    extra: dict = field(default_factory=dict)  # e.g. `master`, the address the probe routed to

    @classmethod
    def failed(cls, name: str, error: str) -> "DeviceInfo":
        return cls(name=name, ok=False, error=error)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "probe result") -> "DeviceInfo":
        """Checked as the contract checks a document: a ContractError names the first bad key."""
        return _take(cls, doc, where)

    def to_dict(self) -> dict:
        """The JSON document: the fields, then the kept unknown keys."""
        return _emit(self)


def _context_line(text: str) -> str:
    """First non-empty line, or the last one for a traceback (that is where the error is)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= _CONTEXT_CHARS else line[:_CONTEXT_CHARS] + "..."


def _find_json_object(stdout: str) -> dict | None:
    """The script prints one JSON line; shell rc files may print banners before it."""
    text = (stdout or "").strip()
    for cand in [text] + [ln.strip() for ln in reversed(text.splitlines())]:
        if not cand.startswith("{"):
            continue
        try:
            value = json.loads(cand)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_probe_output(name: str, stdout: str, stderr: str = "") -> DeviceInfo:
    """Board script stdout -> DeviceInfo; RemoteError (one line) when it is not a JSON object."""
    data = _find_json_object(stdout)
    if data is None:
        context = _context_line(stdout) or _context_line(stderr) or "no output"
        raise RemoteError(f"{name}: probe printed no JSON object: {context}",
                          hint="check that the board's python (3.6+) runs: python3 - < board_script.py")
    data = {k: v for k, v in data.items() if k not in ("name", "ok", "error")}
    try:
        return DeviceInfo.from_dict({**data, "name": name}, where="probe output")
    except ContractError as e:
        raise RemoteError(f"{name}: {e}", hint="the board script and this dsparse version may not match") from None
