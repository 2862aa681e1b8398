"""The app's options and help through the real entry point: --json and --wide before or after the
verb, --version, help text for every option, flags shown as flags."""

from __future__ import annotations

import json
import re

import pytest
import typer.main

from dsparse_cli import __version__
from dsparse_cli.cli import plan, probe, status, train  # noqa: F401  (commands register themselves)
from dsparse_cli.cli.app import app
from helpers import run_cli

# One board nobody answers for: probe fails at once (connection refused), without torch.
REFUSED = "name: refused\nboards:\n  - {name: gone, host: 127.0.0.1, port: 1}\n"


@pytest.fixture
def refused(tmp_path):
    (tmp_path / "cluster.yaml").write_text(REFUSED)
    return tmp_path


@pytest.mark.parametrize("args", [["--json", "probe"], ["probe", "--json"]])
def test_json_before_or_after_the_verb(refused, args):
    proc = run_cli(*args, "--connect-timeout", "2", cwd=refused)
    assert proc.returncode == 1, proc.stderr  # the board did not answer
    doc = json.loads(proc.stdout)
    assert doc["cluster"] == "refused" and [b["ok"] for b in doc["boards"]] == [False]


def _table_width(text: str) -> int:
    return max(len(line) for line in text.splitlines() if line[:1] in "┏┃┡│└")


@pytest.mark.parametrize("args", [["--wide", "probe"], ["probe", "--wide"]])
def test_wide_shows_every_column_past_the_terminal(refused, args):
    narrow = run_cli("probe", cwd=refused, env={"COLUMNS": "80"})
    wide = run_cli(*args, cwd=refused, env={"COLUMNS": "80"})
    assert _table_width(narrow.stdout) <= 80 < _table_width(wide.stdout), wide.stdout


@pytest.mark.parametrize("args", [["--version"], ["-v", "--version"], ["probe", "--version"]])
def test_version(tmp_path, args):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"dsparse {__version__}\n"


def _commands():
    group = typer.main.get_command(app)
    return {"dsparse": group, **{f"dsparse {name}": cmd for name, cmd in group.commands.items()}}


def test_every_option_has_help():
    missing = [f"{where} {param.name}" for where, command in _commands().items() for param in command.params
               if not (getattr(param, "help", None) or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("where", sorted(_commands()))
def test_help_shows_flags_as_flags(where, capsys):
    command = _commands()[where]
    args = where.split()[1:] + ["--help"]
    assert typer.main.get_command(app).main(args, prog_name="dsparse", standalone_mode=False) == 0
    text = capsys.readouterr().out
    assert "<bool>" not in text
    flags = [p for p in command.params if getattr(p, "is_flag", False)]
    assert flags
    for flag in flags:  # "  -v, --verbose    Show tracebacks..." : the names, then the help
        names = ", ".join(sorted(flag.opts + flag.secondary_opts, key=len))
        assert re.search(rf"^  {re.escape(names)}  +\S", text, re.M), f"{where}: {names}\n{text}"
