"""Bad input through the real `dsparse` entry point: one line, a documented exit code, no traceback."""

from __future__ import annotations

import os

import pytest

from helpers import one_line_error, run_cli

BAD_INVENTORIES = {
    "malformed": ("boards:\n  - {name: a, host: h\n", "malformed YAML"),
    "unknown_key": ("boards:\n  - name: a\n    hots: h\n", "did you mean 'host'"),
    "duplicate": ("boards:\n  - {name: a, local: true}\n  - {name: a, local: true}\n", "duplicate board name"),
    "missing_host": ("boards:\n  - {name: a}\n", "has no host"),
    "bad_memory": ("boards:\n  - {name: a, local: true, memory_limit: 3 parsecs}\n", "not a memory size"),
}   # a missing identity file is not among them: that board fails, the inventory loads (inventory.py)


@pytest.mark.parametrize("command", ["probe", "plan", "train", "status"])
@pytest.mark.parametrize("case", sorted(BAD_INVENTORIES))
def test_bad_inventory_every_command(tmp_path, command, case):
    text, needle = BAD_INVENTORIES[case]
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    proc = run_cli(command, "--cluster", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in one_line_error(proc)


def test_missing_cluster_file(tmp_path):
    proc = run_cli("probe", "--cluster", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in one_line_error(proc)


@pytest.mark.parametrize("args", [("probe", "--cluster", "{path}", "-v"), ("-v", "probe", "--cluster", "{path}"),
                                  ("--verbose", "-c", "{path}", "status")])
def test_verbose_shows_traceback(tmp_path, args):
    """-v and --cluster are the app's options: they work before the verb as well as after it."""
    path = tmp_path / "cluster.yaml"
    path.write_text("boards:\n  - {name: a}\n")
    proc = run_cli(*(a.format(path=path) for a in args), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "has no host" in proc.stderr


USAGE_ERRORS = {  # args -> the whole error line
    "unknown option": (["probe", "--jsn"], "unknown option --jsn; did you mean --json? (see `dsparse probe --help`)"),
    "not a number": (["train", "--epochs", "x"],
                     "--epochs must be a whole number, not 'x' (see `dsparse train --help`)"),
    "out of range": (["train", "--epochs", "0"], "--epochs must be at least 1, not '0' (see `dsparse train --help`)"),
    "zero timeout": (["probe", "--connect-timeout", "0"],
                     "--connect-timeout must be at least 0.1, not '0' (see `dsparse probe --help`)"),
    "negative timeout before the verb": (["--connect-timeout", "-1", "status"],
                                         "--connect-timeout must be at least 0.1, not '-1' (see `dsparse --help`)"),
    "missing value": (["status", "--job"], "option '--job' requires an argument (see `dsparse --help`)"),
    "unknown command": (["prob"], "no such command 'prob'; did you mean 'probe'? (see `dsparse --help`)"),
    "flag given a value": (["probe", "--json", "true"],
                           "got unexpected extra argument(s) (true) (see `dsparse probe --help`)"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line(tmp_path, case):
    """Click's usage errors, our value ranges included: one line, exit 2, no validation jargon."""
    args, line = USAGE_ERRORS[case]
    # a cluster file that does not exist: were the arguments accepted, nothing would start
    proc = run_cli("--cluster", str(tmp_path / "absent.yaml"), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_line_error(proc) == f"error: {line}"


def test_status_without_job(tmp_path):
    proc = run_cli("status", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no job has been started" in one_line_error(proc)


def test_messages_quoting_board_errors_are_not_read_as_markup(capsys):
    """Board errors quote paths like gloo's "[/__w/.../unbound_buffer.cc:129]": printed as text."""
    from dsparse_cli.console import error, warning

    gloo = "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out"
    error(f"board b2 failed: {gloo}")
    warning(f"[bold]{gloo}")
    err = capsys.readouterr().err
    assert f"error: board b2 failed: {gloo}" in err and f"warning: [bold]{gloo}" in err


def test_ctrl_c_anywhere_is_one_line_and_130(tmp_path):
    """Typer turns a stray KeyboardInterrupt into a silent exit 130; the user must still be told."""
    import signal
    import socket
    import subprocess
    import sys

    from helpers import wait_for

    silent = socket.socket()   # accepts, never sends an SSH banner: probe waits on it
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    silent.settimeout(30)
    (tmp_path / "cluster.yaml").write_text(
        f"boards:\n  - {{name: mute, host: 127.0.0.1, port: {silent.getsockname()[1]}, user: nobody}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "dsparse_cli", "probe", "--connect-timeout", "60"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even under `timeout`
    try:
        conn, _ = silent.accept()
        assert wait_for(lambda: proc.poll() is None, 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        conn.close()
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 130, err
    assert one_line_error(subprocess.CompletedProcess([], 130, "", err)) == "error: interrupted"
