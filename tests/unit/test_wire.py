"""The wire model (bytes and seconds per link per step) and `plan --objective time`."""

from __future__ import annotations

import pytest

from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.objective import plan_for_time, resolve_objective
from dsparse_cli.planning.planner import CostTable, Device, plan_devices
from dsparse_cli.planning.schedule import build_groups
from dsparse_cli.planning.wire import ddp_seconds, loads, step_seconds

MBIT = 1e6 / 8
MiB = 1024**2
PARAMS = [1 * MiB] * 6          # six units of 1 MiB of parameters, no buffers
BUFFERS = [0] * 6


def test_ring_and_chain_bytes_per_link():
    # rank 0 trains everything, ranks 1 and 2 the last two units
    groups = build_groups([[0, 1, 2, 3, 4, 5], [4, 5], [4, 5]], PARAMS, BUFFERS)
    w = loads(groups, [None] * 3)
    ring = 2 * 2 / 3 * 2 * MiB            # allreduce of units 4-5 over 3 ranks
    chain = 4 * MiB                        # units 0-3 along 0 -> 1 -> 2
    assert [(x.sent, x.recv) for x in w] == [(ring + chain, ring), (ring + chain, ring + chain), (ring, ring + chain)]
    assert all(x.seconds is None for x in w)


def test_step_seconds_is_each_group_at_its_slowest_member():
    groups = build_groups([[0, 1, 2, 3, 4, 5], [4, 5], [4, 5]], PARAMS, BUFFERS)
    rates = [100 * MBIT, 100 * MBIT, 10 * MBIT]
    expected = 2 * 2 / 3 * 2 * MiB / (10 * MBIT) + 4 * MiB / (10 * MBIT)
    assert step_seconds(groups, rates) == pytest.approx(expected)
    assert step_seconds(groups, [100 * MBIT, None, 10 * MBIT]) is None
    assert ddp_seconds(6 * MiB, rates) == pytest.approx(2 * 2 / 3 * 6 * MiB / (10 * MBIT))
    assert ddp_seconds(6 * MiB, rates[:1]) == 0.0


def _cost() -> CostTable:
    # training memory grows by 10 MiB per unit trained; budgets below pick how many fit
    return CostTable(base=100 * MiB, weights=6 * MiB, grad_opt=[10 * MiB] * 6, saved=[0] * 6)


def _plan(budgets_mib, rates, allow_frozen=False):
    cost = _cost()
    devices = [Device(f"b{i}", budget * MiB) for i, budget in enumerate(budgets_mib)]
    memory = plan_devices(devices, cost, allow_frozen=allow_frozen)
    return memory, plan_for_time(memory, cost, rates, PARAMS, BUFFERS, 4, allow_frozen)


def test_a_slow_link_makes_the_time_plan_move_traffic_off_it():
    # every board could train 4+ units; board b2 sits on a 10 Mbit/s link
    rates = [100 * MBIT, 100 * MBIT, 10 * MBIT, 100 * MBIT]
    memory, timed = _plan([170, 160, 160, 160], rates)
    assert [len(d.units) for d in memory.devices] == [6, 5, 5, 5]
    ks = [len(d.units) for d in timed.devices]
    assert ks[2] < 5 and ks[0] == 6            # the slow board trains less; every unit is still trained
    assert timed.frozen_units == []

    def secs(result):
        units = [d.units for d in result.devices]
        return step_seconds(build_groups(units, PARAMS, BUFFERS, 4, rates, "wire"), rates)
    assert secs(timed) < 0.95 * secs(memory)
    w_mem = loads(build_groups([d.units for d in memory.devices], PARAMS, BUFFERS, 4, rates), rates)
    w_time = loads(build_groups([d.units for d in timed.devices], PARAMS, BUFFERS, 4, rates, "wire"), rates)
    assert max(w_time[2].sent, w_time[2].recv) < max(w_mem[2].sent, w_mem[2].recv)
    # predicted peaks follow the new unit counts
    assert timed.devices[2].predicted_peak_bytes == _cost().peak_bytes(timed.devices[2].units)


def test_equal_links_keep_the_memory_plan():
    rates = [100 * MBIT] * 4
    memory, timed = _plan([170, 160, 160, 160], rates)
    assert [d.units for d in timed.devices] == [d.units for d in memory.devices]


def test_fine_tuning_trains_what_every_board_holds_and_broadcasts_nothing():
    rates = [100 * MBIT] * 3
    memory, timed = _plan([170, 150, 130], rates, allow_frozen=True)
    assert [len(d.units) for d in memory.devices] == [6, 4, 2]
    assert [d.units for d in timed.devices] == [[4, 5]] * 3
    assert timed.frozen_units == [0, 1, 2, 3]
    groups = build_groups([d.units for d in timed.devices], PARAMS, BUFFERS, 4, rates, "wire")
    assert [g["op"] for g in groups] == ["allreduce"]


def test_objective_errors_are_one_line_and_auto_is_time_only_with_every_link():
    with pytest.raises(ConfigError, match="unknown objective 'speed'"):
        resolve_objective("speed", [1.0], ["a"])
    with pytest.raises(ConfigError, match="board b has none") as err:
        resolve_objective("time", [1.0, None], ["a", "b"])
    assert "link: 100mbit" in err.value.hint
    assert resolve_objective("memory", [None], ["a"]) == "memory"   # memory needs no rates
    assert resolve_objective("auto", [1.0, 2.0], ["a", "b"]) == "time"
    assert resolve_objective("auto", [1.0, None], ["a", "b"]) == "memory"


def test_the_simulation_counts_powersgd_as_torch_compresses():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "wire_model.py"
    spec = importlib.util.spec_from_file_location("wire_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # a 64x288 conv weight (rank 1: 64+288 values), a bias (as is), a 4x4 matrix (not worth it: 16 <= 2*8)
    assert bench.powersgd_bytes([(64, 32, 3, 3), (64,), (4, 4)]) == 4 * ((64 + 288) + 64 + 16)
    # clusters repeat the mix; budgets hold base + launcher + the share of a full update
    cost = _cost()
    cost.supervisor_bytes = 0
    cost.base_bytes = cost.base
    devices, rates = bench.cluster(3, [(1.0, 10.0), (0.5, 1.0)], cost)
    assert rates == [10.0, 1.0, 10.0]
    assert devices[0].budget_bytes == cost.peak_bytes(range(6)) and devices[1].budget_bytes < devices[0].budget_bytes


def test_the_time_plan_keeps_half_of_each_units_boards():
    from dsparse_cli.planning.objective import _keeps_trainers

    start = [6, 6, 6, 6]
    assert _keeps_trainers([6, 6, 1, 1], start) and not _keeps_trainers([6, 1, 1, 1], start)
    assert _keeps_trainers([6, 1], [6, 1]) and not _keeps_trainers([5, 1], [6, 1])   # every unit keeps a board
    # two fast boards, two slow: the slow ones keep only the head, receive the rest
    rates = [1000 * MBIT] * 2 + [10 * MBIT] * 2
    memory, timed = _plan([170] * 4, rates)
    assert [len(d.units) for d in memory.devices] == [6] * 4
    assert [len(d.units) for d in timed.devices] == [6, 6, 1, 1]
