"""What the benches share: run the real `dsparse` CLI with a timeout and read its JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A step of the bench failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dsparse(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python -m dsparse_cli ARGV` in `cwd`. On timeout it is interrupted like Ctrl-C, which makes
    `dsparse train` stop every board it started."""
    env = {**os.environ, "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "dsparse_cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise BenchError(f"`dsparse {argv[0]}` ran past {timeout:.0f}s and was stopped; "
                         f"last output: {tail(err)}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_methods(parser, args, methods) -> None:
    """`args.methods` (comma list) -> a checked list; an unknown one or fewer than 2 boards is a usage error."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in methods]
    if bad or not args.methods:
        parser.error(f"unknown method {bad[0] if bad else '(none given)'}; choose from {', '.join(methods)}")
    if args.boards < 2:
        parser.error("--boards must be at least 2 (aggregation needs someone to talk to)")


def tail(text: str, n: int = 3) -> str:
    return " | ".join((text or "").strip().splitlines()[-n:]) or "(no output)"


def json_of(res: subprocess.CompletedProcess, what: str) -> dict:
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise BenchError(f"{what} exited {res.returncode} without JSON: {tail(res.stderr)}") from None


def save_and_show(name: str, doc: dict, as_json: bool, table) -> int:
    """bench/results/NAME.json, then the document (--json) or its table; the exit status."""
    out = REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1) if as_json else table(doc))
    return 0
