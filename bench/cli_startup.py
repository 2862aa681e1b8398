"""How long `dsparse` takes to answer `--help` and `--version`: each command in N fresh processes.

    .venv/bin/python bench/cli_startup.py            # table on stdout
    .venv/bin/python bench/cli_startup.py -n 30 --json

The target is 0.3 s for `dsparse --help`. The floor rows show what no CLI change can remove: the
interpreter starting (with this venv's site, editable install included) and importing typer.
`dsparse probe --help` costs more than `dsparse --help`: before the verb's help, the app's own
options are parsed, and typer checks their values with pydantic, which takes ~0.2 s to import.
Timings are wall-clock and depend on the machine's load: read the minimum as the cost, the median
as what a user sees; CPU time (user + system) moves least with load. It reports and never fails on
a slow figure. To time another tree, put it first on PYTHONPATH."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.3
COMMANDS = [["--help"], ["--version"], ["probe", "--help"]]
FLOOR = {"python -c pass": ["-c", "pass"], "python -c 'import typer'": ["-c", "import typer"]}


def dsparse_argv() -> list[str]:
    """The installed `dsparse` script next to this interpreter, else `python -m dsparse_cli`."""
    script = Path(sys.executable).with_name("dsparse")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dsparse_cli"]


def timed(argv: list[str], runs: int, cwd: str) -> dict:
    """Wall and CPU time of `argv` in `runs` fresh processes; `error` when it did not exit 0."""
    env = {**os.environ, "NO_COLOR": "1"}
    wall, cpu = [], []
    for _ in range(runs):
        before, start = _children_cpu(), time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall.append(time.perf_counter() - start)
        cpu.append(_children_cpu() - before)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}
    return {"runs": runs, "median_s": round(statistics.median(wall), 4), "min_s": round(min(wall), 4),
            "cpu_median_s": round(statistics.median(cpu), 4)}


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child so far (less sensitive to load than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=15, help="Fresh processes per command.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as cwd:   # no cluster.yaml, no .dsparse/ here
        for label, argv in FLOOR.items():
            results.append({"command": label, **timed([sys.executable, *argv], args.runs, cwd)})
        for cmd in COMMANDS:
            res = timed(dsparse_argv() + cmd, args.runs, cwd)
            if "median_s" in res:
                res["under_target"] = res["median_s"] < TARGET_S
            results.append({"command": " ".join(["dsparse", *cmd]), **res})
    if args.json:
        print(json.dumps({"target_s": TARGET_S, "results": results, "load_avg": os.getloadavg()}, indent=2))
        return
    print(f"{'command':28} {'median s':>9} {'min s':>7} {'cpu s':>7}  under {TARGET_S} s (median)")
    for r in results:
        if "error" in r:
            print(f"{r['command']:28} failed: {r['error']}")
            continue
        verdict = {None: "", True: "yes", False: "NO"}[r.get("under_target")]
        print(f"{r['command']:28} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['cpu_median_s']:7.3f}  {verdict}")
    print(f"{args.runs} runs each; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
