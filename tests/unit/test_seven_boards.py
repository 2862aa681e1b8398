"""examples/seven-boards.yaml (issue #3): the real `dsparse plan` on the seven-board example gives
>= 60 % average predicted training-memory saving vs full update with every unit trained, the
same plan.json twice, and keeps both while the measured process base moves by a few MiB (the
window the yaml's comments document). The limits are rebased to what training the classifier needs
here (bench/_example.py): that floor moves with the CPU, not just the base.

The first plan measures the mobilenet_v2 profile in a fresh state dir (a minute or two)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "bench"))
from _example import measured_floor_mib, rebased  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EXAMPLE = REPO / "examples" / "seven-boards.yaml"
PLAN_ARGS = ("plan", "--cluster", "seven-boards.yaml", "--model", "mobilenet_v2", "--batch-size", "64", "--json")
MIN_SAVING = 0.60
MiB = 1 << 20


def example_for_measured_base(work: Path) -> str:
    """The example with its limits moved by this environment's drift (bench/_example.py)."""
    text, _ = rebased(EXAMPLE.read_text(), measured_floor_mib(work / ".dsparse"))
    return text


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Plan the example twice in one scratch dir: (first doc, plan.json bytes of each run, dir)."""
    work = tmp_path_factory.mktemp("seven")
    (work / "seven-boards.yaml").write_text(example_for_measured_base(work))
    docs, files = [], []
    for _ in range(2):
        proc = run_cli(*PLAN_ARGS, cwd=work, timeout=1100)
        assert proc.returncode == 0, proc.stderr
        docs.append(json.loads(proc.stdout))
        files.append((work / ".dsparse" / "plan.json").read_bytes())
    return docs, files, work


def average_saving(devices: list[dict]) -> float:
    savings = [1 - d["predicted_training_bytes"] / d["full_update_training_bytes"] for d in devices]
    return sum(savings) / len(savings)


def explain(doc: dict) -> str:
    return (f"measured base {doc['base_bytes'] / MiB:.1f} MiB; "
            + ", ".join(f"{d['name']}: units {d['units'][0]}..{d['units'][-1]}" for d in doc["devices"]))


def test_seven_boards_of_different_budgets_all_planned(planned):
    (doc, _), _, _ = planned
    from dsparse_cli.inventory import load_inventory

    names = [b.name for b in load_inventory(EXAMPLE).boards]
    assert len(names) == 7 and all(b.local for b in load_inventory(EXAMPLE).boards)
    assert [d["name"] for d in doc["devices"]] == names, explain(doc)
    assert doc["excluded"] == []
    assert len({d["budget_bytes"] for d in doc["devices"]}) == 7


def test_average_saving_at_least_60_percent_and_every_unit_trained(planned):
    (doc, _), _, _ = planned
    n = len(doc["units"])
    assert n == 20
    covered = set().union(*[d["units"] for d in doc["devices"]])
    assert covered == set(range(n)) and doc["frozen_units"] == [], explain(doc)
    saving = average_saving(doc["devices"])
    assert saving >= MIN_SAVING, f"average saving {100 * saving:.1f}% < {100 * MIN_SAVING:.0f}%: " + explain(doc)
    # savings come from the six small boards training only the last units; nested plans
    full = [d for d in doc["devices"] if len(d["units"]) == n]
    assert len(full) == 1, explain(doc)
    for d in doc["devices"]:
        assert d["units"] == list(range(n - len(d["units"]), n))
        assert d["predicted_peak_bytes"] <= d["budget_bytes"]
        parts = d["predicted_breakdown"]
        assert sum(parts.values()) == d["predicted_training_bytes"]


def test_plan_is_deterministic(planned):
    (first, second), (a, b), _ = planned
    assert a == b
    assert first == second


@pytest.mark.parametrize("shift_mib", [-3, 3])
def test_survives_a_few_mib_of_base_drift(planned, shift_mib):
    """Replay the measured profile with the process base moved by a few MiB: the example is not on a
    knife edge here (the yaml's comments give the whole window, -14 to +4.3 MiB)."""
    from dsparse_cli.inventory import load_inventory
    from dsparse_cli.planning import Device, budget_bytes, depth_order, get_profile, plan_devices

    (doc, _), _, work = planned
    prof = get_profile(work / ".dsparse", "mobilenet_v2", batch_size=64, image_size=32)
    assert prof.key == doc["profile_key"] and prof.base_bytes == doc["base_bytes"]
    shifted = dataclasses.replace(prof, base_bytes=prof.base_bytes + shift_mib * MiB)
    devices = [Device(b.name, budget_bytes(b.memory_limit)) for b in load_inventory(work / "seven-boards.yaml").boards]
    res = plan_devices(devices, shifted, depth_order(prof.num_units), launcher_bytes=doc["launcher_bytes"])
    rows = [{"predicted_training_bytes": d.predicted_training_bytes,
             "full_update_training_bytes": res.full_update_training_bytes} for d in res.devices]
    assert len(res.devices) == 7 and res.frozen_units == []
    assert average_saving(rows) >= MIN_SAVING, (f"base {shifted.base_bytes / MiB:.1f} MiB: the measured base "
                                                f"{prof.base_bytes / MiB:.1f} MiB is near the edge of the example's window")
