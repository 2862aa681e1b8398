"""The seven-board example at this environment's process base (bench/seven_boards.py and
tests/unit/test_seven_boards.py).

The example's limits are absolute figures, written for a reference need(1) of 1228.8 MiB: what
training the classifier alone needed where it was first derived (a process base of ~904.7 MiB,
292.2 MiB for torchrun's agent and the classifier's training bytes). That floor belongs to the
torch build, the launcher *and* the machine: this one has measured process bases of 686 to 999
MiB with the same packages. What the example designs is each board's allowance above that floor,
so both users of it move every limit by the floor's drift.
"""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
# need(1), training the classifier alone, where the example's limits were written (see its comments)
ASSUMED_FLOOR_MIB = 904.7 + 292.2 + 31.9
HEADROOM = 0.15            # `dsparse plan`'s default: budget = memory_limit x 0.85


def measured_floor_mib(state_dir: Path, model: str = "mobilenet_v2", batch_size: int = 64,
                       launcher: str = "dsparse") -> float:
    """What a board needs to train the last unit alone here: the profile's process base, the
    launcher's memory and the classifier's training bytes, measured (and cached) in `state_dir`
    as `dsparse plan` would. With dsparse's own launcher (~6 MiB, not torchrun's ~290 MiB) every
    rebased limit is that much lower: the example keeps its training allowance, not the agent."""
    from dsparse_cli.planning.profile import get_profile, launcher_bytes

    prof = get_profile(state_dir, model, batch_size=batch_size, image_size=32, launcher=launcher)
    last = prof.num_units - 1
    return (prof.base_bytes + launcher_bytes(prof, launcher) + prof.training_bytes([last])) / MiB


def rebased(example_text: str, floor_mib: float) -> tuple[str, float]:
    """(the example with every memory_limit moved by the floor's drift, the shift in MiB)."""
    shift = (floor_mib - ASSUMED_FLOOR_MIB) / (1 - HEADROOM)
    out = []
    for line in example_text.splitlines():
        key, sep, rest = line.partition("memory_limit:")
        if sep and not key.lstrip().startswith("#"):
            value, _, comment = rest.partition("#")
            mib = float(value.strip().removesuffix("MiB"))
            line = f"{key}memory_limit: {mib + shift:.1f}MiB" + (f"  #{comment}" if comment else "")
        out.append(line)
    return "\n".join(out) + "\n", shift
