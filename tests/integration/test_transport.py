"""SSHTransport against a real OpenSSH sshd on 127.0.0.1 (see tests/sshd.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from dsparse_cli.errors import ConfigError, RemoteError
from dsparse_cli.remote import TIMEOUT_RC, connect
from dsparse_cli.remote.ssh import SSHTransport
from dsparse_cli.remote.base import Detached
from sshd import keygen

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def ssh(sshd, make_target):
    t = connect(make_target(), connect_timeout=10, known_hosts=sshd.known_hosts)
    yield t
    t.close()


def _stat_fields(pid: int) -> list[str]:
    """Fields after comm in /proc/PID/stat: [state, ppid, pgrp, session, ...]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                f = _stat_fields(int(entry))
            except OSError:
                continue
            if int(f[2]) == pgid and f[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def _wait_for(predicate, limit=10.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- commands -------------------------------------------------------------------------------
def test_connect_gives_ssh_transport(ssh):
    assert isinstance(ssh, SSHTransport)


def test_run_captures_stdout_stderr_and_rc(ssh):
    r = ssh.run("echo out; echo err >&2; exit 7", timeout=10)
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_run_uses_posix_sh(ssh):
    # $0 of `sh -c` is the shell itself; on Debian /bin/sh is dash, never the login bash.
    r = ssh.run('echo "$0"', timeout=10)
    assert r.stdout.strip() == "/bin/sh"


def test_run_feeds_stdin_to_python_script(ssh, sshd):
    script = b"import sys\nprint(sum(int(a) for a in sys.argv[1:]), sys.stdin.read() == '')\n"
    r = ssh.run(f"{ssh.target.python} - 2 3 4", timeout=20, input=script)
    assert r.rc == 0, r.stderr
    assert r.stdout.split() == ["9", "True"]


def test_run_with_large_input_and_output(ssh):
    data = os.urandom(300_000).hex().encode()  # 600 kB: several SSH windows each way
    r = ssh.run("cat; cat >&2 </dev/null", timeout=30, input=data)
    assert r.rc == 0
    assert r.stdout.encode() == data


def test_run_timeout_kills_the_command_group(ssh, tmp_path):
    pidfile = tmp_path / "child.pid"
    r = ssh.run(f"sleep 30 & echo $! > {pidfile}; wait", timeout=1.5)
    assert r.rc == TIMEOUT_RC
    assert "timed out after 1.5s" in r.stderr
    child = int(pidfile.read_text())
    assert _wait_for(lambda: not ssh.alive(child)), "the background sleep survived the timeout"


def test_run_returns_after_exit_even_if_a_child_keeps_stdout_open(ssh, tmp_path):
    pidfile = tmp_path / "bg.pid"
    try:
        r = ssh.run(f"sleep 20 & echo $! > {pidfile}; echo done", timeout=15)
        assert (r.rc, r.stdout) == (0, "done\n")
    finally:
        if pidfile.exists():  # sshd is local: clean up the sleep we caused
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stream_yields_lines_in_order(ssh):
    lines = list(ssh.stream("for i in 1 2 3; do echo line$i; done; printf tail", timeout=10))
    assert lines == ["line1", "line2", "line3", "tail"]


def test_stream_merges_stderr(ssh):
    assert list(ssh.stream("echo a; echo b >&2", timeout=10)) == ["a", "b"]


def test_stream_timeout_raises(ssh):
    got = []
    with pytest.raises(RemoteError, match="timed out after 1s"):
        for line in ssh.stream("echo first; sleep 30", timeout=1):
            got.append(line)
    assert got == ["first"]


# -- files ------------------------------------------------------------------------------------
def test_put_creates_dirs_and_keeps_mode(ssh, tmp_path):
    src = tmp_path / "src.sh"
    src.write_text("#!/bin/sh\necho héllo\n")
    src.chmod(0o755)
    remote = tmp_path / "remote" / "deep" / "er" / "copy.sh"
    ssh.put(str(src), str(remote))
    assert remote.read_text() == src.read_text()
    assert remote.stat().st_mode & 0o777 == 0o755


def test_tilde_paths_resolve_to_the_login_home(ssh, tmp_path):
    rel = f".dsparse-test-{uuid.uuid4().hex[:8]}"
    home_dir = Path(os.path.expanduser("~")) / rel  # sshd is local and runs as this user
    try:
        (tmp_path / "f.txt").write_text("tilde")
        ssh.put(str(tmp_path / "f.txt"), f"~/{rel}/sub/f.txt")
        assert (home_dir / "sub" / "f.txt").read_text() == "tilde"
    finally:
        shutil.rmtree(home_dir, ignore_errors=True)


def test_get_copies_a_file_back_byte_exact(ssh, tmp_path):
    src = tmp_path / "board" / "model.pt"
    src.parent.mkdir()
    src.write_bytes(bytes(range(256)) * 300)
    dest = tmp_path / "here.pt"
    ssh.get(str(src), str(dest))
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(RemoteError, match="cannot read"):
        ssh.get(str(tmp_path / "absent.pt"), str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()


def test_put_missing_local_file_is_remote_error(ssh, tmp_path):
    with pytest.raises(RemoteError, match="no such local file"):
        ssh.put(str(tmp_path / "absent"), str(tmp_path / "x"))


# -- detached processes -----------------------------------------------------------------------
def test_start_detached_is_session_leader_then_signal_stops_group(ssh, tmp_path):
    log = tmp_path / "logs" / "worker.log"
    workdir = tmp_path / "wd"
    workdir.mkdir()
    d = ssh.start_detached('echo "start $FOO $(pwd)"; sleep 60 & sleep 60; echo never',
                           log_path=str(log), env={"FOO": "it's here"}, cwd=str(workdir))
    assert isinstance(d, Detached) and d.pid == d.pgid
    state, _ppid, pgrp, session = _stat_fields(d.pid)[:4]
    assert int(pgrp) == d.pid and int(session) == d.pid
    assert _wait_for(lambda: log.exists() and "start" in log.read_text())
    assert log.read_text().strip() == f"start it's here {workdir}"
    assert _wait_for(lambda: len(_group_members(d.pgid)) == 3)  # sh + 2 sleeps
    assert ssh.alive(d.pid)

    ssh.signal(d.pgid, signal.SIGTERM)
    assert _wait_for(lambda: not ssh.alive(d.pid))
    assert _wait_for(lambda: _group_members(d.pgid) == [])
    assert "never" not in log.read_text()
    ssh.signal(d.pgid, signal.SIGTERM)  # the group is gone: not an error


def _ignored_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


def test_detached_command_still_hears_sigint(ssh, tmp_path):
    # A non-interactive `cmd &` starts with SIGINT ignored and Python ignores SIGPIPE; both
    # survive exec unless reset, and torchrun would then ignore a Ctrl-C forwarded by `stop`.
    d = ssh.start_detached("exec sleep 60", log_path=str(tmp_path / "s.log"))
    assert _wait_for(lambda: "sleep" in Path(f"/proc/{d.pid}/cmdline").read_text())
    mask = _ignored_signals(d.pid)
    assert not mask & (1 << (signal.SIGINT - 1)) and not mask & (1 << (signal.SIGPIPE - 1))
    ssh.signal(d.pgid, signal.SIGINT)
    assert _wait_for(lambda: not ssh.alive(d.pid))


def test_concurrent_commands_on_one_connection(ssh):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: ssh.run(f"echo {i}", timeout=20), range(12)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]


def test_start_detached_appends_to_log(ssh, tmp_path):
    log = tmp_path / "append.log"
    log.write_text("old\n")
    d = ssh.start_detached("echo new", log_path=str(log))
    assert _wait_for(lambda: not ssh.alive(d.pid))
    assert _wait_for(lambda: log.read_text() == "old\nnew\n")


def test_detached_survives_closing_the_connection(sshd, make_target, tmp_path):
    t = connect(make_target(), connect_timeout=10, known_hosts=sshd.known_hosts)
    d = t.start_detached("sleep 60", log_path=str(tmp_path / "s.log"))
    t.close()
    t2 = connect(make_target(), connect_timeout=10, known_hosts=sshd.known_hosts)
    try:
        time.sleep(0.3)
        assert t2.alive(d.pid)
        t2.signal(d.pgid, signal.SIGKILL)
        assert _wait_for(lambda: not t2.alive(d.pid))
    finally:
        t2.close()


def test_start_detached_bad_cwd_is_remote_error(ssh, tmp_path):
    with pytest.raises(RemoteError, match="cannot start"):
        ssh.start_detached("true", log_path=str(tmp_path / "l.log"), cwd=str(tmp_path / "none"))


def test_start_detached_missing_python_is_remote_error(sshd, make_target, tmp_path):
    t = connect(make_target(python="/nonexistent/python3"), connect_timeout=10,
                known_hosts=sshd.known_hosts)
    try:
        with pytest.raises(RemoteError, match="python not found"):
            t.start_detached("true", log_path=str(tmp_path / "l.log"))
    finally:
        t.close()


def test_alive_false_for_unknown_pid(ssh):
    assert ssh.alive(4_000_000) is False  # above any pid_max


# -- host keys --------------------------------------------------------------------------------
def test_unknown_host_key_refused_then_accepted_with_flag(sshd, make_target, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"  # does not exist yet
    with pytest.raises(RemoteError) as err:
        connect(make_target(), connect_timeout=10, known_hosts=str(known))
    line = err.value.one_line()
    assert f"host key for 127.0.0.1:{sshd.port} is not known" in line
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known}" in line
    assert "--accept-new-host-keys" in line
    assert not known.exists()

    t = connect(make_target(), connect_timeout=10, known_hosts=str(known),
                accept_new_host_keys=True)
    t.close()
    assert known.read_text() == f"{sshd.hostkey_name} {sshd.host_public_key}\n"
    assert known.stat().st_mode & 0o777 == 0o600
    # Now known: connects without the flag, and the file is not touched again.
    connect(make_target(), connect_timeout=10, known_hosts=str(known)).close()
    assert known.read_text().count("\n") == 1


def test_accepting_keeps_existing_lines(sshd, make_target, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("# comment\nother.example ssh-ed25519 " + sshd.host_key_b64)  # no newline
    connect(make_target(), connect_timeout=10, known_hosts=str(known),
            accept_new_host_keys=True).close()
    lines = known.read_text().splitlines()
    assert lines[:2] == ["# comment", f"other.example ssh-ed25519 {sshd.host_key_b64}"]
    assert lines[2] == f"{sshd.hostkey_name} {sshd.host_public_key}"


def _other_host_key(tmp_path) -> str:
    return " ".join(keygen(tmp_path / f"other_{uuid.uuid4().hex[:6]}").split()[:2])


@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_always_refused(sshd, make_target, tmp_path, accept_new):
    known = tmp_path / "known_hosts"
    text = f"# first\n{sshd.hostkey_name} {_other_host_key(tmp_path)}\n"
    known.write_text(text)
    with pytest.raises(RemoteError) as err:
        connect(make_target(), connect_timeout=10, known_hosts=str(known),
                accept_new_host_keys=accept_new)
    line = err.value.one_line()
    assert f"host key for 127.0.0.1:{sshd.port} has CHANGED" in line
    assert f"{known} line 2" in line
    assert f"ssh-keygen -R '{sshd.hostkey_name}' -f {known}" in line
    assert known.read_text() == text


def test_hashed_known_hosts_entries(sshd, make_target, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"{sshd.hostkey_name} {sshd.host_public_key}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")
    connect(make_target(), connect_timeout=10, known_hosts=str(known)).close()

    known.write_text(f"{sshd.hostkey_name} {_other_host_key(tmp_path)}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    with pytest.raises(RemoteError, match=r"CHANGED.*line 1"):
        connect(make_target(), connect_timeout=10, known_hosts=str(known))


def test_port_22_style_entry_does_not_match_other_port(sshd, make_target, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"127.0.0.1 {sshd.host_public_key}\n")  # what `ssh 127.0.0.1` would store
    with pytest.raises(RemoteError, match="is not known"):
        connect(make_target(), connect_timeout=10, known_hosts=str(known))


# -- connection failures ----------------------------------------------------------------------
def test_wrong_client_key_is_authentication_failure(sshd, make_target, tmp_path):
    stranger = tmp_path / "stranger_ed25519"
    keygen(stranger)
    with pytest.raises(RemoteError) as err:
        connect(make_target(identity_files=[str(stranger)]), connect_timeout=10,
                known_hosts=sshd.known_hosts)
    assert f"authentication failed for {sshd.user}@127.0.0.1 with key {stranger}" in \
        err.value.one_line()


def test_missing_identity_file_is_config_error(sshd, make_target, tmp_path):
    with pytest.raises(ConfigError, match="identity file .*absent_key.* does not exist"):
        connect(make_target(identity_files=[str(tmp_path / "absent_key")]), connect_timeout=10,
                known_hosts=sshd.known_hosts)


def test_encrypted_identity_file_is_config_error(sshd, make_target, tmp_path):
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)],
                   check=True, capture_output=True)
    with pytest.raises(ConfigError, match="is encrypted"):
        connect(make_target(identity_files=[str(key)]), connect_timeout=10,
                known_hosts=sshd.known_hosts)


def test_closed_port_is_connection_refused(sshd, make_target):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError) as err:
        connect(make_target(port=port), connect_timeout=10, known_hosts=sshd.known_hosts)
    assert err.value.one_line() == f"connection refused on 127.0.0.1:{port} (is sshd running?)"


