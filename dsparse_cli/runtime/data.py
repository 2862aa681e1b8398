"""Datasets and the per-rank shard every worker (and the DDP reference in the tests) iterates.

* `digits`: scikit-learn's bundled 8x8 digits, read with gzip+csv (sklearn itself is never
  imported: boards do not have it), upscaled to `image_size` and given 3 channels.
* `cifar10`: torchvision's CIFAR-10 (`data_dir`, downloaded only when asked).
* `synthetic`: seeded random images with a class-dependent pattern (learnable, for speed tests).
* `imagefolder`: the user's own images (`runtime/imagefolder.py`), each rank holding only its shard.

Sharding follows `DistributedSampler(shuffle=True, drop_last=True)`: one permutation per epoch
(seeded by seed + epoch, the same on every rank), cut to a multiple of the world size, rank r
takes positions r, r+world, ...; then each rank's shard is cut into full batches only, so every
rank runs the same number of steps per epoch. An image folder is sharded once, statically (a
board holds only its own files): each rank shuffles its shard per epoch (seed + epoch) and runs
`(n_train // world) // batch_size` steps. `dataset_steps_per_epoch`, `batches_for` and
`eval_slice` take a loaded dataset and handle both kinds.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from dsparse_cli.contract import DATASETS
# The records live in imagefolder.py (torch-free, so the CLI can raise and catch DataError
# without torch); this module is where everyone imports them from. SPLIT_SEED: the digits and
# synthetic train/test split, like an image folder's, never depends on the job seed.
from dsparse_cli.runtime.imagefolder import SPLIT_SEED, DataError, Dataset, Split, load_imagefolder  # noqa: F401
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SAMPLES = 1280   # train + test, when the job does not say
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _tensor_split(x: Tensor, y: Tensor) -> Split:
    return Split(len(y), lambda idx: (x[idx], y[idx]))


# --- digits ------------------------------------------------------------------------------
def digits_path(data_dir: str | None, *more_dirs: str | None) -> str:
    """`digits.csv.gz` in `data_dir` (then `more_dirs`, e.g. the job's run dir where the launcher
    can ship it) if present, else the copy inside an installed scikit-learn."""
    for d in (data_dir, *more_dirs):
        if d:
            candidate = os.path.join(os.path.expanduser(d), "digits.csv.gz")
            if os.path.isfile(candidate):
                return candidate
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidate = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(candidate):
            return candidate
    raise DataError("dataset digits: digits.csv.gz not found in the data dir, the run dir or an installed "
                    "scikit-learn; copy sklearn/datasets/data/digits.csv.gz into the data dir")


def read_digits(path: str) -> tuple[Tensor, Tensor]:
    """-> (images float32 N×8×8 in 0..16, labels int64 N)."""
    with gzip.open(path, "rt", newline="") as fh:
        rows = [[float(v) for v in row] for row in csv.reader(fh) if row]
    if not rows or any(len(r) != 65 for r in rows):
        raise DataError(f"dataset digits: {path} is not the 65-column digits table")
    t = torch.tensor(rows, dtype=torch.float32)
    return t[:, :64].reshape(-1, 8, 8), t[:, 64].long()


def _grey_splits(x8: Tensor, y: Tensor, image_size: int, train: Tensor, test: Tensor) -> tuple[Split, Split]:
    """8×8 grey in 0..16, kept as it is; each batch is upscaled (bilinear), normalised and made
    3-channel when fetched. The whole set upscaled would sit in every board's memory: 118 MiB at
    128×128, 344 MiB at 224×224. The normalisation is the upscaled set's, computed a chunk at a time."""
    x = x8.unsqueeze(1) / 16.0

    def up(t: Tensor) -> Tensor:
        if image_size == t.shape[-1]:
            return t
        return F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)

    total = squares = 0.0
    for chunk in x.split(256):
        u = up(chunk).double()
        total, squares = total + u.sum().item(), squares + u.square().sum().item()
    n = len(x) * image_size * image_size
    mean = total / n
    std = ((squares - n * mean * mean) / (n - 1)) ** 0.5

    def split(idx: Tensor) -> Split:
        xs, ys = x[idx], y[idx]
        return Split(len(ys), lambda i: (((up(xs[i]) - mean) / std).expand(-1, 3, -1, -1).contiguous(), ys[i]))

    return split(train), split(test)


