"""LocalTransport: real subprocesses, real files, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsparse_cli.errors import RemoteError
from dsparse_cli.inventory import Target
from dsparse_cli.remote import TIMEOUT_RC, LocalTransport, connect
from dsparse_cli.remote import local as local_mod

pytestmark = pytest.mark.timeout(60)


def _target(**kw) -> Target:
    fields = dict(name="sim0", host="127.0.0.1", port=22, user=None, identity_files=[],
                  proxy_command=None, python=sys.executable, workdir="/tmp", local=True,
                  memory_limit=None, iface=None, kind="x86")
    fields.update(kw)
    return Target(**fields)


@pytest.fixture
def lt() -> LocalTransport:
    t = connect(_target(), connect_timeout=1)
    assert isinstance(t, LocalTransport)
    return t


def _wait_for(predicate, limit=10.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _proc_state(pid: int) -> str | None:
    """The state letter from /proc/PID/stat (after the *last* ')': comm may hold one)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()[0]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _proc_state(pid) not in ("Z", "X")


# -- run / stream ---------------------------------------------------------------------------
def test_run_captures_rc_stdout_stderr(lt):
    r = lt.run("echo out; echo err >&2; exit 5", timeout=10)
    assert (r.rc, r.stdout, r.stderr) == (5, "out\n", "err\n")
    assert not r.ok and not r.timed_out


def test_run_passes_stdin(lt):
    r = lt.run(f"{sys.executable} - x", timeout=20,
               input=b"import sys; print(sys.argv[1], sys.stdin.read() == '')")
    assert (r.rc, r.stdout) == (0, "x True\n")


def test_run_without_input_sees_eof_on_stdin(lt):
    assert lt.run("cat; echo end", timeout=10).stdout == "end\n"


def test_run_timeout_kills_the_whole_group(lt, tmp_path):
    pidfile = tmp_path / "bg.pid"
    r = lt.run(f"sleep 30 & echo $! > {pidfile}; echo started; wait", timeout=1)
    assert r.rc == TIMEOUT_RC and r.timed_out
    assert r.stdout == "started\n"
    assert "timed out after 1s" in r.stderr
    assert _wait_for(lambda: not _exists(int(pidfile.read_text())))


def test_stream_yields_lines_as_printed(lt):
    out = list(lt.stream("echo a; echo b >&2; printf 'c\\r\\nd'", timeout=10))
    assert out == ["a", "b", "c", "d"]


def test_stream_timeout_raises_and_kills(lt, tmp_path):
    pidfile = tmp_path / "s.pid"
    got = []
    with pytest.raises(RemoteError, match="timed out after 1s"):
        for line in lt.stream(f"echo $$ > {pidfile}; echo one; sleep 30", timeout=1):
            got.append(line)
    assert got == ["one"]
    assert _wait_for(lambda: not _exists(int(pidfile.read_text())))


def test_stream_stopped_early_kills_the_command(lt, tmp_path):
    pidfile = tmp_path / "s.pid"
    gen = lt.stream(f"echo $$ > {pidfile}; while true; do echo tick; sleep 0.05; done",
                    timeout=None)
    assert next(gen) == "tick"
    gen.close()
    assert _wait_for(lambda: not _exists(int(pidfile.read_text())))


# -- files ------------------------------------------------------------------------------------
def test_put_creates_dirs_and_keeps_mode(lt, tmp_path):
    src = tmp_path / "a.sh"
    src.write_text("echo hi\n")
    src.chmod(0o750)
    dst = tmp_path / "x" / "y" / "b.sh"
    lt.put(str(src), str(dst))
    assert dst.read_text() == "echo hi\n" and dst.stat().st_mode & 0o777 == 0o750


def test_tilde_expands_to_home(lt, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "f").write_text("t")
    lt.put(str(tmp_path / "f"), "~/deep/f")
    assert (tmp_path / "home" / "deep" / "f").read_text() == "t"