@pytest.mark.timeout(20)
def test_silent_listener_fails_within_connect_timeout(sshd, make_target):
    # The TCP handshake completes (kernel backlog) but no SSH banner ever comes.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        port = hole.getsockname()[1]
        with pytest.raises(RemoteError) as err:
            connect(make_target(port=port), connect_timeout=1.5, known_hosts=sshd.known_hosts)
    assert f"127.0.0.1:{port} did not answer within 1.5s (unreachable?)" in err.value.one_line()


@pytest.mark.timeout(20)
def test_full_backlog_fails_within_connect_timeout(sshd, make_target):
    # listen(0) with its queue filled: Linux drops further SYNs, so the TCP connect itself
    # hangs until our timeout (the closest loopback gets to an unplugged board).
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        port = hole.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                fillers.append(c)
            with pytest.raises(RemoteError) as err:
                connect(make_target(port=port), connect_timeout=1.5,
                        known_hosts=sshd.known_hosts)
        finally:
            for c in fillers:
                c.close()
    assert f"127.0.0.1:{port} did not answer within 1.5s (unreachable?)" in err.value.one_line()


def test_unresolvable_host_is_remote_error(sshd, make_target):
    with pytest.raises(RemoteError, match="cannot resolve host no-such-board.invalid"):
        connect(make_target(host="no-such-board.invalid"), connect_timeout=5,
                known_hosts=sshd.known_hosts)


