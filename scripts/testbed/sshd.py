"""One OpenSSH sshd per board, started inside the board's namespace and memory cgroup."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from .errors import TestbedError

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"


def keygen(path: Path, comment: str) -> str:
    """Fresh ed25519 key pair without passphrase; -> 'ssh-ed25519 AAAA...' (type and key)."""
    for p in (path, Path(f"{path}.pub")):
        p.unlink(missing_ok=True)
    proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise TestbedError(f"ssh-keygen failed: {proc.stderr.strip()}")
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def write_config(run_dir: Path, addr: str, authorized_keys: Path) -> Path:
    cfg = run_dir / "sshd_config"
    cfg.write_text("\n".join([
        "Port 22",
        f"ListenAddress {addr}",
        f"HostKey {run_dir / 'host_ed25519'}",
        "PidFile none",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin yes",
        "UsePAM no",
        "StrictModes no",              # keys live in the testbed dir, which may be group-writable
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "UseDNS no",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
        "MaxStartups 64",
        "MaxSessions 64",
        "LogLevel VERBOSE",
        "",
    ]))
    return cfg


def write_start_script(run_dir: Path, hostname: str, mounts: str, cgroups: list[str], config: Path) -> Path:
    """The board's init: re-mount cgroupfs, join the board's cgroups (memory; cpu when v1 keeps it
    in a hierarchy of its own), then become sshd.

    It runs under `ip netns exec NS unshare --uts`, all of which exec in place, so the PID
    `up` records is sshd's, and every session sshd forks is born inside the memory limit.
    """
    script = run_dir / "start-sshd.sh"
    script.write_text("\n".join([
        "#!/bin/sh",
        "set -e",
        mounts,
        # The board's own, empty shell start-up files (this namespace only): SSH sessions run the
        # login shell, which would source this machine's ~/.bashrc, and a `reboot` that kills one
        # mid-way could leave this machine's state behind (pyenv's rehash lock, seen).
        f": > {run_dir / 'bashrc'}",
        *(f'[ -f "$HOME/{f}" ] && mount --bind {run_dir / "bashrc"} "$HOME/{f}"' for f in (".bashrc", ".profile")),
        *(f"echo $$ > {cg}/cgroup.procs" for cg in cgroups),
        f"hostname {hostname}",
        f"exec {SSHD} -D -e -f {config}",
        "",
    ]))
    return script


def start(netns: str, script: Path, log: Path) -> subprocess.Popen:
    _privsep_dir()
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--uts", "/bin/sh", str(script)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    return proc


def wait_listening(addr: str, proc: subprocess.Popen, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise TestbedError(f"sshd for {addr} exited: {' | '.join(tail) or 'no output'} (log: {log})")
        try:
            with socket.create_connection((addr, 22), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TestbedError(f"sshd for {addr} did not listen within {timeout:.0f}s (log: {log})")


def _privsep_dir() -> None:
    try:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
    except OSError as e:
        raise TestbedError(f"cannot create sshd's privilege separation dir {PRIVSEP_DIR}: {e.strerror}")
