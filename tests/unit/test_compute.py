"""The compute side of `--objective time` (`planning/compute.py`): a plan's step time from
measured unit timings and each board's CPU share, and the plan it moves."""

from __future__ import annotations

import pytest

from dsparse_cli.planning.compute import BoardCompute, compute_seconds, cpu_share, measure_seconds
from dsparse_cli.planning.objective import plan_for_time
from dsparse_cli.planning.planner import CostTable, Device, plan_devices

MBIT = 1e6 / 8
MiB = 1024**2
N = 6


def _seconds(fwd=0.1, bwd=0.2, passthrough_bwd=0.1, frozen_fwd=0.05, optimizer=0.06) -> dict:
    """Hand-made unit timings: every unit alike."""
    return {"forward": {"updated": [fwd] * N, "passthrough": [fwd] * N, "frozen": [frozen_fwd] * N},
            "backward": {"updated": [bwd] * N, "passthrough": [passthrough_bwd] * N},
            "optimizer": optimizer, "param_bytes": [1] * N}


def test_a_step_is_the_frozen_prefix_then_forward_and_backward_from_the_first_updated_unit():
    s = _seconds()
    assert compute_seconds(s, range(N)) == pytest.approx(N * 0.3 + 0.06)
    # units 4 and 2 updated: 0-1 run a no-grad forward, 3 and 5 pass gradients through
    assert compute_seconds(s, {2, 4}) == pytest.approx(2 * 0.05 + 2 * 0.3 + 2 * 0.2 + 0.06 * 2 / N)
    assert compute_seconds(s, set()) == pytest.approx(N * 0.05)
    assert compute_seconds(s, {N - 1}) < compute_seconds(s, {N - 2, N - 1}) < compute_seconds(s, range(N))


def test_a_board_takes_its_cpu_share():
    assert cpu_share(0.25) == 0.25 and cpu_share(3.0) == 1.0 and cpu_share(None) == 1.0 and cpu_share(0) == 1.0
    c = BoardCompute([_seconds()] * 2, [1.0, 0.25])
    fast, slow = c.per_board([range(N), range(N)])
    assert slow == pytest.approx(4 * fast)


def _plans(shares, rates, budgets_mib=(170, 170, 170, 170), compute=True):
    cost = CostTable(base=100 * MiB, weights=6 * MiB, grad_opt=[10 * MiB] * N, saved=[0] * N)
    memory = plan_devices([Device(f"b{i}", b * MiB) for i, b in enumerate(budgets_mib)], cost)
    c = BoardCompute([_seconds()] * len(shares), shares) if compute else None
    return memory, plan_for_time(memory, cost, rates, [MiB] * N, [0] * N, 1, False, c)


def test_slow_cpus_train_fewer_units_and_every_unit_keeps_trainers():
    # equal 100 Mbit/s links; b2 and b3 get a quarter of a CPU
    rates = [100 * MBIT] * 4
    memory, timed = _plans([1.0, 1.0, 0.25, 0.25], rates)
    assert [len(d.units) for d in memory.devices] == [6] * 4
    ks = [len(d.units) for d in timed.devices]
    assert ks[0] == ks[1] == 6 and ks[2] < 6 and ks[3] < 6
    assert timed.frozen_units == []
    # without the compute model, equal links keep the memory plan
    _, wire_only = _plans([1.0, 1.0, 0.25, 0.25], rates, compute=False)
    assert [d.units for d in wire_only.devices] == [d.units for d in memory.devices]


def test_equal_boards_keep_the_memory_plan_with_compute_too():
    memory, timed = _plans([0.5] * 4, [100 * MBIT] * 4)
    assert [d.units for d in timed.devices] == [d.units for d in memory.devices]


def test_measured_timings_cover_every_unit_and_mode(tmp_path):
    s = measure_seconds("tiny_cnn", num_classes=10, image_size=32, batch_size=16, dtype="float32",
                        optimizer="sgd-momentum", allocator="lean")
    n = len(s["param_bytes"])
    assert s["threads"] == 1 and s["allocator"] == "lean" and n >= 2
    assert all(len(s["forward"][m]) == n and all(t > 0 for t in s["forward"][m]) for m in s["forward"])
    assert all(len(s["backward"][m]) == n for m in s["backward"])
    assert all(t > 0 for t in s["backward"]["updated"][1:]) and s["optimizer"] > 0
    # a full update costs more than training the last unit, which costs more than forward alone
    assert compute_seconds(s, range(n)) > compute_seconds(s, {n - 1}) > compute_seconds(s, set())
