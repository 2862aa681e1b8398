"""Profile: saved-tensor attribution on a model whose saved bytes are known by hand, the replay of a
step's timeline on a hand-made profile, and the cache."""

from __future__ import annotations

import json

import pytest

from dsparse_cli.planning import profile as P
from dsparse_cli.planning import replay as R
from dsparse_cli.planning.profile import FROZEN, PASSTHROUGH, UPDATED, Profile, UnitCost
from dsparse_cli.planning.replay import Comm

B, D_IN, H, D_OUT = 8, 16, 32, 4
ACT = B * H * 4  # one float32 hidden activation: 1024 bytes


@pytest.fixture(scope="module")
def mlp():
    """fc1 | relu, fc2 | fc3 as three units (Linear 16->32, ReLU, Linear 32->32, Linear 32->4)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from dsparse_cli.runtime.models import UnitSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, H), nn.Linear(H, D_OUT))
    units = [UnitSpec(0, "fc1", ("0",)), UnitSpec(1, "act_fc2", ("1", "2")), UnitSpec(2, "fc3", ("3",))]
    return model, units, (torch.randn(B, D_IN),)


def _count(mlp, updated):
    from dsparse_cli.planning.measure import count_saved

    model, units, batch = mlp
    return count_saved(model, units, updated, batch, lambda out: out.sum())


def test_saved_bytes_all_updated(mlp):
    # fc1 saves only the batch (not counted) and its weight (a parameter); ReLU saves its output r,
    # which fc2 also saves for its weight gradient: one storage, 1024 bytes, in region 1; fc3 saves
    # its input (the activation entering unit 2) for its weight gradient.
    got = _count(mlp, {0, 1, 2})
    assert got["saved"] == [0, ACT, 0]
    assert got["saves_input"] == [False, False, True]
    assert got["saves_output"] == [False, False, False]
    assert got["input_bytes"] == [0, ACT, ACT]   # unit 0's input is the batch: counted once, elsewhere


def test_saved_bytes_passthrough(mlp):
    # Only fc1 trains: ReLU still saves r (its backward needs it to pass the gradient), frozen
    # fc2/fc3 keep only their weights, so fc3 no longer saves its input.
    got = _count(mlp, {0})
    assert got["saved"] == [0, ACT, 0]
    assert got["saves_input"] == [False, False, False]


def test_saved_bytes_frozen_prefix(mlp):
    # Only fc3 trains: nothing before it records; fc3 must save the activation entering it.
    got = _count(mlp, {2})
    assert got["saved"] == [0, 0, 0]
    assert got["saves_input"] == [False, False, True]


def _unit(i, *, p=0, g=0, o=0, inp=0, saved=(0, 0), s_in=(False, False), s_out=(False, False),
          fwd=(0, 0, 0), bwd=(0, 0)):
    return UnitCost(index=i, name=f"u{i}", modules=[str(i)], param_bytes=p, buffer_bytes=0, grad_bytes=g,
                    optimizer_bytes=o, input_bytes=inp,
                    saved={UPDATED: saved[0], PASSTHROUGH: saved[1]},
                    saves_input={UPDATED: s_in[0], PASSTHROUGH: s_in[1]},
                    saves_output={UPDATED: s_out[0], PASSTHROUGH: s_out[1]},
                    forward_peak={UPDATED: fwd[0], PASSTHROUGH: fwd[1], FROZEN: fwd[2]},
                    backward_peak={UPDATED: bwd[0], PASSTHROUGH: bwd[1]})


def hand_profile() -> Profile:
    units = [
        _unit(0, p=10, g=10, o=10, saved=(1000, 1000), s_out=(True, True), fwd=(1200, 1200, 300), bwd=(50, 40)),
        _unit(1, p=20, g=20, o=20, inp=400, saved=(200, 100), s_in=(True, False), fwd=(250, 150, 500),
              bwd=(30, 20)),
        _unit(2, p=100, g=100, o=100, inp=80, saved=(8, 0), s_in=(True, False), fwd=(10, 5, 5), bwd=(120, 10)),
    ]
    return Profile(key="k", model="hand", num_classes=4, image_size=8, batch_size=2, dtype="float32",
                   optimizer="sgd-momentum", torch="x", device="cpu", base_bytes=5000, import_bytes=4000,
                   batch_bytes=7, step_peak_bytes=26, units=units)


def test_replay_full_update_by_hand():
    prof = hand_profile()
    # kept for backward: u0 1000 + its output (= u1's input) 400 = 1400; u1 200 (its input is
    # already kept by u0); u2 8 + its input 80 (u1 does not keep it) = 88.
    # forward:  u0 7+0+1200 = 1207, u1 7+1400+250 = 1657, u2 7+1600+80+10 = 1697
    # backward: u2 7+1688+0(no grad in)+120 = 1815, u1 7+1600+100(G2)+80(grad in)+30 = 1817,
    #           u0 7+1400+120+400+50 = 1977 (the peak); optimizer 7+130+26 = 163
    assert P.live_peak_bytes(prof, {0, 1, 2}) == 1977
    # alone (no other board): + optimizer state; the weights are in the base (the worker's split)
    assert P.training_bytes(prof, {0, 1, 2}, Comm()) == 130 + 1977
    assert P.peak_bytes(prof, {0, 1, 2}, Comm()) == 5000 + 2107


def test_replay_frozen_prefix_by_hand():
    prof = hand_profile()
    # {2}: u0, u1 run frozen (no-grad peaks 300, 500 over their inputs); u2 keeps its input.
    # forward: 7+300, 7+400+500 = 907 (the peak), 7+80+10; backward u2: 7+88+120 = 215;
    # optimizer 7+100+26*100//130 = 127
    assert P.live_peak_bytes(prof, {2}) == 907
    # evaluation: the gradients (kept until the next step) + the no-grad forward, 100 + 907,
    # is above the step's own peak
    assert P.training_bytes(prof, {2}, Comm()) == 100 + 100 + 907


def test_replay_passthrough_by_hand():
    prof = hand_profile()
    # {0, 2}: u1 passes gradients through: it keeps 100 (not 200) and adds no gradient.
    # kept: 1400 + 100 + 88 = 1588. backward: u2 7+1588+120 = 1715, u1 7+1500+100+80+20 = 1707,
    # u0 7+1400+100+400+50 = 1957 (the peak)
    assert P.live_peak_bytes(prof, {0, 2}) == 1957
    parts = P.breakdown(prof, {0, 2}, Comm())
    assert parts == {"first_step": 0, "optimizer": 110, "gradients": 110, "saved_activations": 1588,
                     "working_set": 1957 - 110 - 1588, "aggregation": 0, "evaluation": 0}
    assert sum(parts.values()) == P.training_bytes(prof, {0, 2}, Comm())


def test_gradient_buckets_are_live_during_backward():
    prof = hand_profile()
    # every unit all-reduced: a bucket copy of each gradient exists from the unit's backward on.
    # u1: 7+1600+100(G2)+100(copy of G2)+80+30 = 1917; u0: 7+1400+120+120+400+50 = 2097
    assert P.live_peak_bytes(prof, {0, 1, 2}, shared={0, 1, 2}) == 2097
    # only u2 shared (the others trained here alone): u0 7+1400+120+100+400+50 = 2077
    assert P.live_peak_bytes(prof, {0, 1, 2}, shared={2}) == 2077
    assert P.training_bytes(prof, {0, 1, 2}, Comm(frozenset({0, 1, 2}))) == 130 + 2097


def test_broadcast_payload_and_first_step_bytes():
    prof = hand_profile()
    for u, b in zip(prof.units, (5, 7, 11)):
        u.first_step_bytes = b
    prof.eval_first_bytes = 3
    # a board training u2 alone pays the one-time bytes of u2's backward only; one training
    # from u0 pays all three (units after its first updated one run backward)
    assert R.first_step_bytes(prof, {2}) == 11 and R.first_step_bytes(prof, {0, 2}) == 23
    # it receives u0+u1 (30 bytes) flattened while its gradients exist: after the step 7+100+5000
    big = Comm(frozenset({2}), flat_bytes=5000)
    assert P.training_bytes(prof, {2}, big) == 11 + 3 + 100 + 7 + 100 + 5000
    parts = P.breakdown(prof, {2}, big)
    assert parts["first_step"] == 11 and parts["evaluation"] == 3
    assert parts["aggregation"] == 7 + 100 + 5000 - 907 and sum(parts.values()) == P.training_bytes(prof, {2}, big)
    assert R.single_process_bytes(parts) == P.training_bytes(prof, {2}, Comm()) - 3 - (100 + 907 - 907)


def test_planner_sizing_is_never_below_the_plans_groups():
    prof = hand_profile()
    groups = [{"id": 0, "op": "allreduce", "ranks": [0, 1], "units": [1, 2]},
              {"id": 1, "op": "broadcast", "ranks": [0, 1], "units": [0]}]
    exact = R.plan_comm(prof, groups, 1)
    assert exact == Comm(frozenset({1, 2}), 10)       # u0's 10 parameter bytes come to it
    assert R.plan_comm(prof, groups, 0) == exact       # the root flattens the same payload
    upper = R.upper_comm(prof, {1, 2})
    assert upper.shared >= exact.shared and upper.flat_bytes >= exact.flat_bytes
    assert P.training_bytes(prof, {1, 2}) >= P.training_bytes(prof, {1, 2}, exact)


def test_profile_json_round_trip(tmp_path):
    prof = hand_profile()
    path = tmp_path / "p.json"
    P.save_profile(prof, path)
    assert P.load_profile(path) == prof
    assert json.loads(path.read_text())["units"][1]["saved"] == {"passthrough": 100, "updated": 200}


def test_get_profile_uses_the_cache(tmp_path, monkeypatch):
    key = P.profile_key("tiny_cnn", 10, 32, 4, "float32", "sgd")
    prof = hand_profile()
    prof.key = key
    P.save_profile(prof, P.profile_path(tmp_path, key))

    def no_measuring(*a, **k):
        raise AssertionError("a cached profile must not be measured again")

    monkeypatch.setattr(P, "run_profile_subprocess", no_measuring)
    assert P.get_profile(tmp_path, "tiny_cnn", batch_size=4, optimizer="sgd") == prof


def test_profile_key_depends_on_every_input():
    base = dict(model="resnet18", num_classes=10, image_size=32, batch_size=64, dtype="float32",
                optimizer="sgd-momentum", torch="2.3")
    keys = {P.profile_key(**base)}
    for field, other in [("model", "tiny_cnn"), ("num_classes", 100), ("image_size", 64), ("batch_size", 32),
                         ("dtype", "float64"), ("optimizer", "adam"), ("torch", "2.4")]:
        keys.add(P.profile_key(**{**base, field: other}))
    assert len(keys) == 8


@pytest.mark.parametrize("kwargs, word", [({"optimizer": "lion"}, "optimizer"), ({"dtype": "int8"}, "dtype"),
                                          ({"batch_size": 0}, "batch")])
def test_bad_profile_inputs_are_config_errors(tmp_path, kwargs, word):
    from dsparse_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=word):
        P.get_profile(tmp_path, "tiny_cnn", **kwargs)


def _seed(state_dir, **kw) -> Profile:
    prof = hand_profile()
    prof.model, prof.supervisor_bytes = "tiny_cnn", 6000
    prof.key = P.profile_key("tiny_cnn", 10, 32, 4, "float32", "sgd")
    P.save_profile(prof, P.profile_path(state_dir, prof.key))
    return prof


def test_torchrun_agent_is_measured_only_for_a_torchrun_plan_and_then_cached(tmp_path, monkeypatch):
    """Measuring torchrun's agent imports torch (~3 s): a plan for dsparse's launcher never does
    it; the first torchrun plan does, once, and the cache keeps it so plans stay byte-identical."""
    from dsparse_cli.planning import plan_cluster
    from dsparse_cli.planning.planfile import plan_json

    calls = []
    monkeypatch.setattr(P, "measure_launcher_bytes", lambda kind="torchrun": calls.append(kind) or 300_000)
    monkeypatch.setattr(P, "run_profile_subprocess", lambda *a, **k: pytest.fail("the cached profile is measured"))
    _seed(tmp_path)
    boards = [("a", {"usable_memory_bytes": 10**6}), ("b", {"usable_memory_bytes": 10**6})]
    kw = dict(cluster="t", boards=boards, state_dir=tmp_path, model="tiny_cnn", batch_size=4, optimizer="sgd")
    assert plan_cluster(**kw)["launcher_bytes"] == 6000 and calls == []
    first = plan_cluster(**kw, launcher="torchrun")
    assert first["launcher_bytes"] == 300_000 and calls == ["torchrun"]
    cached = P.load_profile(P.profile_path(tmp_path, first["profile_key"]))
    assert cached.launcher_bytes == 300_000
    assert plan_json(plan_cluster(**kw, launcher="torchrun")) == plan_json(first) and calls == ["torchrun"]


def test_the_measuring_child_leaves_torchruns_agent_alone(monkeypatch):
    """The profile itself (what every plan pays) measures only dsparse's own launcher."""
    pytest.importorskip("torch")
    from dsparse_cli.planning import measure

    kinds = []
    monkeypatch.setattr(measure, "measure_launcher_bytes", lambda kind="torchrun": kinds.append(kind) or 1)
    prof = measure.measure_profile("tiny_cnn", batch_size=2, image_size=8, optimizer="sgd")
    assert kinds == ["dsparse"] and prof.launcher_bytes == 0 and prof.supervisor_bytes == 1
