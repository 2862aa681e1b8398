"""The fault suite's table (tests/e2e/test_faults.py fills it; the e2e conftest prints it at the end
of the run; docs/faults.md keeps a copy)."""

from __future__ import annotations

from dataclasses import dataclass

# The faults the suite injects, in its order: docs/faults.md must have a row for each.
FAULTS = (
    "link flapping",
    "worker killed (SIGKILL)",
    "worker hung (SIGSTOP)",
    "link down mid-step",
    "OOM kill by the cgroup",
    "reboot (sshd and everything killed, then back)",
    "disk full while a checkpoint is written",
    "Ctrl-C during the launch",
)


@dataclass
class Row:
    fault: str
    board: str                  # the board the fault hit
    named: str = "-"            # what dsparse named
    detected_s: float | None = None   # from the fault to the name on stderr
    left: int | None = None     # the job's processes alive afterwards
    resumed: str = "-"          # what the next `train --resume` did
    note: str = ""


ROWS: list[Row] = []


def markdown() -> str:
    head = "| fault | board | named | detected after | processes left | resume | note |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in ROWS:
        detected = "-" if r.detected_s is None else f"{r.detected_s:.1f} s"
        left = "-" if r.left is None else str(r.left)
        lines.append(f"| {r.fault} | {r.board} | {r.named} | {detected} | {left} | {r.resumed} | {r.note} |")
    return "\n".join(lines)
