"""SSH transport on paramiko: one connection per board, exec channels and SFTP over it.

This module is the channel I/O (run with stdin and a deadline, stream lines, SFTP put);
opening the connection is in ``client``, the shell text it runs is in ``shell``.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import stat
import threading
import time
from typing import TYPE_CHECKING, Iterator

import paramiko

from dsparse_cli.errors import DsparseError, RemoteError
from dsparse_cli.remote.base import (
    OP_TIMEOUT, TIMEOUT_RC, Detached, LineSplitter, RunResult, Transport, timeout_note,
)
from dsparse_cli.remote.client import close_quietly, open_client
from dsparse_cli.remote.shell import detached_script, put_script, sh_wrap, under_home

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

REMOTE_GRACE = 5.0     # extra local wait so the board's own `timeout` can report first
EXIT_QUIET = 1.0       # after the exit status, wait this long for output still in flight


def _lost(method):
    """A dropped connection mid-operation becomes one RemoteError line."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except DsparseError:
            raise
        except (paramiko.SSHException, EOFError, ConnectionError, socket.timeout) as e:
            raise RemoteError(f"{self.where}: connection lost ({type(e).__name__}: {e})",
                              hint="check the board is up and reachable") from e
    return wrapper


class SSHTransport(Transport):
    def __init__(self, target: "Target", *, connect_timeout: float,
                 accept_new_host_keys: bool = False, known_hosts: str | None = None):
        self.target = target
        self.where = f"{target.host}:{target.port}"
        self._client = open_client(target, connect_timeout=connect_timeout,
                                   accept_new_host_keys=accept_new_host_keys,
                                   known_hosts=known_hosts)
        self._client.get_transport().set_keepalive(15)
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_missing: str | bool | None = None   # None: not tried yet; else why it failed
        self._home = "."
        self._lock = threading.Lock()

    # -- commands -------------------------------------------------------------------------
    @_lost
    def run(self, argv_or_cmd: str, *, timeout: float, input: bytes | None = None) -> RunResult:
        chan = self._open_channel(min(OP_TIMEOUT, timeout))  # a dead link must not cost more
        try:
            started = time.monotonic()
            chan.exec_command(sh_wrap(argv_or_cmd, timeout))
            _feed_stdin(chan, input)
            out, err, finished = _collect(chan, started + timeout + REMOTE_GRACE)
            if not finished:
                return RunResult(TIMEOUT_RC, out, err + timeout_note(timeout))
            rc = chan.recv_exit_status()
        finally:
            chan.close()
        if rc == -1:  # exit-signal instead of exit-status
            return RunResult(255, out, err + "\n[dsparse] remote command died without an exit status\n")
        if rc in (TIMEOUT_RC, 137) and time.monotonic() - started >= timeout:
            return RunResult(TIMEOUT_RC, out, err + timeout_note(timeout))
        return RunResult(rc, out, err)

    def stream(self, cmd: str, *, timeout: float | None) -> Iterator[str]:
        try:
            chan = self._open_channel()
            chan.set_combine_stderr(True)
            chan.exec_command(sh_wrap(cmd, timeout))
            chan.shutdown_write()
        except (paramiko.SSHException, EOFError, ConnectionError) as e:
            raise RemoteError(f"{self.where}: connection lost ({e})") from e
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout + REMOTE_GRACE
        lines = LineSplitter()
        try:
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise self._stream_timeout(cmd, timeout)
                eof = chan.eof_received or chan.closed  # read before draining: no lost data
                if chan.recv_ready():
                    yield from lines.feed(chan.recv(65536))
                elif eof:
                    break
                else:
                    select.select([chan], [], [], 1.0 if wait is None else min(wait, 1.0))
            yield from lines.flush()
            # The board's `timeout` usually ends it first: 124 (TERM) or 137 (KILL).
            if (timeout is not None and chan.status_event.wait(REMOTE_GRACE)
                    and chan.exit_status in (TIMEOUT_RC, 137)
                    and time.monotonic() - started >= timeout):
                raise self._stream_timeout(cmd, timeout)
        finally:
            chan.close()

    def _stream_timeout(self, cmd: str, timeout: float) -> RemoteError:
        return RemoteError(f"{self.target.name}: command timed out after {timeout:g}s: {cmd}")

    def _open_channel(self, timeout: float = OP_TIMEOUT) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError(f"{self.where}: the SSH connection is closed",
                              hint="reconnect (the board may have rebooted)")
        return transport.open_session(timeout=timeout)

    # -- files ----------------------------------------------------------------------------
    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                self._sftp = self._client.open_sftp()
                self._sftp.get_channel().settimeout(OP_TIMEOUT)
                self._home = self._sftp.normalize(".")
            return self._sftp

    def _rpath(self, path: str) -> str:
        """SFTP does not expand ``~``: resolve it against the login directory."""
        self._sftp_client()
        return under_home(path, self._home)

    def _mkdir_p(self, directory: str) -> None:
        sftp = self._sftp_client()
        current = "/" if directory.startswith("/") else ""
        for part in [p for p in directory.split("/") if p]:
            current = f"{current}{part}/"
            try:
                if not stat.S_ISDIR(sftp.stat(current).st_mode):
                    raise RemoteError(f"{self.where}: {current} exists and is not a directory")
            except FileNotFoundError:
                sftp.mkdir(current)

    def _has_sftp(self) -> bool:
        """Whether the board's sshd serves SFTP; asked once per connection."""
        if self._sftp_missing is None:
            try:
                self._sftp_client()
                self._sftp_missing = False
            except paramiko.SSHException as e:   # the server refused the subsystem
                self._sftp_missing = str(e) or type(e).__name__
        return not self._sftp_missing

    @_lost
    def put(self, local_path: str, remote_path: str) -> None:
        """Over SFTP; over the exec channel where the board's sshd has no SFTP subsystem
        (minimal images, Dropbear), which is then remembered for this connection."""
        src = os.path.expanduser(local_path)
        if not os.path.isfile(src):
            raise RemoteError(f"cannot copy {local_path} to {self.target.name}: no such local file")
        if not self._has_sftp():
            return self._put_over_exec(src, remote_path)
        dst = self._rpath(remote_path)
        try:
            self._mkdir_p(os.path.dirname(dst))
            sftp = self._sftp_client()
            sftp.put(src, dst)
            sftp.chmod(dst, stat.S_IMODE(os.stat(src).st_mode))
        except OSError as e:
            raise RemoteError(f"cannot write {remote_path} on {self.target.name}: "
                              f"{e.strerror or e}") from e

    @_lost
    def get(self, remote_path: str, local_path: str, *, timeout: float = 300) -> None:
        """Over SFTP (to a temporary name, then renamed); over the exec channel without it."""
        if not self._has_sftp():
            return super().get(remote_path, local_path, timeout=timeout)
        tmp = f"{local_path}.part"
        try:
            self._sftp_client().get(self._rpath(remote_path), tmp)
        except OSError as e:
            raise RemoteError(f"cannot read {remote_path} on {self.target.name}: {e.strerror or e}") from e
        os.replace(tmp, local_path)

    def _put_over_exec(self, src: str, remote_path: str) -> None:
        """`cat` into a temporary name beside the destination, then rename: a reader never sees
        half a file, and an interrupted copy leaves the old file in place."""
        with open(src, "rb") as fh:
            data = fh.read()
        r = self.run(put_script(remote_path, stat.S_IMODE(os.stat(src).st_mode)), timeout=OP_TIMEOUT, input=data)
        if r.rc != 0:
            raise RemoteError(f"cannot write {remote_path} on {self.target.name}: no SFTP subsystem "
                              f"({self._sftp_missing}) and copying over the shell failed: {r.last_error()}")

    # -- detached processes ---------------------------------------------------------------
    @_lost
    def start_detached(self, cmd: str, *, log_path: str, env: dict[str, str] | None = None,
                       cwd: str | None = None) -> Detached:
        r = self.run(detached_script(cmd, log_path=log_path, env=env, cwd=cwd,
                                     python=self.target.python), timeout=OP_TIMEOUT)
        pid = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.rc != 0 or not pid.isdigit():
            detail = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.rc}").splitlines()[-1]
            raise RemoteError(f"{self.target.name}: cannot start {cmd!r}: {detail}")
        return Detached(pid=int(pid), pgid=int(pid))

    @_lost
    def signal(self, pgid: int, sig: int) -> None:
        r = self.run(f"kill -{int(sig)} -{int(pgid)}", timeout=OP_TIMEOUT)
        if r.rc != 0 and "no such process" not in (r.stdout + r.stderr).lower():
            raise RemoteError(f"{self.target.name}: cannot signal process group {pgid}: "
                              f"{(r.stderr or r.stdout).strip()}")

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                self._sftp.close()
                self._sftp = None
        close_quietly(self._client)


