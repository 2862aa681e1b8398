"""known_hosts handling: verify by default, accept new keys only when asked, never a changed one."""

from __future__ import annotations

import base64
import hashlib
import os
import threading

import paramiko

from dsparse_cli.errors import ConfigError, RemoteError

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_APPEND_LOCK = threading.Lock()  # fan_out connects to many boards at once


def hostkey_name(host: str, port: int) -> str:
    """The name OpenSSH (and paramiko) file a host's key under."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint, so users can compare with ssh-keygen -lf."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_known_hosts(client: paramiko.SSHClient, path: str) -> None:
    """Load ``path`` as the client's trusted keys (system keys: paramiko never rewrites them)."""
    if not os.path.exists(path):
        return
    try:
        client.load_system_host_keys(path)
    except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as e:
        raise ConfigError(f"cannot read known_hosts file {path}: {e}",
                          hint="fix or remove the broken line") from e


def matching_lines(path: str, name: str) -> list[int]:
    """1-based line numbers of ``path`` that hold a key for ``name`` (plain or hashed)."""
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = list(f)
    except OSError:
        return found
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith(("#", "@")):
            continue
        for pattern in fields[0].split(","):
            if pattern == name or (pattern.startswith("|1|")
                                   and paramiko.HostKeys.hash_host(name, pattern) == pattern):
                found.append(lineno)
                break
    return found


def append_known_host(path: str, name: str, key: paramiko.PKey) -> None:
    """Append one ``name type base64`` line, creating the file 0600 (and its dir 0700)."""
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    with _APPEND_LOCK:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only when the host has no key at all in known_hosts."""

    def __init__(self, path: str, shown_path: str, host: str, port: int, accept_new: bool):
        self.path, self.shown_path = path, shown_path
        self.host, self.port, self.accept_new = host, port, accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.accept_new:
            raise RemoteError(
                f"host key for {self.host}:{self.port} is not known",
                hint=f"run `ssh-keyscan -p {self.port} {self.host} >> {self.shown_path}` "
                     "or pass --accept-new-host-keys")
        append_known_host(self.path, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)


def changed_key_error(path: str, shown_path: str, host: str, port: int,
                      offered: paramiko.PKey) -> RemoteError:
    name = hostkey_name(host, port)
    lines = matching_lines(path, name)
    where = f"{shown_path} line {', '.join(map(str, lines))}" if lines else shown_path
    return RemoteError(
        f"host key for {host}:{port} has CHANGED (offered {offered.get_name()} "
        f"{fingerprint(offered)} does not match {where}); refusing to connect",
        hint=f"if the board was reinstalled, remove the old key with "
             f"`ssh-keygen -R '{name}' -f {shown_path}` and reconnect")
