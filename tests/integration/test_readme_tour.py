"""The README's tour, run as written: every `dsparse` line of its code block, in order, in an empty
directory (so on the built-in demo cluster), with `dsparse` from .venv/bin on PATH."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

README = REPO / "README.md"
BIN = REPO / ".venv" / "bin"
COMMAND_TIMEOUT_S = 600


def tour_commands() -> list[str]:
    """The command lines of the first ```sh block under '## A tour', as the README prints them."""
    section = README.read_text().split("## A tour", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("dsparse ")]


def expected(command: str) -> tuple[int, list[str]]:
    """The exit code of one tour command and lines its output must contain."""
    if "--detach" in command:
        return 0, ["started on"]
    verb = command.split()[1]
    needles = {
        "probe": ["demo-rpi3", "cached in"],
        "plan": ["aggregation groups"] + (["plan pushed to"] if "--push" in command else [])
                + (["verified rank 0"] if "--verify" in command else []),
        "train": ["finished"],
        "status": ["finished"],
        "logs": ["epoch 1 accuracy"],
        "stop": ["stopped on"],
    }
    assert verb in needles, f"the README's tour has a new command; say here what it must print: {command}"
    return 0, needles[verb]


def test_the_tour_is_in_the_readme_and_terminates():
    commands = tour_commands()
    assert [c.split()[1] for c in commands][:2] == ["probe", "plan"] and len(commands) >= 6
    assert not any(flag in c.split() for c in commands for flag in ("-f", "--follow", "-w", "--watch")), \
        "the tour must end: --watch and -f belong in the prose"


def test_make_install_is_there():
    assert "make install" in README.read_text()
    assert subprocess.run(["make", "-n", "install"], cwd=REPO, capture_output=True).returncode == 0


def run_line(command: str, cwd: Path, env: dict) -> tuple[int, str]:
    """One README line through bash, in its own session: on a timeout (ours or pytest's) the
    command and everything it started here are killed, not left behind."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(6 * COMMAND_TIMEOUT_S)   # about four minutes on an idle machine; much more when shared
def test_readme_tour_runs_verbatim_on_the_demo_cluster(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200",
           "NO_COLOR": "1", "DSPARSE_STATE_HOME": str(tmp_path / "state"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    env = {k: v for k, v in env.items() if k not in ("DSPARSE_PYTHON", "VIRTUAL_ENV")}
    work = tmp_path / "work"
    work.mkdir()
    try:
        for command in tour_commands():
            code, out = run_line(command, work, env)
            want_code, needles = expected(command)
            assert code == want_code, f"{command}\nexit {code}\n{out[-3000:]}"
            for needle in needles:
                assert needle in out, f"{command}: {needle!r} not in its output\n{out[-3000:]}"
            assert "Traceback" not in out, f"{command}\n{out[-3000:]}"
            if command.split()[1] == "plan":   # budgets follow the machine: four boards, four unit sets
                devices = json.loads((work / ".dsparse" / "plan.json").read_text())["devices"]
                assert len(devices) == 4 and len({tuple(d["units"]) for d in devices}) == 4, devices
    finally:   # whatever failed, leave no job running
        run_line("dsparse stop", work, env)
    assert not (work / "cluster.yaml").exists() and (work / ".dsparse" / "plan.json").exists()
