"""`dsparse probe` through the real entry point against a real sshd on loopback plus a local board."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import one_line_error, run_cli
from sshd import keygen

pytestmark = pytest.mark.integration


def meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def cluster(tmp_path: Path, sshd, *, key=None, port=None, python=None, known_hosts=None, local=True) -> Path:
    known = known_hosts if known_hosts is not None else sshd.known_hosts
    lines = [
        "name: loop",
        f"defaults: {{user: {sshd.user}, known_hosts: {known}}}",
        "boards:",
        f"  - name: ssh0\n    host: {sshd.host}\n    port: {port or sshd.port}\n"
        f"    identity_file: {key or sshd.client_key}\n    python: {python or sys.executable}\n"
        f"    workdir: {tmp_path / 'w0'}",
    ]
    if local:
        lines.append("  - {name: here, local: true, memory_limit: 900MiB}")
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def probe_json(tmp_path, path, *extra):
    proc = run_cli("probe", "--cluster", str(path), "--json", "--connect-timeout", "5", *extra, cwd=tmp_path)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def test_probe_ssh_and_local_board(tmp_path, sshd):
    proc, doc = probe_json(tmp_path, cluster(tmp_path, sshd))
    assert proc.returncode == 0, proc.stderr
    assert doc["cluster"] == "loop"
    ssh0, here = doc["boards"]
    for board in (ssh0, here):
        assert board["ok"] and board["error"] is None
        assert board["mem_total_bytes"] == meminfo_total()
        assert 0 < board["usable_memory_bytes"] <= board["mem_available_bytes"] * 1.05
        for key in ("kind", "model", "arch", "cpus", "cgroup_limit_bytes", "python", "torch", "iface", "address"):
            assert key in board
    assert here["usable_memory_bytes"] == 900 * 1024**2
    assert here["usable_memory_source"] == "inventory"
    assert ssh0["address"] == "127.0.0.1" and ssh0["iface"] == "lo"
    assert ssh0["torch"]  # the venv interpreter has torch
    cache = json.loads((tmp_path / ".dsparse" / "probe.json").read_text())
    assert [b["name"] for b in cache["boards"]] == ["ssh0", "here"]


def test_probe_table_names_failures(tmp_path, sshd):
    path = cluster(tmp_path, sshd, python="/nonexistent/python3")
    proc = run_cli("probe", "--cluster", str(path), cwd=tmp_path)
    assert proc.returncode == 1
    assert "failed" in proc.stdout and "not found" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("case,needle", [
    ("python", "python '/nonexistent/python3' not found on board ssh0"),
    ("closed_port", "connection refused"),
    ("wrong_key", "authentication failed"),
])
def test_probe_board_errors(tmp_path, sshd, case, needle):
    kwargs = {}
    if case == "python":
        kwargs["python"] = "/nonexistent/python3"
    elif case == "closed_port":
        from sshd import free_port
        kwargs["port"] = free_port()
    elif case == "wrong_key":
        other = tmp_path / "other_key"
        keygen(other)
        kwargs["key"] = other
    proc, doc = probe_json(tmp_path, cluster(tmp_path, sshd, **kwargs))
    assert proc.returncode == 1, proc.stderr
    ssh0, here = doc["boards"]
    assert not ssh0["ok"] and needle in ssh0["error"], ssh0["error"]
    assert "\n" not in ssh0["error"]
    assert here["ok"]  # the other board carries on


def test_unknown_host_key_refused_then_accepted(tmp_path, sshd):
    known = tmp_path / "known_hosts"
    known.write_text("")
    path = cluster(tmp_path, sshd, known_hosts=known, local=False)
    proc, doc = probe_json(tmp_path, path)
    assert proc.returncode == 1
    assert "--accept-new-host-keys" in doc["boards"][0]["error"]
    assert "ssh-keyscan" in doc["boards"][0]["error"]
    proc, doc = probe_json(tmp_path, path, "--accept-new-host-keys")
    assert proc.returncode == 0, doc
    assert sshd.host_key_b64 in known.read_text()
    proc, doc = probe_json(tmp_path, path)  # now known: no flag needed
    assert proc.returncode == 0


def test_changed_host_key_always_refused(tmp_path, sshd):
    fake = tmp_path / "fake_host_key"
    keygen(fake)
    fake_pub = (tmp_path / "fake_host_key.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} {fake_pub[0]} {fake_pub[1]}\n")
    path = cluster(tmp_path, sshd, known_hosts=known, local=False)
    for extra in ((), ("--accept-new-host-keys",)):
        proc, doc = probe_json(tmp_path, path, *extra)
        assert proc.returncode == 1
        assert "changed" in doc["boards"][0]["error"].lower()


def test_missing_identity_file_fails_that_board_only(tmp_path, sshd):
    """A broken entry is an error for the commands that use that board (issue #16): the probe
    reports it as the board's failure, exit 1, and the file still loads for every other command."""
    path = cluster(tmp_path, sshd, key=tmp_path / "no_such_key")
    proc, doc = probe_json(tmp_path, path)
    assert proc.returncode == 1
    assert "identity file" in doc["boards"][0]["error"] and "does not exist" in doc["boards"][0]["error"]


def test_probe_script_crash_is_reported(tmp_path, sshd):
    # A "python" that exits non-zero with a message, as a broken interpreter on a board would.
    fake = tmp_path / "broken-python"
    fake.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc, doc = probe_json(tmp_path, cluster(tmp_path, sshd, python=str(fake), local=False))
    assert proc.returncode == 1
    assert "probe script failed on board ssh0" in doc["boards"][0]["error"]
    assert "init_fs_encoding" in doc["boards"][0]["error"]
