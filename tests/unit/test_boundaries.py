"""The design's boundaries: what runs on boards imports only what boards have, and the
commands that must be instant never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dsparse_cli"
STDLIB = set(sys.stdlib_module_names)
SHIPPED = ("dsparse_cli.runtime", "dsparse_cli.contract", "dsparse_cli.modelspec",   # what the launcher copies
           "dsparse_cli.probing.board_script")                                        # to boards


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PKG / "runtime").rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_runtime_imports_only_torch_torchvision_stdlib(path):
    # PIL (Pillow) is a hard dependency of torchvision: every board with torchvision has it.
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "dsparse_cli":
            assert name.startswith(SHIPPED), f"{path.name} imports {name} (not shipped to boards)"
        else:
            assert top in STDLIB | {"torch", "torchvision", "PIL", "__future__"}, f"{path.name} imports {name}"


def test_contract_is_stdlib_only_and_shipped():
    from dsparse_cli.jobs.shipping import runtime_files

    assert {name.split(".")[0] for name in imported_modules(PKG / "contract.py")} <= STDLIB | {"__future__"}
    shipped = {rel for _, rel in runtime_files()}
    assert "dsparse_cli/contract.py" in shipped and "dsparse_cli/runtime/worker.py" in shipped
    assert "dsparse_cli/probing/board_script.py" in shipped   # runtime/cpus.py imports it


def test_board_script_is_stdlib_only():
    for name in imported_modules(PKG / "probing" / "board_script.py"):
        assert name.split(".")[0] in STDLIB | {"__future__"}, name


def _imported(args: list[str], cwd: Path) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules `python -m dsparse_cli ARGS` imports, and the finished process."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dsparse_cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    loaded = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return loaded, proc


def _imports_torch(args: list[str], cwd: Path) -> tuple[bool, subprocess.CompletedProcess]:
    loaded, proc = _imported(args, cwd)
    return any(m == "torch" or m.startswith("torch.") for m in loaded), proc


@pytest.mark.parametrize("args", [["--help"], ["probe", "--help"], ["status", "--help"], ["plan", "--help"],
                                  ["train", "--help"], ["--version"], ["probe", "--version"]])
def test_help_does_not_import_torch(args, tmp_path):
    torch_loaded, proc = _imports_torch(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not torch_loaded


def test_help_loads_nothing_heavy(tmp_path):
    """`dsparse --help` answers at once: beyond typer, no heavy library loads (bench/cli_startup.py
    times it), and `--version` not even typer."""
    heavy = {"torch", "rich", "yaml", "pydantic", "paramiko"}
    loaded, _ = _imported(["--help"], tmp_path)
    assert not {m for m in loaded if m.split(".")[0] in heavy}
    loaded, _ = _imported(["--version"], tmp_path)
    assert not {m for m in loaded if m.split(".")[0] in heavy | {"typer"}}


def test_probe_does_not_import_torch(tmp_path):
    torch_loaded, proc = _imports_torch(["probe", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert not torch_loaded


def test_status_does_not_import_torch(tmp_path):
    torch_loaded, proc = _imports_torch(["status", "--json"], tmp_path)
    assert proc.returncode == 2  # no job here yet: a usage error, but still no torch
    assert not torch_loaded
