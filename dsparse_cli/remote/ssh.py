"""SSH transport on paramiko: one connection per board, exec channels and SFTP over it."""

from __future__ import annotations

import errno
import functools
import getpass
import logging
import math
import os
import re
import select
import shlex
import socket
import stat
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Iterator

import paramiko

from dsparse_cli.errors import ConfigError, DsparseError, RemoteError
from dsparse_cli.remote import hostkeys
from dsparse_cli.remote.base import (
    TIMEOUT_RC, Detached, LineSplitter, RunResult, Transport, timeout_note,
)

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

# paramiko logs handshake failures as ERROR with tracebacks; we report them as one line.
# Keep them out of the terminal unless someone configured the "paramiko" logger (-v).
if logging.getLogger("paramiko").level == logging.NOTSET:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

OP_TIMEOUT = 30.0      # small housekeeping commands (signal, alive, start_detached)
REMOTE_GRACE = 5.0     # extra local wait so the board's own `timeout` can report first
EXIT_QUIET = 1.0       # after the exit status, wait this long for output still in flight

# Runs on the board: become a session leader *without* forking, report the pid on fd 3 only
# then (so the pid we return is already its own pgid: no window where signalling the group
# would miss it), and undo the SIG_IGN that a non-interactive `&` and Python leave behind
# (inherited across exec, they would make torchrun deaf to Ctrl-C / SIGPIPE).
_LAUNCHER = (
    "import os,signal,sys\n"
    "for n in ('SIGINT','SIGQUIT','SIGPIPE','SIGXFSZ'):\n"
    "    s=getattr(signal,n,None)\n"
    "    if s is not None: signal.signal(s,signal.SIG_DFL)\n"
    "os.setsid()\n"
    "os.write(3,b'%d\\n'%os.getpid())\n"
    "os.close(3)\n"
    "os.execv('/bin/sh',['/bin/sh','-c',sys.argv[1]])\n"
)


def sh_path(path: str) -> str:
    """Quote a path for sh, keeping a leading ``~`` meaningful ($HOME)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def sh_wrap(cmd: str, timeout: float | None = None) -> str:
    """What to hand sshd so that ``cmd`` runs under /bin/sh whatever the login shell is,
    killed (with its process group) by the board's own ``timeout`` when it has one."""
    q = shlex.quote(cmd)
    inner = f"exec /bin/sh -c {q}"
    if timeout is not None:
        secs = max(1, math.ceil(timeout))
        inner = (f"if command -v timeout >/dev/null 2>&1; then "
                 f"exec timeout -k 2 {secs} /bin/sh -c {q}; fi; {inner}")
    return "/bin/sh -c " + shlex.quote(inner)


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
            note = "\n[dsparse] remote command died without an exit status\n"
            return RunResult(255, out, err + note)
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
        if path == "~":
            return self._home
        if path.startswith("~/"):
            return self._home.rstrip("/") + path[1:]
        return path

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

    @_lost
    def put(self, local_path: str, remote_path: str) -> None:
        src = os.path.expanduser(local_path)
        if not os.path.isfile(src):
            raise RemoteError(f"cannot copy {local_path} to {self.target.name}: no such local file")
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
    def get(self, remote_path: str, local_path: str) -> None:
        dst = os.path.expanduser(local_path)
        src = self._rpath(remote_path)
        try:
            sftp = self._sftp_client()
            sftp.stat(src)  # fail before paramiko creates an empty local file
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            sftp.get(src, dst)
        except OSError as e:
            raise RemoteError(f"cannot copy {remote_path} from {self.target.name}: "
                              f"{e.strerror or e}") from e

    @_lost
    def read_text(self, remote_path: str) -> str | None:
        try:
            with self._sftp_client().open(self._rpath(remote_path), "r") as f:
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RemoteError(f"cannot read {remote_path} on {self.target.name}: "
                              f"{e.strerror or e}") from e

    # -- detached processes ---------------------------------------------------------------
    @_lost
    def start_detached(self, cmd: str, *, log_path: str, env: dict[str, str] | None = None,
                       cwd: str | None = None) -> Detached:
        r = self.run(detached_script(cmd, log_path=log_path, env=env, cwd=cwd,
                                     python=self.target.python), timeout=OP_TIMEOUT)
        pid = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.rc != 0 or not pid.isdigit():
            detail = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.rc}")
            detail = detail.splitlines()[-1]
            raise RemoteError(f"{self.target.name}: cannot start {cmd!r}: {detail}")
        return Detached(pid=int(pid), pgid=int(pid))

    @_lost
    def signal(self, pgid: int, sig: int) -> None:
        r = self.run(f"kill -{int(sig)} -{int(pgid)}", timeout=OP_TIMEOUT)
        if r.rc != 0 and "no such process" not in (r.stdout + r.stderr).lower():
            raise RemoteError(f"{self.target.name}: cannot signal process group {pgid}: "
                              f"{(r.stderr or r.stdout).strip()}")

    @_lost
    def alive(self, pid: int) -> bool:
        p = int(pid)
        # kill -0 also succeeds for zombies (unreaped, e.g. when PID 1 does not reap): read
        # the state letter after the last ')' in /proc/PID/stat.
        script = (f"kill -0 {p} 2>/dev/null || exit 1; "
                  f"s=$(sed 's/.*) //' /proc/{p}/stat 2>/dev/null | cut -c1); "
                  f'[ "$s" != Z ] && [ "$s" != X ]')
        r = self.run(script, timeout=OP_TIMEOUT)
        if r.rc not in (0, 1):
            raise RemoteError(f"{self.target.name}: cannot check process {p}: {r.stderr.strip()}")
        return r.rc == 0

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                self._sftp.close()
                self._sftp = None
        _close_quietly(self._client)


def detached_script(cmd: str, *, log_path: str, env: dict[str, str] | None, cwd: str | None,
                    python: str) -> str:
    """Shell script that starts ``cmd`` as a session leader and prints its pid."""
    log = sh_path(log_path)
    py = sh_path(python)
    lines = ["set -e"]
    if cwd:
        lines.append(f"cd {sh_path(cwd)}")
    lines.append(f'mkdir -p "$(dirname {log})"')
    for key, value in (env or {}).items():
        if not key.isidentifier():
            raise ConfigError(f"invalid environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"command -v {py} >/dev/null 2>&1 || "
                 f"{{ echo 'python not found on the board: {python}' >&2; exit 127; }}")
    # $(...) returns once the launcher closed fd 3, i.e. after setsid.
    lines.append(f"pid=$({py} -c {shlex.quote(_LAUNCHER)} {shlex.quote(cmd)} "
                 f"3>&1 >>{log} 2>&1 </dev/null &)")
    lines.append(f'[ -n "$pid" ] || {{ echo "the launcher failed, see {log_path}" >&2; exit 1; }}')
    lines.append('echo "$pid"')
    return "\n".join(lines)


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


# -- connecting -----------------------------------------------------------------------------
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
        _close_quietly(client, sock)
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


def _close_quietly(client: paramiko.SSHClient, sock=None) -> None:
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
