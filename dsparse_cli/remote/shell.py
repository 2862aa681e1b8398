"""Shell text that runs on a board: quoting, the detached launcher, the liveness check.

Plain string building (no paramiko), so the local transport and the job poll share it: the
one definition of "alive" (a zombie is dead) lives here and is run by every caller.
"""

from __future__ import annotations

import math
import shlex

from dsparse_cli.errors import ConfigError

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


def under_home(path: str, home: str) -> str:
    """`path` with a leading ``~`` resolved against ``home``: SFTP and quoted commands do not expand it."""
    if path == "~" or path.startswith("~/"):
        return (home.rstrip("/") + path[1:]) or "/"
    return path


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


def alive_check(pid: int) -> str:
    """Shell that prints ``alive`` while ``pid`` runs and is not a zombie, ``stopped`` while it
    exists but is stopped (SIGSTOP, a debugger: it cannot take part in a job), else ``dead``."""
    p = int(pid)
    if p <= 0:  # kill -0 0 / -1 would test our own group / every process
        return "echo dead"
    # kill -0 also succeeds for zombies (unreaped, e.g. when PID 1 does not reap): the State
    # line tells them apart (Z zombie, X dead; T/t stopped). Without /proc, kill -0 alone decides.
    state = f"/proc/{p}/status"
    return (f"if kill -0 {p} 2>/dev/null && ! grep -q '^State:[[:space:]]*[ZX]' {state} 2>/dev/null; then "
            f"if grep -q '^State:[[:space:]]*[Tt]' {state} 2>/dev/null; then echo stopped; else echo alive; fi; "
            "else echo dead; fi")


def put_script(remote_path: str, mode: int) -> str:
    """Shell that writes its stdin to ``remote_path`` (dirs created, ``mode`` set) atomically."""
    dst = sh_path(remote_path)
    tmp = sh_path(f"{remote_path}.tmp.dsparse")
    return (f'mkdir -p "$(dirname {dst})" && cat > {tmp} && chmod {mode:o} {tmp} && mv -f {tmp} {dst} '
            f'|| {{ rm -f {tmp}; exit 1; }}')


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
