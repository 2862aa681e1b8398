"""Plan file: build from a profile + planner result, deterministic atomic write, checked load."""

from __future__ import annotations

import json

import pytest

from dsparse_cli.errors import ConfigError
from dsparse_cli.planning.planfile import (PLAN_VERSION, budget_bytes, build_plan, load_plan, plan_json,
                                           write_plan)
from dsparse_cli.planning.planner import Device, plan_devices
from dsparse_cli.planning.profile import (FROZEN, PASSTHROUGH, UPDATED, Profile, UnitCost, peak_bytes,
                                          training_bytes)
from dsparse_cli.planning.replay import plan_comm

BOARDS = ["jetson", "pi-a", "pi-b"]


def hand_profile() -> Profile:
    """Three hand-made units (see test_profile for the replay worked by hand)."""
    def unit(i, p, saved, s_in, s_out, inp, fwd, bwd):
        return UnitCost(index=i, name=f"u{i}", modules=[str(i)], param_bytes=p, buffer_bytes=0, grad_bytes=p,
                        optimizer_bytes=p, input_bytes=inp, saved={UPDATED: saved[0], PASSTHROUGH: saved[1]},
                        saves_input={UPDATED: s_in, PASSTHROUGH: False},
                        saves_output={UPDATED: s_out, PASSTHROUGH: s_out},
                        forward_peak={UPDATED: fwd[0], PASSTHROUGH: fwd[1], FROZEN: fwd[2]},
                        backward_peak={UPDATED: bwd[0], PASSTHROUGH: bwd[1]})

    units = [unit(0, 10, (1000, 1000), False, True, 0, (1200, 1200, 300), (50, 40)),
             unit(1, 20, (200, 100), True, False, 400, (250, 150, 500), (30, 20)),
             unit(2, 100, (8, 0), True, False, 80, (10, 5, 5), (120, 10))]
    return Profile(key="k", model="hand", num_classes=4, image_size=8, batch_size=2, dtype="float32",
                   optimizer="sgd-momentum", torch="x", device="cpu", base_bytes=5000, import_bytes=4000,
                   batch_bytes=7, step_peak_bytes=26, units=units)


def make_doc(**kw) -> dict:
    prof = hand_profile()
    budgets = {"jetson": prof.base_bytes + 10_000, "pi-a": prof.base_bytes + 1_200, "pi-b": prof.base_bytes + 1_200}
    res = plan_devices([Device(n, budgets[n]) for n in BOARDS], prof)
    probe = {n: {"usable_memory_bytes": budgets[n] * 2, "torch": "2.3.0", "cuda": n == "jetson"} for n in BOARDS}
    return build_plan(cluster="lab", profile=prof, result=res, objective="memory", sync_every=2, probe=probe, **kw)


def test_document_follows_the_contract():
    doc = make_doc()
    prof = hand_profile()
    assert doc["version"] == PLAN_VERSION and doc["memory_meaning"] == "process"
    assert doc["base_bytes"] == prof.base_bytes and doc["profile_key"] == prof.key
    assert [u["index"] for u in doc["units"]] == [0, 1, 2]
    assert doc["units"][2] == {"index": 2, "name": "u2", "modules": ["2"], "param_bytes": 100, "buffer_bytes": 0,
                               "grad_bytes": 100, "optimizer_bytes": 100}
    devs = {d["name"]: d for d in doc["devices"]}
    assert [d["rank"] for d in doc["devices"]] == [0, 1, 2]
    assert devs["jetson"]["units"] == [0, 1, 2] and devs["pi-a"]["units"] == devs["pi-b"]["units"] == [1, 2]
    for d in doc["devices"]:
        comm = plan_comm(prof, doc["groups"], d["rank"])   # what its own aggregation holds
        assert d["predicted_peak_bytes"] == peak_bytes(prof, d["units"], comm) <= d["budget_bytes"]
        assert d["predicted_peak_bytes"] <= peak_bytes(prof, d["units"])   # what the planner sized it for
        assert d["predicted_training_bytes"] == training_bytes(prof, d["units"], comm)
        assert d["full_update_peak_bytes"] == peak_bytes(prof, [0, 1, 2])
        assert sum(d["predicted_breakdown"].values()) == d["predicted_training_bytes"]
    assert doc["probe"]["jetson"]["cuda"] is True
    ops = [(g["op"], g["ranks"], g["units"]) for g in doc["groups"]]
    assert ops == [("allreduce", [0, 1, 2], [1, 2]), ("broadcast", [0, 1, 2], [0])]
    assert doc["groups"][0]["bytes_per_step"] == 20 + 100         # gradients of units 1-2
    assert doc["groups"][1]["bytes_per_step"] == 10 // 2          # (params + buffers) / sync_every


def test_round_trip_and_byte_identical(tmp_path):
    a, b = tmp_path / "a" / "plan.json", tmp_path / "b.json"
    write_plan(a, make_doc())
    write_plan(b, make_doc())
    assert a.read_bytes() == b.read_bytes()
    assert load_plan(a, BOARDS) == make_doc()
    assert a.read_text() == plan_json(json.loads(a.read_text()))     # sorted keys, stable layout
    assert [p.name for p in a.parent.iterdir()] == ["plan.json"]    # no temp file left behind


def test_missing_plan(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_plan(tmp_path / "plan.json")
    assert err.value.message == f"no plan at {tmp_path / 'plan.json'}" and "dsparse plan" in err.value.hint


def test_bad_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_plan(path)


def test_other_version(tmp_path):
    path = tmp_path / "plan.json"
    write_plan(path, {**make_doc(), "version": 0})
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert err.value.one_line() == "plan version 0 is not supported (expected 1) (re-run dsparse plan)"


def test_missing_keys(tmp_path):
    path = tmp_path / "plan.json"
    doc = make_doc()
    del doc["groups"]
    write_plan(path, doc)
    with pytest.raises(ConfigError, match="missing groups"):
        load_plan(path)


def test_inventory_mismatch(tmp_path):
    path = write_plan(tmp_path / "plan.json", make_doc())
    assert load_plan(path, ["pi-b", "jetson", "pi-a"])["cluster"] == "lab"     # order does not matter
    with pytest.raises(ConfigError) as err:
        load_plan(path, ["jetson", "pi-a", "x86"])
    assert err.value.message == "plan was made for boards [jetson, pi-a, pi-b] but cluster has [jetson, pi-a, x86]"
    assert err.value.hint == "re-run dsparse plan"


def test_excluded_boards_still_count_as_planned_for(tmp_path):
    prof = hand_profile()
    res = plan_devices([Device("big", prof.base_bytes + 10_000), Device("tiny", 10)], prof, exclude_small=True)
    path = write_plan(tmp_path / "plan.json", build_plan(cluster="c", profile=prof, result=res, objective="memory"))
    doc = load_plan(path, ["big", "tiny"])
    assert [d["name"] for d in doc["devices"]] == ["big"]
    assert doc["excluded"][0]["name"] == "tiny" and doc["excluded"][0]["needed_bytes"] > 10


def test_budget_is_usable_memory_minus_headroom():
    assert budget_bytes(1000) == 850
    assert budget_bytes(1000, 0.0) == 1000
    with pytest.raises(ConfigError):
        budget_bytes(1000, 1.5)
