"""The user's own images: a torchvision `ImageFolder` tree, split, sharded and decoded per batch.

Layouts: `DIR/train/<class>/...` with `DIR/val/<class>/...` (the same classes), or one folder
`DIR/<class>/...` split per class into train/val by `val_fraction`. Orders come from sha256 of
(split seed, path), never from `random`: the control side (`dsparse data push`) and a board on
another Python version compute the same split and shards.

Sharding is static, so a board only ever needs its own files: the train files in split-seed
order, cut to a multiple of the world size, rank r takes positions r, r+world, ...; the val files
likewise, without the cut (each once across ranks). `<data dir>/dsparse-shard.json` (the
manifest `dsparse data push` writes) records a board's shard; without one the board scans the
whole folder and shards it itself.

Scanning, sharding, checking and the manifest use the standard library and PIL only: the CLI
calls them without loading torch. The records every dataset loads into (`Dataset`, `Split`,
`DataError`) live here for that reason too; `runtime/data.py` re-exports them. Loading
(`load_imagefolder`) imports torch when it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

SPLIT_SEED = 1234          # the split and shards never depend on the job seed (data.py's splits use it too)
MANIFEST = "dsparse-shard.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(Exception):
    """A dataset cannot be loaded; the message says what is missing and how to fix it."""


# --- the records every dataset loads into ------------------------------------------------
@dataclass
class Split:
    """One split: `fetch(indices) -> (images float32 N×3×S×S, labels int64)`."""

    size: int
    fetch: Callable


@dataclass
class Dataset:
    """A loaded dataset. `sharded`: the splits hold only this rank's files (an image folder);
    then every rank's epoch covers `shard_size` samples, the same number on every rank."""

    name: str
    train: Split
    test: Split
    num_classes: int = 10
    classes: Optional[list] = None      # class names, label order (image folders)
    sharded: bool = False
    shard_size: int = 0
    mean: Optional[tuple] = None        # the normalisation applied, for the trained model's sidecar
    std: Optional[tuple] = None
    skipped: int = 0                    # images left out because they do not decode


# --- the index -----------------------------------------------------------------------------
@dataclass
class FolderIndex:
    """Classes (sorted; a label is its position) and (path relative to the root, label) lists.
    A shard keeps the whole folder's counts in `total_train`/`total_val`."""

    classes: list
    train: list
    val: list
    split_seed: int = SPLIT_SEED
    val_fraction: float = 0.2
    layout: str = "folder"              # "folder": split by val_fraction; "split": train/ and val/
    rank: int = 0
    world: int = 1
    total_train: int = 0
    total_val: int = 0
    sizes: dict = field(default_factory=dict)   # path -> bytes, from a manifest


def _order(seed: int, paths: list) -> list:
    """`paths` in a fixed pseudo-random order: sha256 of (seed, path), the same everywhere."""
    return sorted(paths, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())