def _feed_stdin(chan: paramiko.Channel, data: bytes | None) -> None:
    """Send stdin from a thread: a command that prints a lot before reading its input would
    otherwise deadlock against a blocking sendall."""
    if data is None:
        chan.shutdown_write()
        return

    def feed():
        try:
            chan.sendall(data)
            chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the command ended or the channel was closed: nothing left to feed
    threading.Thread(target=feed, name="dsparse-stdin", daemon=True).start()


def _collect(chan: paramiko.Channel, deadline: float) -> tuple[str, str, bool]:
    """Read stdout/stderr until EOF (or exit status + quiet); False when the deadline hit."""
    out, err = bytearray(), bytearray()

    def drain() -> bool:
        got = False
        while chan.recv_ready():
            out.extend(chan.recv(65536))
            got = True
        while chan.recv_stderr_ready():
            err.extend(chan.recv_stderr(65536))
            got = True
        return got

    exited_at = None
    while True:
        # EOF is processed after all data before it, so checking it first, then draining,
        # can't lose output.
        eof = chan.eof_received or chan.closed
        got = drain()
        now = time.monotonic()
        if eof:
            finished = chan.status_event.wait(max(0.0, deadline - now))
            break
        # A background child that kept stdout open must not hold us past the exit status.
        if chan.exit_status_ready():
            exited_at = exited_at or now
            if not got and now - exited_at >= EXIT_QUIET:
                finished = True
                break
        if now >= deadline:
            finished = False
            break
        if not got:
            select.select([chan], [], [], min(0.1, deadline - now))
    drain()
    decode = lambda b: bytes(b).decode("utf-8", errors="replace")  # noqa: E731
    return decode(out), decode(err), finished
