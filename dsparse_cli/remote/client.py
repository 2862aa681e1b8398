"""Opening a board's paramiko SSHClient: TCP socket or ProxyCommand, identity files, host keys.

Every way connecting can fail becomes one RemoteError/ConfigError line with a hint (the user
sees no paramiko traceback), and ``close_quietly`` stops and reaps a ProxyCommand with it.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import re
import shlex
import socket
import subprocess
from typing import TYPE_CHECKING

import paramiko

from dsparse_cli.errors import ConfigError, DsparseError, RemoteError
from dsparse_cli.remote import hostkeys

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

# paramiko logs handshake failures as ERROR with tracebacks; we report them as one line.
# Keep them out of the terminal unless someone configured the "paramiko" logger (-v).
if logging.getLogger("paramiko").level == logging.NOTSET:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def open_client(target: "Target", *, connect_timeout: float, accept_new_host_keys: bool,
                known_hosts: str | None) -> paramiko.SSHClient:
    keys = _identity_files(target)
    user = target.user or getpass.getuser()
    shown = known_hosts or hostkeys.DEFAULT_KNOWN_HOSTS
    kh_path = os.path.expanduser(shown)
    client = paramiko.SSHClient()
    hostkeys.load_known_hosts(client, kh_path)
    client.set_missing_host_key_policy(hostkeys.HostKeyPolicy(
        kh_path, shown, target.host, target.port, accept_new_host_keys))
    sock = _open_socket(target, connect_timeout)
    client.dsparse_proxy = sock if isinstance(sock, paramiko.ProxyCommand) else None
    try:
        client.connect(
            target.host, port=target.port, username=user, sock=sock,
            key_filename=keys or None, look_for_keys=not keys, allow_agent=not keys,
            timeout=connect_timeout, banner_timeout=connect_timeout,
            auth_timeout=connect_timeout, channel_timeout=connect_timeout)
    except BaseException as e:
        proxy_died = _proxy_failure(client.dsparse_proxy, target)
        close_quietly(client, sock)
        if isinstance(e, DsparseError) or not isinstance(e, Exception):
            raise
        if proxy_died is not None:
            raise proxy_died from e
        if isinstance(e, paramiko.BadHostKeyException):
            raise hostkeys.changed_key_error(kh_path, shown, target.host, target.port,
                                             e.key) from e
        raise _connect_error(e, target, user, keys, connect_timeout) from e
    return client


def _proxy_failure(proxy, target: "Target") -> RemoteError | None:
    """When the ProxyCommand exited, its stderr explains more than a banner timeout."""
    if proxy is None or proxy.process.poll() is None:
        return None
    err = proxy.process.stderr.read().decode(errors="replace").strip().splitlines()
    detail = err[-1] if err else "no output"
    return RemoteError(f"ProxyCommand for {target.name} exited with status "
                       f"{proxy.process.returncode}: {detail}",
                       hint="check proxy_command / ProxyCommand in ~/.ssh/config")


def close_quietly(client: paramiko.SSHClient, sock=None) -> None:
    proxy = client.dsparse_proxy
    client.close()
    if sock is not None:
        sock.close()  # in case the failure came before paramiko owned it
    if proxy is not None:
        proxy.close()
        try:
            proxy.process.wait(timeout=5)  # reap it: no zombie per closed connection
        except subprocess.TimeoutExpired:
            proxy.process.kill()
        for pipe in (proxy.process.stdin, proxy.process.stdout, proxy.process.stderr):
            pipe.close()


def _identity_files(target: "Target") -> list[str]:
    paths = []
    for f in target.identity_files or []:
        path = os.path.expanduser(f)
        if not os.path.isfile(path):
            raise ConfigError(f"identity file {f} for board {target.name} does not exist",
                              hint="fix identity_file in cluster.yaml or IdentityFile in "
                                   "~/.ssh/config")
        try:
            _load_key(path)
        except paramiko.PasswordRequiredException as e:
            raise ConfigError(f"identity file {f} for board {target.name} is encrypted",
                              hint="use a key without a passphrase, or load it into ssh-agent "
                                   "and drop identity_file") from e
        except (paramiko.SSHException, ValueError, TypeError, OSError) as e:
            raise ConfigError(f"identity file {f} for board {target.name} is not a usable "
                              f"private key ({e})") from e
        paths.append(path)
    return paths


def _load_key(path: str) -> paramiko.PKey:
    """Load like paramiko's client does (PKey.from_path mishandles encrypted keys)."""
    error: Exception = paramiko.SSHException("unknown key type")
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            raise
        except (paramiko.SSHException, ValueError, TypeError) as e:
            error = e
    raise error


