"""Checkpoint files (dsparse_cli/runtime/checkpoint.py); resume of a real run is in test_worker.py."""

from __future__ import annotations

import os

import pytest
import torch

from dsparse_cli.runtime import checkpoint as ckpt
from dsparse_cli.runtime.models import build_model


def _state(plan_hash="abc", step=3, rank=0):
    torch.manual_seed(step)
    model = build_model("tiny_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {"plan_hash": plan_hash, "rank": rank, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "epoch": 1, "step_in_epoch": 2, "global_step": step, "rng": ckpt.rng_state(),
            "aggregator": {"residuals": {"g0": torch.randn(5)}}, "history": [{"epoch": 1, "accuracy": 0.5}],
            "accuracy": 0.5}


def test_round_trip(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path))
    st = _state()
    ckpt.save_checkpoint(path, st)
    back = ckpt.load_checkpoint(path, "abc", rank=0)
    for k, v in st["model"].items():
        assert torch.equal(back["model"][k], v)
    mom = [s["momentum_buffer"] for s in back["optimizer"]["state"].values()]
    assert mom and all(m is not None for m in mom)
    assert back["global_step"] == 3 and back["step_in_epoch"] == 2 and back["history"] == st["history"]
    assert torch.equal(back["aggregator"]["residuals"]["g0"], st["aggregator"]["residuals"]["g0"])
    torch.manual_seed(99)
    ckpt.set_rng_state(back["rng"])  # restores the stream as it was at save time
    a = torch.rand(3)
    ckpt.set_rng_state(st["rng"])
    assert torch.equal(a, torch.rand(3))


def test_previous_checkpoint_is_kept_and_no_tmp_left(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path))
    ckpt.save_checkpoint(path, _state(step=1))
    ckpt.save_checkpoint(path, _state(step=2))
    assert ckpt.candidate_paths(str(tmp_path)) == [path, ckpt.previous_path(path)]
    assert ckpt.load_checkpoint(path, "abc")["global_step"] == 2
    assert ckpt.load_checkpoint(ckpt.previous_path(path), "abc")["global_step"] == 1
    assert sorted(os.listdir(os.path.dirname(path))) == ["latest.pt", "previous.pt"]


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path))
    ckpt.save_checkpoint(path, _state(step=1))
    with pytest.raises(Exception):
        ckpt.save_checkpoint(path, {"plan_hash": "abc", "bad": lambda: 0})  # not picklable
    assert ckpt.load_checkpoint(path, "abc")["global_step"] == 1
    assert sorted(os.listdir(os.path.dirname(path))) == ["latest.pt"]


def test_refuses_other_plan_rank_missing_and_garbage(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to resume from"):
        ckpt.load_checkpoint(path, "abc")
    ckpt.save_checkpoint(path, _state(plan_hash="abc", rank=1))
    with pytest.raises(ckpt.CheckpointError, match="made under plan abc, not the current plan zzz"):
        ckpt.load_checkpoint(path, "zzz")
    with pytest.raises(ckpt.CheckpointError, match="belongs to rank 1"):
        ckpt.load_checkpoint(path, "abc", rank=0)
    with open(path, "wb") as fh:
        fh.write(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(path, "abc")


def test_plan_hash_matches_the_launcher():
    from dsparse_cli.jobs.launch import plan_hash

    plan = {"model": "tiny_cnn", "devices": [{"name": "b0", "units": [0, 1]}], "b": [1, 2]}
    assert ckpt.plan_hash(plan) == plan_hash(plan)
    assert ckpt.plan_hash(plan) != ckpt.plan_hash({**plan, "b": [2, 1]})


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A real full filesystem (a 2 MiB tmpfs, root), not a mock: the save fails, latest.pt is the
    previous step's, readable, and no temporary file is left taking the space."""
    import subprocess

    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root (CI does)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        path = ckpt.checkpoint_path(str(disk))
        ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
        with pytest.raises(ckpt.CheckpointError, match="MiB free there.*the previous checkpoint is intact"):
            ckpt.save_checkpoint(path, {"step": 2, "w": torch.ones(1_000_000)})   # 4 MB on a 2 MiB disk
        kept = torch.load(path, weights_only=True)
        assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["latest.pt"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
