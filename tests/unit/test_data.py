"""Datasets and per-rank sharding of the runtime (dsparse_cli/runtime/data.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from dsparse_cli.runtime import data


def test_digits_loads_without_importing_sklearn():
    code = ("import json, sys, torch; from dsparse_cli.runtime.data import load_digits; ds = load_digits(None); "
            "x, y = ds.train.fetch(torch.arange(3)); "
            "print(json.dumps([ds.train.size, ds.test.size, list(x.shape), 'sklearn' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_train, n_test, shape, imported = json.loads(out.stdout)
    assert n_train + n_test == 1797 and n_test == round(1797 * 0.2)
    assert shape == [3, 3, 32, 32]
    assert imported is False


def test_digits_content_and_split():
    ds = data.load_digits(None)
    x, y = ds.train.fetch(torch.arange(ds.train.size))
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey in 3 channels
    assert set(y.tolist()) == set(range(10))
    xt, yt = ds.test.fetch(torch.arange(ds.test.size))
    # the split is fixed (independent of the job seed) and train/test share no image
    again = data.load_digits(None)
    assert torch.equal(again.test.fetch(torch.arange(5))[0], xt[:5])
    train_keys = {tuple(r.tolist()) for r in x[:, 0, ::4, ::4].reshape(len(x), -1)}
    test_keys = {tuple(r.tolist()) for r in xt[:, 0, ::4, ::4].reshape(len(xt), -1)}
    assert len(train_keys & test_keys) < 5  # a handful of the 1797 digits are exact duplicates


def test_digits_from_data_dir_and_clear_error(tmp_path, monkeypatch):
    src = data.digits_path(None)
    (tmp_path / "digits.csv.gz").write_bytes(gzip.compress(b"".join(gzip.open(src).readlines()[:20])))
    assert data.digits_path(str(tmp_path)) == str(tmp_path / "digits.csv.gz")
    x8, y = data.read_digits(str(tmp_path / "digits.csv.gz"))
    assert x8.shape == (20, 8, 8) and float(x8.max()) <= 16
    assert data.digits_path(str(tmp_path / "nowhere"), str(tmp_path)) == str(tmp_path / "digits.csv.gz")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataError, match="digits.csv.gz not found"):
        data.digits_path(str(tmp_path / "nowhere"))


def test_cifar10_missing_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="cifar10 not usable.*--download"):
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(data.DataError, match="needs a data dir"):
        data.load_dataset("cifar10", data_dir=None)
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_dataset("imagenet")


def test_synthetic_is_seeded_and_learnable_shape():
    a, b = data.load_synthetic(100, 16, seed=1), data.load_synthetic(100, 16, seed=1)
    xa, ya = a.train.fetch(torch.arange(a.train.size))
    xb, yb = b.train.fetch(torch.arange(b.train.size))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.train.size + a.test.size == 100 and xa.shape[1:] == (3, 16, 16)
    c = data.load_synthetic(100, 16, seed=2)
    assert not torch.equal(c.train.fetch(torch.arange(3))[0], xa[:3])


@pytest.mark.parametrize("n,world,batch", [(1437, 3, 16), (101, 2, 8), (160, 1, 16)])
def test_shards_disjoint_equal_and_match_distributed_sampler(n, world, batch):
    for epoch in (0, 1):
        shards = [data.shard_indices(n, r, world, epoch, seed=7) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        flat = torch.cat(shards)
        assert len(set(flat.tolist())) == len(flat) == (n // world) * world  # disjoint
        for r in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=7,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            assert shards[r].tolist() == list(sampler)
        batches = [data.batch_indices(n, r, world, epoch, 7, batch) for r in range(world)]
        steps = data.steps_per_epoch(n, world, batch)
        assert all(len(b) == steps for b in batches)
        assert all(len(x) == batch for b in batches for x in b)  # full batches only
    e0 = data.shard_indices(n, 0, world, 0, seed=7)
    e1 = data.shard_indices(n, 0, world, 1, seed=7)
    assert not torch.equal(e0, e1)  # reshuffled each epoch


def test_batches_for_resumes_mid_epoch():
    ds = data.load_synthetic(200, 8)
    full = list(data.batches_for(ds, 1, 2, epoch=3, seed=0, batch_size=16))
    tail = list(data.batches_for(ds, 1, 2, epoch=3, seed=0, batch_size=16, start=2))
    assert len(full) == data.steps_per_epoch(ds.train.size, 2, 16) and len(tail) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_indices_cover_test_set_once():
    parts = [data.eval_indices(361, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(361))
