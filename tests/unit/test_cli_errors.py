"""Bad input through the real `dsparse` entry point: one line, a documented exit code, no traceback."""

from __future__ import annotations

import pytest

from helpers import one_line_error, run_cli

BAD_INVENTORIES = {
    "malformed": ("boards:\n  - {name: a, host: h\n", "malformed YAML"),
    "unknown_key": ("boards:\n  - name: a\n    hots: h\n", "did you mean 'host'"),
    "duplicate": ("boards:\n  - {name: a, local: true}\n  - {name: a, local: true}\n", "duplicate board name"),
    "missing_host": ("boards:\n  - {name: a}\n", "has no host"),
    "bad_memory": ("boards:\n  - {name: a, local: true, memory_limit: 3 parsecs}\n", "not a memory size"),
    "missing_identity": ("boards:\n  - {name: a, host: h, identity_file: /nonexistent/id}\n", "identity file"),
}


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


def test_unknown_option_is_usage_error(tmp_path):
    proc = run_cli("probe", "--no-such-option", cwd=tmp_path)
    assert proc.returncode == 2
    assert "No such option" in proc.stderr or "no such option" in proc.stderr.lower()


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
