"""Image folders (dsparse_cli/runtime/imagefolder.py) and the sharded dataset helpers of data.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from dsparse_cli.runtime import data, imagefolder
from dsparse_cli.runtime.imagefolder import DataError, scan, shard
from helpers import make_digits_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """DIR/<digit>/... with 13 images of each digit (130 images)."""
    return make_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", per_class=13)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """DIR/train/<digit>/... and DIR/val/<digit>/... of 3 digits."""
    return make_digits_imagefolder(tmp_path_factory.mktemp("split") / "digits", classes=range(3), per_class=10,
                                   split=True)


def test_scan_one_folder_splits_each_class_by_val_fraction(folder):
    index = scan(str(folder), 0.2)
    assert index.classes == [str(c) for c in range(10)] and index.layout == "folder"
    assert (len(index.train), len(index.val)) == (100, 30)   # round(13 * 0.2) = 3 of each class to val
    assert (index.total_train, index.total_val) == (100, 30)
    assert not {p for p, _ in index.train} & {p for p, _ in index.val}
    for path, label in index.train + index.val:
        assert path.startswith(f"{label}/") and (folder / path).is_file()
    assert {label for _, label in index.val} == set(range(10))


def test_scan_train_and_val_folders(split_folder):
    index = scan(str(split_folder), 0.5)   # the fraction does not apply to this layout
    assert index.classes == ["0", "1", "2"] and index.layout == "split"
    assert (len(index.train), len(index.val)) == (24, 6)
    assert all(p.startswith("train/") for p, _ in index.train) and all(p.startswith("val/") for p, _ in index.val)


def test_the_split_is_fixed_and_not_the_job_seed(folder, tmp_path):
    first = scan(str(folder), 0.2)
    assert scan(str(folder), 0.2) == first
    # a copy elsewhere splits the same way: the order depends on the relative paths only
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert scan(str(copy), 0.2).val == first.val
    # the job seed only reaches the per-epoch shuffle and the augmentation, never the split
    a = data.load_dataset("imagefolder", data_dir=str(folder), image_size=8, seed=1)
    b = data.load_dataset("imagefolder", data_dir=str(folder), image_size=8, seed=2)
    all_val = torch.arange(a.test.size)
    assert torch.equal(a.test.fetch(all_val)[1], b.test.fetch(all_val)[1])
    assert scan(str(folder), 0.5).val != first.val


def test_the_split_does_not_depend_on_the_python_run(folder):
    """sha256 orders, not `random` or `hash()`: a board's interpreter computes the same split."""
    code = ("import json, sys; from dsparse_cli.runtime.imagefolder import scan, shard; "
            "print(json.dumps(shard(scan(sys.argv[1], 0.2), 1, 3).train))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert [tuple(e) for e in json.loads(out.stdout)] == shard(scan(str(folder), 0.2), 1, 3).train


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_the_cut(folder, world):
    index = scan(str(folder), 0.2)
    shards = [shard(index, r, world) for r in range(world)]
    train = [{p for p, _ in s.train} for s in shards]
    assert all(len(t) == len(index.train) // world for t in train)
    assert sum(len(t) for t in train) == len(set().union(*train)) == (len(index.train) // world) * world
    assert set().union(*train) <= {p for p, _ in index.train}
    val = [p for s in shards for p, _ in s.val]
    assert sorted(val) == sorted(p for p, _ in index.val)   # every val image once, none dropped
    labels = dict(index.train + index.val)
    assert all(labels[p] == lb for s in shards for p, lb in s.train + s.val)
    assert all((s.total_train, s.world) == (len(index.train), world) for s in shards)


def test_manifest_round_trip_and_load_with_and_without_it(folder, tmp_path):
    index = scan(str(folder), 0.2)
    mine = shard(index, 1, 2)
    pushed = tmp_path / "pushed"
    for p, _ in mine.train + mine.val:   # what `dsparse data push` leaves on the board
        (pushed / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / p, pushed / p)
    imagefolder.write_manifest(str(pushed), mine, root=str(folder))
    back = imagefolder.read_manifest(str(pushed))
    assert (back.train, back.val, back.classes, back.rank, back.world) == (mine.train, mine.val, mine.classes, 1, 2)
    assert back.sizes[mine.train[0][0]] == (folder / mine.train[0][0]).stat().st_size
    assert imagefolder.read_manifest(str(folder)) is None

    scanned = imagefolder.load_imagefolder(str(folder), rank=1, world=2, image_size=8)
    from_manifest = imagefolder.load_imagefolder(str(pushed), rank=1, world=2, image_size=8)
    for split in ("train", "test"):
        a, b = getattr(scanned, split), getattr(from_manifest, split)
        assert a.size == b.size
    idx = torch.arange(from_manifest.test.size)
    assert torch.equal(scanned.test.fetch(idx)[0], from_manifest.test.fetch(idx)[0])
    assert data.dataset_steps_per_epoch(scanned, 2, 4) == data.dataset_steps_per_epoch(from_manifest, 2, 4)

    with pytest.raises(DataError, match="rank 1 of 2 boards, but this board is rank 0 of 2.*dsparse data push"):
        imagefolder.load_imagefolder(str(pushed), rank=0, world=2)
    with pytest.raises(DataError, match="--val-fraction 0.2, the job asks 0.3"):
        imagefolder.load_imagefolder(str(pushed), rank=1, world=2, val_fraction=0.3)
    (pushed / mine.val[0][0]).unlink()
    with pytest.raises(DataError, match="missing or changed since the push"):
        imagefolder.load_imagefolder(str(pushed), rank=1, world=2)


def test_every_rank_runs_the_same_steps(folder):
    world, batch = 3, 4
    loaded = [data.load_dataset("imagefolder", data_dir=str(folder), rank=r, world=world, image_size=8)
              for r in range(world)]
    steps = {data.dataset_steps_per_epoch(ds, world, batch) for ds in loaded}
    assert steps == {(100 // world) // batch}
    for r, ds in enumerate(loaded):
        assert ds.sharded and ds.num_classes == 10 and ds.classes == [str(c) for c in range(10)]
        batches = list(data.batches_for(ds, r, world, epoch=0, seed=0, batch_size=batch))
        assert len(batches) == (100 // world) // batch and all(len(y) == batch for _, y in batches)
        assert len(list(data.batches_for(ds, r, world, 0, 0, batch, start=2))) == len(batches) - 2
    assert sum(len(data.eval_slice(ds, r, world)) for r, ds in enumerate(loaded)) == 30


def test_fetch_shape_dtype_and_normalisation(folder):
    ds = data.load_dataset("imagefolder", data_dir=str(folder), image_size=12)
    x, y = ds.test.fetch(torch.arange(ds.test.size))
    assert x.shape == (30, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.mean == imagefolder.IMAGENET_MEAN and ds.std == imagefolder.IMAGENET_STD
    # grey digits: every channel is the same image, normalised with its own channel's mean/std
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    pixels = x * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert pixels.amin() < 0.05 and pixels.amax() > 0.95   # black background, white strokes


def test_training_batches_are_augmented_but_evaluation_is_not(folder):
    ds = data.load_dataset("imagefolder", data_dir=str(folder), image_size=16, seed=3)
    idx = torch.arange(16)
    first, second = ds.train.fetch(idx)[0], ds.train.fetch(idx)[0]
    assert not torch.equal(first, second)                        # a new crop/flip every time
    assert torch.equal(ds.test.fetch(idx)[0], ds.test.fetch(idx)[0])
    again = data.load_dataset("imagefolder", data_dir=str(folder), image_size=16, seed=3)
    assert torch.equal(again.train.fetch(idx)[0], first)          # the job seed makes runs repeat
    epoch0 = [y for _, y in data.batches_for(ds, 0, 1, 0, 3, 8)]
    epoch1 = [y for _, y in data.batches_for(ds, 0, 1, 1, 3, 8)]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))   # reshuffled per epoch


def test_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^data dir .*nowhere not found$"):
        scan(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"flat has no class subfolders: expected .*flat/<class>/<image> or "
                                        r".*flat/train/<class>/…"):
        scan(str(tmp_path / "flat"))
    (tmp_path / "flat" / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cat has no images"):
        scan(str(tmp_path / "flat"))
    with pytest.raises(DataError, match="val fraction 1.5 is out of range"):
        scan(str(tmp_path / "flat"), 1.5)
    with pytest.raises(DataError, match="needs a data dir"):
        data.load_dataset("imagefolder")


def test_train_and_val_with_different_classes(split_folder, tmp_path):
    d = shutil.copytree(split_folder, tmp_path / "d")
    shutil.move(d / "val" / "2", d / "val" / "7")
    with pytest.raises(DataError, match=r"train and .*val have different classes \(only in train: 2; only in val: 7\)"):
        scan(str(d))


def test_a_corrupt_image_is_named_or_skipped_and_counted(folder, tmp_path):
    d = shutil.copytree(folder, tmp_path / "d")
    index = scan(str(d), 0.2)
    broken = index.train[5][0]
    (d / broken).write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=f"image {broken} in .* does not decode.*--skip-bad-images"):
        imagefolder.bad_images(str(d), index, skip_bad=False)
    assert imagefolder.bad_images(str(d), index, skip_bad=True) == [broken]

    owner = next(r for r in range(2) if broken in {p for p, _ in shard(index, r, 2).train})
    ds = data.load_dataset("imagefolder", data_dir=str(d), rank=owner, world=2, image_size=8, skip_bad_images=True)
    assert ds.skipped == 1 and ds.train.size == 49 and ds.shard_size == 50
    assert len(list(data.batches_for(ds, owner, 2, 0, 0, 10))) == 5   # refilled: the same steps as the other rank
    plain = data.load_dataset("imagefolder", data_dir=str(d), rank=owner, world=2, image_size=8)
    where = [p for p, _ in shard(index, owner, 2).train].index(broken)
    with pytest.raises(DataError, match=f"image {broken} .* does not decode"):
        plain.train.fetch(torch.tensor([where]))


def test_the_index_side_never_imports_torch(folder):
    code = ("import sys; from dsparse_cli.runtime.imagefolder import scan, shard, bad_images; "
            "i = scan(sys.argv[1]); bad_images(sys.argv[1], shard(i, 0, 2)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
