"""A real OpenSSH sshd on 127.0.0.1 for tests (no mocks: the transport talks to the real thing).

    server = start_sshd(tmp_dir)     # raises SSHDUnavailable when sshd cannot run here
    ...  server.host, server.port, server.user, server.client_key, server.known_hosts
    server.stop()

Everything lives in ``tmp_dir``: host key, client key pair, authorized_keys, sshd_config,
a known_hosts file holding the ``[127.0.0.1]:PORT`` entry, and sshd.log (read it when a test
fails). Only the sshd PID started here is ever signalled.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"
NOT_INSTALLED = "openssh-server not installed (CI installs it via .ci/run)"


class SSHDUnavailable(RuntimeError):
    """sshd cannot run on this machine; tests should skip with this reason."""


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    client_key: str          # private key accepted by the server
    known_hosts: str         # file with this server's [host]:port entry
    host_public_key: str     # "ssh-ed25519 AAAA..." (type and base64)
    dir: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def host_key_b64(self) -> str:
        return self.host_public_key.split()[1]

    @property
    def hostkey_name(self) -> str:
        return f"[{self.host}]:{self.port}"

    @property
    def log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def keygen(path: Path, comment: str = "dsparse-test") -> str:
    """Create an ed25519 key pair without passphrase; return the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return Path(f"{path}.pub").read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(d: Path, port: int, sftp: bool = True) -> str:
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {d / 'host_ed25519'}",
        f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "StrictModes no",          # tmp dirs are world-writable-ish; fine for tests
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin yes",     # CI runs as root
        "Subsystem sftp internal-sftp" if sftp else "# no SFTP subsystem (minimal images, Dropbear)",
        "MaxStartups 64",
        "MaxSessions 64",
        "LogLevel VERBOSE",
        "",
    ])


def _check_environment() -> None:
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        raise SSHDUnavailable(NOT_INSTALLED)
    if not os.path.isdir(PRIVSEP_DIR):
        try:
            os.makedirs(PRIVSEP_DIR, mode=0o755)
        except OSError as e:
            raise SSHDUnavailable(f"cannot create sshd privilege separation dir "
                                  f"{PRIVSEP_DIR}: {e.strerror}") from e


def start_sshd(directory: str | Path, *, attempts: int = 3, sftp: bool = True) -> SSHServer:
    """Start sshd in the foreground (-D -e) on a free loopback port; wait until it accepts."""
    _check_environment()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(d / "host_ed25519", "dsparse-test-host")
    client_pub = keygen(d / "client_ed25519", "dsparse-test-client")
    (d / "authorized_keys").write_text(client_pub + "\n")
    last_log = ""
    for _ in range(attempts):  # a free port can be taken between probe and bind: retry
        port = free_port()
        server = _launch(d, port, host_pub, sftp)
        if server is not None:
            return server
        last_log = (d / "sshd.log").read_text(errors="replace")
    raise SSHDUnavailable(f"sshd did not start: {last_log.strip()[-500:]}")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM sshd if the test process dies without stop()."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _launch(d: Path, port: int, host_pub: str, sftp: bool = True) -> SSHServer | None:
    config = d / "sshd_config"
    config.write_text(_config(d, port, sftp))
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        proc.wait()
        return None
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    return SSHServer(host="127.0.0.1", port=port, user=getpass.getuser(),
                     client_key=str(d / "client_ed25519"), known_hosts=str(known),
                     host_public_key=" ".join(host_pub.split()[:2]), dir=d, proc=proc)
