"""The package's shape: no import circle, small modules, and the CLI's defaults are the contract's."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dsparse_cli"
LONGEST = 400
BOARD_SCRIPT = PKG / "probing" / "board_script.py"   # one file by design: piped to `python3 -` on boards


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file (lazy imports count: they
    run too). Importing `a.b.c` also runs `a.b`'s `__init__`, so that edge counts as well."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dsparse_cli"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target != "dsparse_cli":   # the target and every package above it
                    if target in mods and target != mod and not mod.startswith(target + "."):
                        graph[mod].add(target)
                    target = target.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}          # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_walk_finds_a_circle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if p != BOARD_SCRIPT and (n := len(p.read_text().splitlines())) > LONGEST}
    assert not long, long


def test_the_cli_defaults_are_the_contracts():
    """Every default `dsparse train` shows is the one the job spec and compressors use."""
    import typer.main

    from dsparse_cli.cli import train  # noqa: F401  (registers the command)
    from dsparse_cli.cli.app import app
    from dsparse_cli.contract import COMPRESSOR_OPTIONS, JobSpec

    command = typer.main.get_command(app).commands["train"]
    shown = {p.name: p.default for p in command.params}
    spec = JobSpec()
    for option, field in [("dataset", "dataset"), ("epochs", "epochs"), ("lr", "lr"), ("seed", "seed"),
                          ("collective_timeout", "collective_timeout_s"), ("data_dir", "data_dir"),
                          ("max_steps", "max_steps"), ("checkpoint_every", "checkpoint_every_steps"),
                          ("download", "download")]:
        assert shown[option] == getattr(spec, field), option
    assert shown["compression"] == spec.compression["name"]
    for method, opts in COMPRESSOR_OPTIONS.items():
        for name, default in opts.items():
            assert shown[name] == default, f"{method} {name}"


def test_the_plan_defaults_have_one_value():
    """`dsparse plan`'s shown defaults are the ones the planning functions fall back to."""
    import inspect

    import typer.main

    from dsparse_cli.cli import plan  # noqa: F401  (registers the command)
    from dsparse_cli.cli.app import app
    from dsparse_cli.planning import build_plan, plan_cluster
    from dsparse_cli.planning.make import make_plan
    from dsparse_cli.planning.objective import DEFAULT_OBJECTIVE
    from dsparse_cli.planning.planfile import DEFAULT_HEADROOM

    shown = {p.name: p.default for p in typer.main.get_command(app).commands["plan"].params}
    assert shown["headroom"] == DEFAULT_HEADROOM
    for fn in (make_plan, plan_cluster):
        assert inspect.signature(fn).parameters["objective"].default == shown["objective"] == DEFAULT_OBJECTIVE, fn
    assert inspect.signature(build_plan).parameters["objective"].default is inspect.Parameter.empty  # resolved


def test_docs_faults_has_a_row_for_every_fault_the_suite_makes():
    """docs/faults.md keeps the table tests/e2e/test_faults.py prints: one row per fault."""
    source = ast.parse((PKG.parent / "tests" / "e2e" / "fault_table.py").read_text())
    faults = next(ast.literal_eval(n.value) for n in source.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "FAULTS")
    rows = [line.split("|")[1].strip() for line in (PKG.parent / "docs" / "faults.md").read_text().splitlines()
            if line.startswith("| ")]
    assert len(faults) == 8
    for fault in faults:
        assert rows.count(fault) == 2, f"docs/faults.md: {fault!r} needs a row in the table and in the how-to"
