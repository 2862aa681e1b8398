"""The emulated edge cluster (scripts/edge-testbed) driven from tests: the testbed CLI, a handle
on one testbed, and why it cannot run here (tests/e2e/conftest.py makes fixtures of it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EDGE_TESTBED = REPO / "scripts" / "edge-testbed"


def testbed_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EDGE_TESTBED), *args], capture_output=True, text=True,
                          timeout=timeout)


def skip_reason() -> str | None:
    """Why the testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "edge-testbed needs root (network namespaces, cgroups)"
    if not shutil.which("ip") or not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support (iproute2 `ip` or /proc/self/ns/net missing)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"no network namespace support: {probe.stderr.decode(errors='replace').strip()}"
    return None


@dataclass
class Testbed:
    __test__ = False  # not a test class, whatever pytest thinks of the name
    dir: Path

    @property
    def record(self) -> dict:
        return json.loads((self.dir / "testbed.json").read_text())

    def board(self, name: str) -> dict:
        return next(b for b in self.record["boards"] if b["name"] == name)

    def ssh(self, board: str, command: str, *, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """The system ssh client with only the testbed's key and known_hosts (strict checking)."""
        return subprocess.run(ssh_argv(self.dir, self.board(board)["addr"]) + [command], input=input,
                              capture_output=True, text=True, timeout=timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return testbed_cli(*args, "--dir", str(self.dir))


def ssh_argv(directory: Path, addr: str) -> list[str]:
    return ["ssh", "-o", f"UserKnownHostsFile={directory}/known_hosts", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-i", f"{directory}/id_ed25519", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"root@{addr}"]


def require_testbed() -> None:
    """Skip the calling test (with the reason) where the testbed cannot run."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@contextmanager
def running_testbed(directory: Path, *up_args: str):
    """A testbed made by `up UP_ARGS` in `directory`; `down` always runs afterwards. Both must succeed."""
    tb = Testbed(directory)
    up = tb.cli("up", *up_args)
    try:
        assert up.returncode == 0, f"edge-testbed up failed:\n{up.stdout}\n{up.stderr}"
        yield tb
    finally:
        down = tb.cli("down")
        assert down.returncode == 0, f"edge-testbed down failed:\n{down.stdout}\n{down.stderr}"