def _split_indices(n: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def load_digits(data_dir: str | None, image_size: int = 32, *more_dirs: str | None) -> Dataset:
    x8, y = read_digits(digits_path(data_dir, *more_dirs))
    train, test = _split_indices(len(y), DIGITS_TEST_FRACTION)
    return Dataset("digits", *_grey_splits(x8, y, image_size, train, test))


# --- synthetic ---------------------------------------------------------------------------
def load_synthetic(samples: int, image_size: int = 32, seed: int = 0, num_classes: int = 10) -> Dataset:
    """Gaussian noise plus a fixed random pattern per class: cheap and learnable."""
    g = torch.Generator().manual_seed(SPLIT_SEED + seed)
    patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
    y = torch.randint(num_classes, (samples,), generator=g)
    x = torch.randn(samples, 3, image_size, image_size, generator=g) + 0.5 * patterns[y]
    train, test = _split_indices(samples, 0.2)
    return Dataset("synthetic", _tensor_split(x[train], y[train]), _tensor_split(x[test], y[test]),
                   num_classes)


# --- cifar10 -----------------------------------------------------------------------------
def _cifar_split(ds, image_size: int) -> Split:
    images = torch.as_tensor(ds.data)            # N×32×32×3 uint8, shares torchvision's memory
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def fetch(idx: Tensor) -> tuple[Tensor, Tensor]:
        x = images[idx].permute(0, 3, 1, 2).float().div_(255.0)
        if image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return (x - mean) / std, labels[idx]

    return Split(len(labels), fetch)


def load_cifar10(data_dir: str | None, download: bool, image_size: int = 32) -> Dataset:
    import torchvision

    if not data_dir:
        raise DataError("dataset cifar10 needs a data dir (--data-dir)")
    root = os.path.expanduser(data_dir)
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=download)
        test = torchvision.datasets.CIFAR10(root, train=False, download=download)
    except (RuntimeError, OSError) as exc:  # not found / corrupted / download failed
        hint = "check the network" if download else "point --data-dir at it or add --download"
        raise DataError(f"dataset cifar10 not usable in {root}: {exc} ({hint})") from None
    return Dataset("cifar10", _cifar_split(train, image_size), _cifar_split(test, image_size),
                   mean=CIFAR_MEAN, std=CIFAR_STD)


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False, image_size: int = 32,
                 seed: int = 0, synthetic_samples: int | None = None, workdir: str | None = None,
                 rank: int = 0, world: int = 1, val_fraction: float = 0.2, skip_bad_images: bool = False) -> Dataset:
    """The dataset `name`; `rank`/`world` matter only to an image folder (it loads its shard)."""
    if name == "digits":
        return load_digits(data_dir, image_size, workdir)
    if name == "cifar10":
        return load_cifar10(data_dir, download, image_size)
    if name == "synthetic":
        return load_synthetic(synthetic_samples or SYNTHETIC_SAMPLES, image_size, seed)
    if name == "imagefolder":
        return load_imagefolder(data_dir, rank=rank, world=world, image_size=image_size, val_fraction=val_fraction,
                                skip_bad_images=skip_bad_images, seed=seed)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --- sharding ----------------------------------------------------------------------------
def steps_per_epoch(n_train: int, world: int, batch_size: int) -> int:
    """Same on every rank: the shard (n // world samples) cut into full batches."""
    return (n_train // world) // batch_size


def shard_indices(n_train: int, rank: int, world: int, epoch: int, seed: int) -> Tensor:
    """This rank's sample positions for `epoch` (DistributedSampler, shuffle, drop_last)."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
    per_rank = n_train // world
    return perm[: per_rank * world][rank::world]


def batch_indices(n_train: int, rank: int, world: int, epoch: int, seed: int, batch_size: int) -> list[Tensor]:
    idx = shard_indices(n_train, rank, world, epoch, seed)
    steps = steps_per_epoch(n_train, world, batch_size)
    return [idx[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def dataset_steps_per_epoch(ds: Dataset, world: int, batch_size: int) -> int:
    """`steps_per_epoch` of a loaded dataset: for a sharded one from the whole folder's count."""
    return ds.shard_size // batch_size if ds.sharded else steps_per_epoch(ds.train.size, world, batch_size)


def local_batch_indices(ds: Dataset, world: int, epoch: int, seed: int, batch_size: int) -> list[Tensor]:
    """A sharded dataset's batches for `epoch`: its own shard shuffled (seed + epoch), cut into
    the steps every rank runs. A shard short of images (bad ones skipped) is shuffled again to
    fill them, so no rank runs fewer steps than the others."""
    steps = dataset_steps_per_epoch(ds, world, batch_size)
    if steps and not ds.train.size:
        raise DataError("this board's shard has no training images")
    g = torch.Generator().manual_seed(seed + epoch)
    perms = [torch.randperm(ds.train.size, generator=g)]
    while sum(len(p) for p in perms) < steps * batch_size:
        perms.append(torch.randperm(ds.train.size, generator=g))
    idx = torch.cat(perms)
    return [idx[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def batches_for(ds: Dataset, rank: int, world: int, epoch: int, seed: int, batch_size: int,
                start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's batches for `epoch`, from batch `start` on (resume skips what was done)."""
    batches = (local_batch_indices(ds, world, epoch, seed, batch_size) if ds.sharded
               else batch_indices(ds.train.size, rank, world, epoch, seed, batch_size))
    for idx in batches[start:]:
        yield ds.train.fetch(idx)


def eval_indices(n_test: int, rank: int, world: int) -> Tensor:
    """Every test sample exactly once across ranks (no drop): rank r takes r, r+world, ..."""
    return torch.arange(rank, n_test, world)


def eval_slice(ds: Dataset, rank: int, world: int) -> Tensor:
    """This rank's test samples: all of a sharded dataset's (its shard is its slice), else
    `eval_indices`."""
    return torch.arange(ds.test.size) if ds.sharded else eval_indices(ds.test.size, rank, world)
