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
         "bytes_per_step": 770},
        # only rank 0 trains 0-1: no allreduce (one rank), broadcast to ranks 1 and 2
        {"id": 3, "op": "broadcast", "ranks": [0, 1, 2], "units": [0, 1], "root": 0, "receivers": [1, 2],
         "bytes_per_step": 330},
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
