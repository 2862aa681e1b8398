"""The seven-board example at this environment's process base (bench/seven_boards.py and
tests/unit/test_seven_boards.py).

The example's limits are absolute figures derived for a measured process base of ~904.7 MiB
plus 292.2 MiB for torchrun's agent (see its comments). That base belongs to the torch build
*and* the environment: this machine has measured 733 to 999 MiB with the same packages. What
the example designs is the limits relative to the base, so both users of it move every limit
by the measured drift.
"""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
ASSUMED_BASE_MIB = 904.7 + 292.2   # process base + torchrun agent the example's limits were derived for
HEADROOM = 0.15            # `dsparse plan`'s default: budget = memory_limit x 0.85


def measured_base_mib(state_dir: Path, model: str = "mobilenet_v2", batch_size: int = 64,
                      launcher: str = "dsparse") -> float:
    """The profile's process base plus the launcher's memory, measured (and cached) in `state_dir`
    as `dsparse plan` would. With dsparse's own launcher (~6 MiB, not torchrun's ~290 MiB) every
    rebased limit is that much lower: the example keeps its training allowance, not the agent."""
    from dsparse_cli.planning.profile import get_profile, launcher_bytes

    prof = get_profile(state_dir, model, batch_size=batch_size, image_size=32, launcher=launcher)
    return (prof.base_bytes + launcher_bytes(prof, launcher)) / MiB


def rebased(example_text: str, base_mib: float) -> tuple[str, float]:
    """(the example with every memory_limit moved by the base drift, the shift in MiB)."""
    shift = (base_mib - ASSUMED_BASE_MIB) / (1 - HEADROOM)
    out = []
    for line in example_text.splitlines():
        key, sep, rest = line.partition("memory_limit:")
        if sep and not key.lstrip().startswith("#"):
            value, _, comment = rest.partition("#")
            mib = float(value.strip().removesuffix("MiB"))
            line = f"{key}memory_limit: {mib + shift:.1f}MiB" + (f"  #{comment}" if comment else "")
        out.append(line)
    return "\n".join(out) + "\n", shift