# A ProxyCommand that just pipes to %h:%p, as `ssh -W` through a jump host would.
PROXY = ("python3 -c \"import os,socket,threading;assert len('%%')==1;"
         "s=socket.create_connection(('%h',%p));"
         "threading.Thread(target=lambda:[s.sendall(b) for b in iter(lambda:os.read(0,65536),"
         "b'')],daemon=True).start();[os.write(1,b) for b in iter(lambda:s.recv(65536),b'')]\"")


def test_proxy_command_reaches_the_board(sshd, make_target):
    t = connect(make_target(proxy_command=PROXY), connect_timeout=10,
                known_hosts=sshd.known_hosts)
    try:
        assert t.run("echo via-proxy", timeout=10).stdout == "via-proxy\n"
        proc = t._client.dsparse_proxy.process
    finally:
        t.close()
    assert proc.poll() is not None  # the proxy process is stopped and reaped


def test_failing_proxy_command_reports_its_error(sshd, make_target):
    proxy = "python3 -c \"import sys; sys.exit('jump host says no')\""
    with pytest.raises(RemoteError,
                       match="ProxyCommand for b0 exited with status 1: jump host says no"):
        connect(make_target(proxy_command=proxy), connect_timeout=3, known_hosts=sshd.known_hosts)


def test_lost_connection_is_remote_error(sshd, make_target):
    t = connect(make_target(), connect_timeout=10, known_hosts=sshd.known_hosts)
    t._client.get_transport().close()  # as if the board rebooted
    with pytest.raises(RemoteError, match="connection is closed"):
        t.run("true", timeout=5)
    t.close()