def test_put_missing_source_is_remote_error(lt, tmp_path):
    with pytest.raises(RemoteError, match="cannot copy"):
        lt.put(str(tmp_path / "absent"), str(tmp_path / "dst"))


# -- detached ---------------------------------------------------------------------------------
def test_start_detached_own_session_env_cwd_and_log(lt, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    log = tmp_path / "logs" / "w.log"
    log.parent.mkdir()
    log.write_text("previous\n")
    d = lt.start_detached('echo "$FOO $(pwd)"; sleep 30 & sleep 30', log_path=str(log),
                          env={"FOO": "from-env"}, cwd=str(wd))
    assert d.pid == d.pgid == os.getpgid(d.pid) == os.getsid(d.pid)
    assert d.pgid != os.getpgid(0)
    assert _wait_for(lambda: log.read_text() == f"previous\nfrom-env {wd}\n")
    assert lt.alive(d.pid)

    lt.signal(d.pgid, signal.SIGTERM)
    assert _wait_for(lambda: not lt.alive(d.pid))
    lt.signal(d.pgid, signal.SIGTERM)  # gone: no error


def test_detached_command_hears_sigint(lt, tmp_path):
    d = lt.start_detached("exec sleep 60", log_path=str(tmp_path / "l"))
    assert _wait_for(lambda: "sleep" in Path(f"/proc/{d.pid}/cmdline").read_text())
    lt.signal(d.pgid, signal.SIGINT)
    assert _wait_for(lambda: not lt.alive(d.pid))


def test_start_detached_missing_cwd(lt, tmp_path):
    with pytest.raises(RemoteError, match="does not exist"):
        lt.start_detached("true", log_path=str(tmp_path / "l"), cwd=str(tmp_path / "nope"))


def test_alive_reaps_an_unregistered_child(lt, tmp_path):
    """A detached child we started but whose Popen we no longer track (as after a restart of
    the bookkeeping) must not look alive as a zombie: alive() reaps it with waitpid."""
    d = lt.start_detached("exit 0", log_path=str(tmp_path / "l"))
    with local_mod._DETACHED_LOCK:
        local_mod._DETACHED.pop(d.pid).returncode = 0  # forget it without reaping
    assert _wait_for(lambda: _proc_state(d.pid) == "Z")
    os.kill(d.pid, 0)  # a zombie still "exists" to kill(pid, 0) ...
    assert lt.alive(d.pid) is False  # ... but is not alive, and is now reaped
    with pytest.raises(ProcessLookupError):
        os.kill(d.pid, 0)


def test_alive_false_for_zombie_that_is_not_our_child(lt):
    # The helper forks a child that exits at once and is never reaped: a zombie whose parent
    # is the helper, not us (waitpid can't help; only /proc state 'Z' tells).
    helper = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time\npid = os.fork()\nif pid == 0: os._exit(0)\n"
         "print(pid, flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        zombie = int(helper.stdout.readline())
        assert _wait_for(lambda: _proc_state(zombie) == "Z")
        assert lt.alive(zombie) is False
        assert lt.alive(helper.pid) is True
    finally:
        helper.kill()
        helper.wait()
        helper.stdout.close()


def test_alive_for_other_process_and_bogus_pids(lt):
    assert lt.alive(os.getpid()) is True
    assert lt.alive(4_000_000) is False
    assert lt.alive(0) is False and lt.alive(-1) is False


def test_alive_handles_parens_in_comm(lt, tmp_path):
    exe = tmp_path / "we ird) name"
    exe.symlink_to("/bin/sleep")
    p = subprocess.Popen([str(exe), "30"])
    try:
        assert _wait_for(lambda: _proc_state(p.pid) == "S")
        assert Path(f"/proc/{p.pid}/comm").read_text().strip().startswith("we ird)")
        assert lt.alive(p.pid) is True
    finally:
        p.kill()
        p.wait()