def _images(root: str, rel: str) -> list:
    """Image files under `root/rel` (recursively, like ImageFolder), '/'-separated, sorted."""
    found = []
    for here, dirs, files in os.walk(os.path.join(root, rel), followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        sub = os.path.relpath(here, root).replace(os.sep, "/")
        found += [f"{sub}/{f}" for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def _classes(root: str, rel: str, shown: str) -> tuple:
    """(class names, {class: its image paths}); DataError when a folder has none."""
    base = os.path.join(root, rel) if rel else root
    names = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{shown} has no class subfolders: expected {shown}/<class>/<image> "
                        f"or {shown}/train/<class>/…")
    files = {}
    for name in names:
        files[name] = _images(root, f"{rel}/{name}" if rel else name)
        if not files[name]:
            raise DataError(f"class folder {os.path.join(base, name)} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return names, files


def scan(root: str, val_fraction: float = 0.2, split_seed: int = SPLIT_SEED) -> FolderIndex:
    """The whole folder's index; a folder without train/ and val/ (or with train/ only) is split
    per class: `round(n * val_fraction)` of each class's images, in split-seed order, go to val."""
    shown = str(root).rstrip("/") or "/"
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DataError(f"data dir {shown} not found")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction {val_fraction} is out of range: use a fraction in [0, 1), e.g. 0.2")
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        return _scan_split(root, shown, val_fraction, split_seed)
    rel = "train" if os.path.isdir(os.path.join(root, "train")) else ""
    classes, files = _classes(root, rel, f"{shown}/{rel}" if rel else shown)
    train, val = [], []
    for label, name in enumerate(classes):
        ordered = _order(split_seed, files[name])
        n_val = int(round(len(ordered) * val_fraction))
        val += [(p, label) for p in ordered[:n_val]]
        train += [(p, label) for p in ordered[n_val:]]
    return _index(classes, sorted(train), sorted(val), split_seed, val_fraction, "folder")


def _scan_split(root: str, shown: str, val_fraction: float, split_seed: int) -> FolderIndex:
    classes, train_files = _classes(root, "train", f"{shown}/train")
    val_classes, val_files = _classes(root, "val", f"{shown}/val")
    if classes != val_classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(f"{shown}/train and {shown}/val have different classes "
                        f"(only in train: {', '.join(only_train) or '-'}; only in val: {', '.join(only_val) or '-'})")
    train = [(p, label) for label, name in enumerate(classes) for p in train_files[name]]
    val = [(p, label) for label, name in enumerate(classes) for p in val_files[name]]
    return _index(classes, sorted(train), sorted(val), split_seed, val_fraction, "split")


def _index(classes, train, val, split_seed, val_fraction, layout) -> FolderIndex:
    return FolderIndex(list(classes), train, val, split_seed, val_fraction, layout,
                       total_train=len(train), total_val=len(val))


def shard(index: FolderIndex, rank: int, world: int) -> FolderIndex:
    """Rank `rank`'s files of the whole folder's `index` (see the module docstring)."""
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not one of {world} boards")
    label = dict(index.train + index.val)
    train = _order(index.split_seed, [p for p, _ in index.train])
    val = _order(index.split_seed, [p for p, _ in index.val])
    train = train[:(len(train) // world) * world][rank::world]
    return replace(index, train=[(p, label[p]) for p in train], val=[(p, label[p]) for p in val[rank::world]],
                   rank=rank, world=world, sizes={})


# --- checking images -----------------------------------------------------------------------
def _broken(root: str, paths) -> list:
    """(path, reason) of every image PIL cannot open and verify (header and checksums; cheap:
    pixels are not decoded)."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(os.path.join(os.path.expanduser(root), path)) as im:
                im.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a broken file
            bad.append((path, (str(exc).splitlines() or [type(exc).__name__])[0]))
    return bad


def bad_images(root: str, index: FolderIndex, skip_bad: bool = True) -> list:
    """The index's images that do not decode; the first is a DataError naming the file unless
    `skip_bad`."""
    bad = _broken(root, [p for p, _ in index.train + index.val])
    if bad and not skip_bad:
        path, reason = bad[0]
        raise DataError(f"image {path} in {root} does not decode ({reason}); fix or remove it, "
                        "or pass --skip-bad-images")
    return [p for p, _ in bad]


def without(index: FolderIndex, paths) -> FolderIndex:
    """The index less `paths` (the whole folder's counts stay: they fix the steps per epoch)."""
    drop = set(paths)
    return replace(index, train=[e for e in index.train if e[0] not in drop],
                   val=[e for e in index.val if e[0] not in drop])


# --- the manifest --------------------------------------------------------------------------
def manifest(index: FolderIndex, root: str) -> dict:
    """The manifest document of a shard whose files are under `root` (their sizes are read there)."""
    root = os.path.expanduser(str(root))

    def entries(items):
        return [[p, label, os.path.getsize(os.path.join(root, p))] for p, label in items]

    return {"format": "dsparse-shard", "version": 1, "classes": index.classes, "rank": index.rank,
            "world": index.world, "split_seed": index.split_seed, "val_fraction": index.val_fraction,
            "layout": index.layout, "total_train": index.total_train, "total_val": index.total_val,
            "train": entries(index.train), "val": entries(index.val)}


def write_manifest(data_dir: str, index: FolderIndex, root: str | None = None) -> str:
    """Write `<data_dir>/dsparse-shard.json` atomically (sizes read under `root`, default
    `data_dir`); returns its path."""
    data_dir = os.path.expanduser(str(data_dir))
    path = os.path.join(data_dir, MANIFEST)
    os.makedirs(data_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(manifest(index, root or data_dir), fh)
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str) -> FolderIndex | None:
    """The shard `<data_dir>/dsparse-shard.json` records; None when there is none."""
    path = os.path.join(os.path.expanduser(str(data_dir)), MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
        index = FolderIndex(list(doc["classes"]), [(p, int(lb)) for p, lb, _ in doc["train"]],
                            [(p, int(lb)) for p, lb, _ in doc["val"]], int(doc["split_seed"]),
                            float(doc["val_fraction"]), str(doc.get("layout", "folder")), int(doc["rank"]),
                            int(doc["world"]), int(doc["total_train"]), int(doc["total_val"]))
        index.sizes = {p: int(size) for p, _, size in doc["train"] + doc["val"]}
        return index
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a shard manifest ({type(exc).__name__}: {exc}); "
                        "re-run `dsparse data push`") from None


# --- loading (torch) -----------------------------------------------------------------------
def _local_shard(data_dir: str, rank: int, world: int, val_fraction: float) -> FolderIndex:
    """This rank's shard: the manifest's when there is one (checked against rank and world),
    else the whole folder scanned and sharded here."""
    index = read_manifest(data_dir)
    if index is None:
        return shard(scan(data_dir, val_fraction, SPLIT_SEED), rank, world)
    push = "re-run `dsparse data push`"
    if (index.rank, index.world) != (rank, world):
        raise DataError(f"{data_dir} holds the shard of rank {index.rank} of {index.world} boards, but this "
                        f"board is rank {rank} of {world}: {push} after `dsparse plan`")
    if index.layout == "folder" and abs(index.val_fraction - val_fraction) > 1e-9:
        raise DataError(f"{data_dir} was pushed with --val-fraction {index.val_fraction:g}, the job asks "
                        f"{val_fraction:g}: {push} --val-fraction {val_fraction:g}")
    for path, size in index.sizes.items():
        full = os.path.join(os.path.expanduser(data_dir), path)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            raise DataError(f"{data_dir}/{path} is missing or changed since the push: {push}")
    return index


def _decoder(root: str, image_size: int):
    """path -> uint8 tensor 3×S×S: RGB, resized (aspect not kept) with bilinear filtering."""
    import torch
    from PIL import Image

    def decode(path: str):
        try:
            with Image.open(os.path.join(root, path)) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                raw = bytearray(im.tobytes())
        except Exception as exc:  # noqa: BLE001 - named, one line
            raise DataError(f"image {path} in {root} does not decode ({exc}); pass --skip-bad-images "
                            "to leave such files out") from None
        return torch.frombuffer(raw, dtype=torch.uint8).view(image_size, image_size, 3).permute(2, 0, 1)

    return decode


def _augment(x, generator):
    """Random crop after zero padding (image_size // 8 pixels a side) and a horizontal flip, per
    image: CIFAR's standard augmentation, cheap enough for a board's CPU."""
    import torch
    import torch.nn.functional as F

    n, _, s, _ = x.shape
    pad = max(1, s // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    flips = torch.rand(n, generator=generator).lt(0.5).tolist()
    out = torch.empty_like(x)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
        crop = padded[i, :, dy:dy + s, dx:dx + s]
        out[i] = crop.flip(-1) if flip else crop
    return out


def _split(root: str, items: list, image_size: int, generator=None) -> Split:
    """A split decoding its images per fetch; augmented when given a generator (training)."""
    import torch

    decode = _decoder(root, image_size)
    paths = [p for p, _ in items]
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def fetch(idx):
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        x = torch.stack([decode(paths[i]) for i in idx.tolist()]).float().div_(255.0)
        if generator is not None:
            x = _augment(x, generator)
        return (x - mean) / std, labels[idx]

    return Split(len(items), fetch)


def load_imagefolder(data_dir: str, *, rank: int = 0, world: int = 1, image_size: int = 32,
                     val_fraction: float = 0.2, skip_bad_images: bool = False, seed: int = 0) -> Dataset:
    """This rank's shard of the image folder at `data_dir` (see the module docstring); training
    batches are augmented from a generator seeded by the job seed and rank (reproducible runs)."""
    import torch

    if not data_dir:
        raise DataError("dataset imagefolder needs a data dir (--data-dir)")
    root = os.path.expanduser(str(data_dir))
    index = _local_shard(data_dir, rank, world, val_fraction)
    skipped = 0
    if skip_bad_images:
        bad = bad_images(root, index)
        index, skipped = without(index, bad), len(bad)
    if index.total_train // world and not index.train:
        raise DataError(f"{data_dir}: none of this board's {index.total_train // world} training images decode")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return Dataset("imagefolder", _split(root, index.train, image_size, generator), _split(root, index.val, image_size),
                   num_classes=len(index.classes), classes=list(index.classes), sharded=True,
                   shard_size=index.total_train // world, mean=IMAGENET_MEAN, std=IMAGENET_STD, skipped=skipped)
