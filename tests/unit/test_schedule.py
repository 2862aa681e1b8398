"""Aggregation groups for nested plans: allreduce inside each device-set, broadcast to the rest."""

from __future__ import annotations

import pytest

from dsparse_cli.planning.schedule import build_groups, device_sets

PARAMS = [100, 200, 300, 400, 500, 600]
BUFFERS = [10, 20, 30, 40, 0, 0]
# rank 0 trains everything, rank 1 from unit 2 on, rank 2 only units 4-5
NESTED = [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5], [4, 5]]


def test_device_sets_of_a_nested_plan():
    assert device_sets(NESTED) == [((0, 1, 2), [4, 5]), ((0, 1), [2, 3]), ((0,), [0, 1])]


def test_groups_of_a_nested_three_device_plan():
    assert build_groups(NESTED, PARAMS, BUFFERS) == [
        # everyone trains 4-5: one allreduce over the world, nobody to broadcast to
        {"id": 0, "op": "allreduce", "ranks": [0, 1, 2], "units": [4, 5], "root": 0, "receivers": [],
         "bytes_per_step": 1100},
        # ranks 0-1 train 2-3: allreduce between them; rank 2 runs 2-3 forward only
        {"id": 1, "op": "allreduce", "ranks": [0, 1], "units": [2, 3], "root": 0, "receivers": [],
         "bytes_per_step": 700},
        {"id": 2, "op": "broadcast", "ranks": [0, 2], "units": [2, 3], "root": 0, "receivers": [2],
         "state_bytes": 770, "sync_every": 1, "bytes_per_step": 770},
        # only rank 0 trains 0-1: no allreduce (one rank), broadcast to ranks 1 and 2
        {"id": 3, "op": "broadcast", "ranks": [0, 1, 2], "units": [0, 1], "root": 0, "receivers": [1, 2],
         "state_bytes": 330, "sync_every": 1, "bytes_per_step": 330},
    ]


def test_sync_every_divides_broadcast_bytes_only():
    groups = build_groups(NESTED, PARAMS, BUFFERS, sync_every=4)
    assert [g["bytes_per_step"] for g in groups] == [1100, 700, 193, 83]   # ceil(770/4), ceil(330/4)


def test_root_is_the_lowest_rank_of_the_set():
    # rank 0 is the small device here: the set {1, 2} broadcasts from rank 1
    groups = build_groups([[3], [0, 1, 2, 3], [0, 1, 2, 3]], PARAMS, BUFFERS)
    bcast = [g for g in groups if g["op"] == "broadcast"]
    assert [(g["root"], g["receivers"], g["ranks"]) for g in bcast] == [(1, [0], [1, 0])]
    assert groups[0]["ranks"] == [0, 1, 2] and groups[0]["units"] == [3]


def test_units_nobody_trains_get_no_group():
    groups = build_groups([[4, 5], [5]], PARAMS, BUFFERS)   # units 0-3 frozen (--allow-frozen)
    assert [(g["op"], g["ranks"], g["units"]) for g in groups] == [("allreduce", [0, 1], [5]),
                                                                   ("broadcast", [0, 1], [4])]


def test_single_device_has_no_groups():
    assert build_groups([[0, 1, 2]], PARAMS, BUFFERS) == []


def test_bad_sync_every():
    with pytest.raises(ValueError):
        build_groups(NESTED, PARAMS, BUFFERS, sync_every=0)


MBIT = 1e6 / 8


def test_with_link_rates_the_fastest_member_roots_and_the_slowest_receiver_ends_the_chain():
    # ranks 0 and 1 train everything; rank 1 has the fast link. Ranks 2 (slow) and 3 (medium) receive.
    units = [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [5], [5]]
    rates = [100 * MBIT, 1000 * MBIT, 10 * MBIT, 100 * MBIT]
    bcast = [g for g in build_groups(units, PARAMS, BUFFERS, rates=rates) if g["op"] == "broadcast"]
    assert [(g["root"], g["receivers"]) for g in bcast] == [(1, [3, 2])]
    plain = [g for g in build_groups(units, PARAMS, BUFFERS) if g["op"] == "broadcast"]
    assert [(g["root"], g["receivers"]) for g in plain] == [(0, [2, 3])]


def test_wire_intervals_spread_a_broadcast_that_outweighs_the_allreduces():
    # rank 0 broadcasts units 0-4 (1600 B with buffers) to rank 1; both allreduce unit 5 (600 B):
    # at equal rates 1600 and 800 B/step outweigh the ring's 600; every 4 steps (400 B) does not
    units = [[0, 1, 2, 3, 4, 5], [5]]
    rates = [1000.0, 1000.0]
    groups = build_groups(units, PARAMS, BUFFERS, sync_every=8, rates=rates, intervals="wire")
    bcast = [g for g in groups if g["op"] == "broadcast"]
    allreduce_s = 2 * (2 - 1) / 2 * 600 / 1000
    assert [g["sync_every"] for g in bcast] == [4]
    assert bcast[0]["bytes_per_step"] / 1000 <= allreduce_s < bcast[0]["state_bytes"] / 2 / 1000
    capped = build_groups(units, PARAMS, BUFFERS, sync_every=2, rates=rates, intervals="wire")
    assert [g["sync_every"] for g in capped if g["op"] == "broadcast"] == [2]
    fixed = build_groups(units, PARAMS, BUFFERS, sync_every=8, rates=rates)
    assert [g["sync_every"] for g in fixed if g["op"] == "broadcast"] == [8]
