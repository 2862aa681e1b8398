"""Planner on hand-made cost tables: nesting, coverage, too-small devices, exclusion, frozen units,
ties; and the measured importance order."""

from __future__ import annotations

import dataclasses

import pytest

from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.importance import importance_order, order_from_scores
from dsparse_cli.planning.planner import CostTable, Device, depth_order, plan_devices

MiB = 1 << 20


def table() -> CostTable:
    """Five units, classifier last. Activations are large early, parameters large late, as in CNNs.
    peak(first updated unit f, depth order) = 100 + 10 + Σ_{u≥f} (grad_opt + saved)."""
    return CostTable(base=100 * MiB, weights=10 * MiB, grad_opt=[1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 1 * MiB],
                     saved=[40 * MiB, 20 * MiB, 10 * MiB, 5 * MiB, 1 * MiB], passthrough=[20 * MiB] * 5,
                     names=["stem", "b1", "b2", "b3", "classifier"])


# peaks of the depth prefixes: {4}: 112, {3,4}: 125, {2..4}: 139, {1..4}: 161, all: 202 MiB
PEAKS = {1: 112, 2: 125, 3: 139, 4: 161, 5: 202}


def test_cost_table_matches_hand_computation():
    t = table()
    assert [t.peak_bytes(depth_order(5)[:k]) // MiB for k in range(1, 6)] == [PEAKS[k] for k in range(1, 6)]
    # non-contiguous: {0, 4}: units 1..3 pass gradients through (20 MiB each)
    assert t.training_bytes({0, 4}) == (10 + 1 + 1 + 40 + 1 + 3 * 20) * MiB


def test_each_device_gets_the_longest_fitting_prefix_and_plans_nest():
    devices = [Device("big", 210 * MiB), Device("mid", 150 * MiB), Device("small", 126 * MiB),
               Device("tiny", 112 * MiB)]
    res = plan_devices(devices, table())
    got = {d.name: d.units for d in res.devices}
    assert got == {"big": [0, 1, 2, 3, 4], "mid": [2, 3, 4], "small": [3, 4], "tiny": [4]}
    sets = sorted((set(d.units) for d in res.devices), key=len)
    assert all(a <= b for a, b in zip(sets, sets[1:]))          # a chain
    assert [d.rank for d in res.devices] == [0, 1, 2, 3]          # inventory order
    assert [d.predicted_peak_bytes // MiB for d in res.devices] == [202, 139, 125, 112]
    assert all(d.predicted_peak_bytes <= d.budget_bytes for d in res.devices)
    assert res.full_update_peak_bytes == 202 * MiB and res.min_peak_bytes == 112 * MiB
    assert res.frozen_units == [] and res.excluded == []


def test_the_launcher_is_counted_in_every_budget():
    """torchrun's agent shares the board: a device fits when worker peak + launcher <= budget."""
    t = dataclasses.replace(table(), launcher_bytes=30 * MiB)
    devices = [Device("big", 240 * MiB), Device("mid", 160 * MiB), Device("small", 145 * MiB)]
    res = plan_devices(devices, t)
    got = {d.name: d.units for d in res.devices}
    assert got["big"] == [0, 1, 2, 3, 4] and got["mid"] == [3, 4]   # 125 + 30 <= 160 < 139 + 30
    assert got["small"] == [4]                                      # 112 + 30 <= 145 < 125 + 30
    assert [d.predicted_peak_bytes // MiB for d in res.devices] == [202, 125, 112]   # the worker's own
    assert res.launcher_bytes == 30 * MiB
    with pytest.raises(ConfigError, match="needs at least 142.0 MiB"):
        plan_devices([Device("big", 240 * MiB), Device("pi", 140 * MiB)], t)


def test_too_small_device_names_itself_its_budget_and_need():
    devices = [Device("big", 300 * MiB), Device("pi-3", 100 * MiB)]
    with pytest.raises(ConfigError) as err:
        plan_devices(devices, table())
    assert err.value.message == "board pi-3: budget 100.0 MiB, needs at least 112.0 MiB to train the classifier"
    assert "--exclude-small" in err.value.hint and "--batch-size" in err.value.hint


def test_exclude_small_leaves_the_device_out_and_reranks():
    devices = [Device("pi-3", 100 * MiB), Device("big", 300 * MiB), Device("mid", 140 * MiB)]
    res = plan_devices(devices, table(), exclude_small=True)
    assert [(d.name, d.rank) for d in res.devices] == [("big", 0), ("mid", 1)]
    assert [(e.name, e.budget_bytes, e.needed_bytes) for e in res.excluded] == [("pi-3", 100 * MiB, 112 * MiB)]
    assert "needs at least 112.0 MiB" in res.excluded[0].reason


def test_all_devices_too_small_is_an_error_even_with_exclude_small():
    with pytest.raises(ConfigError, match="no board can train even the classifier"):
        plan_devices([Device("a", 50 * MiB)], table(), exclude_small=True)


def test_every_unit_must_be_trained_unless_allow_frozen():
    devices = [Device("a", 150 * MiB), Device("b", 170 * MiB), Device("c", 170 * MiB)]
    with pytest.raises(ConfigError) as err:
        plan_devices(devices, table())
    # the largest device (first of the two equal ones) and what a full update needs
    assert "the largest, b (budget 170.0 MiB), fits 4 of 5 units" in err.value.message
    assert "a full update needs 202.0 MiB" in err.value.message
    assert "--allow-frozen" in err.value.hint
    res = plan_devices(devices, table(), allow_frozen=True)
    assert res.frozen_units == [0]
    assert [d.units for d in res.devices] == [[2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]


def test_ties_are_deterministic_and_follow_inventory_order():
    devices = [Device("x", 130 * MiB), Device("big", 250 * MiB), Device("y", 130 * MiB)]
    first = plan_devices(devices, table())
    again = plan_devices(devices, table())
    assert first == again
    assert [(d.name, d.rank, d.units) for d in first.devices] == [
        ("x", 0, [3, 4]), ("big", 1, [0, 1, 2, 3, 4]), ("y", 2, [3, 4])]


def test_custom_importance_order_gives_prefixes_of_it():
    order = [4, 0, 1, 2, 3]   # e.g. measured: classifier, then the stem
    devices = [Device("big", 300 * MiB), Device("small", 170 * MiB)]
    res = plan_devices(devices, table(), order)
    small = next(d for d in res.devices if d.name == "small")
    # {4, 0}: 10+1+1+40+1+60 = 113 + 100 base = 213 MiB does not fit 170; {4} does
    assert small.units == [4]
    assert res.order == order


def test_order_must_rank_every_unit_once():
    with pytest.raises(ValueError):
        plan_devices([Device("a", 1 << 40)], table(), [4, 3, 3, 1, 0])


def test_order_from_scores_breaks_ties_toward_later_units():
    assert order_from_scores([0.1, 0.4, 0.1, 0.4]) == [3, 1, 2, 0]


def test_grad_importance_is_measured_and_reproducible():
    pytest.importorskip("torch")
    from dsparse_cli.planning.importance import grad_scores

    kw = dict(num_classes=10, image_size=16, batch_size=8)
    scores = grad_scores("tiny_cnn", **kw)
    assert len(scores) == 4 and abs(sum(scores) - 1) < 1e-9 and all(s > 0 for s in scores)
    order = importance_order("grad", 4, model="tiny_cnn", **kw)
    assert sorted(order) == [0, 1, 2, 3] and order == importance_order("grad", 4, model="tiny_cnn", **kw)
    assert order == order_from_scores(scores)


def test_unknown_importance_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown importance"):
        importance_order("random", 4)


def test_a_training_allowance_is_on_top_of_the_measured_base_and_launcher():
    from dsparse_cli.planning import board_budget

    MiB = 1 << 20
    assert board_budget({"training_allowance_bytes": 80 * MiB}, 0.15, 700 * MiB) == 780 * MiB
    assert board_budget({"usable_memory_bytes": 1000 * MiB}, 0.15, 700 * MiB) == int(850 * MiB)
    # both: the tighter wins (an allowance never lifts a board past its real memory)
    assert board_budget({"usable_memory_bytes": 800 * MiB, "training_allowance_bytes": 200 * MiB}, 0.15,
                        700 * MiB) == int(680 * MiB)


def test_the_demo_boards_are_given_allowances_not_absolute_limits():
    from dsparse_cli.inventory import builtin_cluster

    assert all(b.memory_limit is None and b.training_memory for b in builtin_cluster().boards)