class _Proxy(paramiko.ProxyCommand):
    def close(self):
        # paramiko's transport thread closes it too; the process may be reaped already.
        try:
            super().close()
        except ProcessLookupError:
            pass


def _open_socket(target: "Target", timeout: float):
    if target.proxy_command:
        tokens = {"h": target.host, "p": str(target.port),
                  "r": target.user or getpass.getuser(), "%": "%"}
        cmd = re.sub(r"%([hpr%])", lambda m: tokens[m.group(1)], target.proxy_command)
        try:
            # Through a shell, as OpenSSH does (pipes, $VARS); exec so close() stops the proxy.
            return _Proxy("/bin/sh -c " + shlex.quote("exec " + cmd))
        except Exception as e:
            raise RemoteError(f"{target.name}: ProxyCommand failed to start: {cmd} ({e})") from e
    try:
        return socket.create_connection((target.host, target.port), timeout=timeout)
    except Exception as e:
        raise _connect_error(e, target, target.user or getpass.getuser(), [], timeout) from e


def _connect_error(e: Exception, target: "Target", user: str, keys: list[str],
                   timeout: float) -> RemoteError:
    where = f"{target.host}:{target.port}"
    silent = RemoteError(f"{where} did not answer within {timeout:g}s (unreachable?)",
                         hint="check the address, the network and that the board is on")
    if isinstance(e, socket.gaierror):
        return RemoteError(f"cannot resolve host {target.host} (board {target.name})",
                           hint="check host in cluster.yaml or HostName in ~/.ssh/config")
    if isinstance(e, socket.timeout):
        return silent
    if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
        return RemoteError(f"connection refused on {where} (is sshd running?)")
    if isinstance(e, paramiko.AuthenticationException):
        with_keys = "with key " + ", ".join(keys) if keys else "with the agent and ~/.ssh keys"
        return RemoteError(
            f"authentication failed for {user}@{target.host} {with_keys}",
            hint=f"add the public key to the board's authorized_keys "
                 f"(ssh-copy-id -p {target.port} {user}@{target.host})")
    if isinstance(e, paramiko.ProxyCommandFailure):
        return RemoteError(f"{target.name}: ProxyCommand failed: {e}")
    if isinstance(e, paramiko.SSHException):
        cause = e.__context__
        # "No existing session": start_client's own wait ran out before key exchange ended.
        if (isinstance(cause, socket.timeout) or "timeout" in str(e).lower()
                or "No existing session" in str(e)):
            return silent
        if "banner" in str(e) or isinstance(cause, EOFError):
            return RemoteError(f"{where} closed the connection before the SSH handshake "
                               f"finished (not an SSH server, or it refused us)")
        if "No authentication methods" in str(e):
            return RemoteError(f"authentication failed for {user}@{target.host}: no key to offer",
                               hint="set identity_file in cluster.yaml")
        return RemoteError(f"SSH to {where} failed: {e}")
    if isinstance(e, OSError):
        return RemoteError(f"cannot reach {where}: {e.strerror or e}",
                           hint="check the address and the network")
    return RemoteError(f"SSH to {where} failed: {type(e).__name__}: {e}")