# -- the runtime package on a board ------------------------------------------------------------------
def test_the_runtime_is_shipped_in_one_tar_and_not_again(ssh, tmp_path, monkeypatch):
    from dsparse_cli.jobs import datapush, shipping

    pkg = str(tmp_path / "board" / "pkg")
    sent = []
    real_send = datapush.send_tar
    monkeypatch.setattr(datapush, "send_tar", lambda *a: sent.append(a[2]) or real_send(*a))
    shipping.ship_runtime(ssh, pkg, tmp_path)
    assert len(sent) == 1 and len(sent[0]) == len(shipping.runtime_files()) > 20     # one tar, every file
    for local, rel in shipping.runtime_files():
        assert Path(pkg, rel).read_bytes() == local.read_bytes(), rel
    assert [p.name for p in Path(pkg).glob(".runtime-*")] == [f".runtime-{shipping.runtime_digest()}"]
    shipping.ship_runtime(ssh, pkg, tmp_path)
    assert len(sent) == 1                      # the board has this very runtime: nothing is sent
    Path(pkg, ".runtime-" + shipping.runtime_digest()).rename(Path(pkg, ".runtime-0000"))  # another version
    shipping.ship_runtime(ssh, pkg, tmp_path)
    assert len(sent) == 2 and [p.name for p in Path(pkg).glob(".runtime-*")] == [f".runtime-{shipping.runtime_digest()}"]
