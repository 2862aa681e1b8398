"""`dsparse data push DIR`: copy each planned board only its shard of an image folder.

The plan gives the boards and their ranks; the folder is scanned, checked and sharded here
(`runtime/imagefolder.py`, the same code the boards run) before any board is touched, so a bad
folder is exit 2 with nothing copied. Per board, in parallel: one remote command lists what its
data dir already holds (`size<TAB>path` lines), files already there with the same size are
skipped, the missing ones travel as tar files of at most `CHUNK_BYTES` (one `put` and one
extraction per chunk, not per file: the same over SFTP and over the exec-channel fallback, and
an interrupted push keeps its finished chunks), and the shard's manifest is written last. A second
push of the same folder sends no file.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dsparse_cli.errors import ConfigError, RemoteError
from dsparse_cli.inventory import Inventory, Target
from dsparse_cli.runtime import imagefolder
from dsparse_cli.runtime.imagefolder import FolderIndex

CHUNK_BYTES = 16 * 1024 * 1024   # per tar: progress steps, and small enough for a slow exec-channel put
LIST_TIMEOUT = 120.0
EXTRACT_TIMEOUT = 600.0
TAR_NAME = ".dsparse-push.tar"

# Runs on the board (stdlib only): every file under argv[1], as `size<TAB>path relative to it`.
LIST_SCRIPT = r"""
import os, sys
root = os.path.expanduser(sys.argv[1])
for here, dirs, files in os.walk(root):
    for name in files:
        path = os.path.join(here, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        sys.stdout.buffer.write(b"%d\t%s\n" % (size, os.fsencode(rel)))
"""

# Runs on the board: unpack argv[2] into argv[1], then delete it ('data' filter where tarfile has one).
EXTRACT_SCRIPT = r"""
import os, sys, tarfile
root, tar = os.path.expanduser(sys.argv[1]), os.path.expanduser(sys.argv[2])
with tarfile.open(tar) as tf:
    tf.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
os.remove(tar)
"""

Progress = Callable[[str, int, int], None]   # (board, bytes sent, bytes to send)


@dataclass
class Prepared:
    """What push checked on this machine: the folder, its bad images and every board's shard."""
    root: Path
    index: FolderIndex              # the whole folder
    bad: list                       # paths of images left out (--skip-bad-images)
    boards: list                    # (Target, its shard less the bad images, data dir), in rank order
    num_classes: int                # what the plan's model predicts


@dataclass
class BoardPush:
    """One board's push: how many files of its shard were sent or already there, bytes sent."""
    sent: int
    skipped: int
    bytes_sent: int


def board_data_dir(target: Target, dataset_dir_name: str) -> str:
    """Where a board keeps a pushed folder: its `data_dir`, else `<workdir>/data/<folder name>`."""
    return target.data_dir or f"{target.workdir.rstrip('/')}/data/{dataset_dir_name}"


def prepare(inv: Inventory, directory: str | Path, *, val_fraction: float, skip_bad_images: bool) -> Prepared:
    """Scan, check and shard `directory` for the planned boards; ConfigError (exit 2) on any problem."""
    plan = _current_plan(inv)
    root = Path(directory).expanduser()
    try:
        index = imagefolder.scan(str(directory), val_fraction, imagefolder.SPLIT_SEED)
        bad = imagefolder.bad_images(str(root), index, skip_bad_images)
    except imagefolder.DataError as exc:
        raise ConfigError(str(exc)) from None
    devices = sorted(plan["devices"], key=lambda d: d["rank"])
    name = root.resolve().name
    boards = [(inv.board(d["name"]), imagefolder.without(imagefolder.shard(index, d["rank"], len(devices)), bad))
              for d in devices]
    return Prepared(root, index, bad, [(t, s, board_data_dir(t, name)) for t, s in boards],
                    int(plan.get("num_classes", 10)))


def _current_plan(inv: Inventory) -> dict:
    from dsparse_cli.planning.planfile import load_plan

    path = inv.state_dir / "plan.json"
    if not path.exists():
        raise ConfigError(f"no plan at {path}", "run `dsparse plan` first: it gives each board its rank")
    return load_plan(path, [b.name for b in inv.boards])


def push(prepared: Prepared, *, connect_timeout: float, accept_new_host_keys: bool = False,
         on_progress: Optional[Progress] = None) -> list:
    """Push every board its shard, in parallel: `BoardResult`s of `BoardPush`, in rank order."""
    from dsparse_cli.remote import connect, fan_out

    shards = {t.name: (s, d) for t, s, d in prepared.boards}

    def one(target: Target) -> BoardPush:
        shard, data_dir = shards[target.name]
        files = len(shard.train) + len(shard.val)
        if target.local and os.path.realpath(os.path.expanduser(data_dir)) == os.path.realpath(prepared.root):
            # the folder itself: its worker shards it when it loads (a manifest here would be wrong for the others)
            return BoardPush(0, files, 0)
        with connect(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new_host_keys) as t:
            sent, sent_bytes = _push_board(t, prepared.root, shard, data_dir, on_progress)
        return BoardPush(sent, files - sent, sent_bytes)

    return fan_out([t for t, _, _ in prepared.boards], one)


def _push_board(transport, root: Path, shard: FolderIndex, data_dir: str,
                on_progress: Optional[Progress]) -> tuple[int, int]:
    """The shard's missing files, then its manifest; (files sent, bytes sent)."""
    name = transport.target.name
    there = remote_files(transport, data_dir)
    wanted = [p for p, _ in shard.train + shard.val]
    sizes = {p: (root / p).stat().st_size for p in wanted}
    missing = [p for p in wanted if there.get(p) != sizes[p]]
    total, done = sum(sizes[p] for p in missing), 0
    report = on_progress or (lambda *_: None)
    report(name, 0, total)
    with tempfile.TemporaryDirectory(prefix="dsparse-push-") as tmp:
        for chunk in _chunks(missing, sizes, CHUNK_BYTES):
            send_tar(transport, root, chunk, data_dir, Path(tmp) / TAR_NAME)
            done += sum(sizes[p] for p in chunk)
            report(name, done, total)
        manifest = imagefolder.write_manifest(tmp, shard, root=str(root))
        transport.put(manifest, f"{data_dir.rstrip('/')}/{imagefolder.MANIFEST}")
    return len(missing), total


def remote_files(transport, data_dir: str) -> dict:
    """{path relative to `data_dir`: size} of every file the board holds there (none: {})."""
    from dsparse_cli.remote.shell import sh_path

    r = transport.run(f"{sh_path(transport.target.python)} - {sh_path(data_dir)}", input=LIST_SCRIPT.encode(),
                      timeout=LIST_TIMEOUT)
    if r.rc != 0:
        raise RemoteError(f"cannot list {data_dir} on {transport.target.name}: {r.last_error()}")
    lines = (line.partition("\t") for line in r.stdout.splitlines())
    return {path: int(size) for size, _, path in lines if size.isdigit() and path}


def _chunks(paths: list, sizes: dict, limit: int) -> list:
    """`paths` in consecutive groups of at most `limit` bytes (a larger file goes alone)."""
    chunks, current, held = [], [], 0
    for p in paths:
        if current and held + sizes[p] > limit:
            chunks.append(current)
            current, held = [], 0
        current.append(p)
        held += sizes[p]
    return chunks + ([current] if current else [])


def send_tar(transport, root: Path, paths: list, data_dir: str, tar_path: Path) -> None:
    """One tar of `paths` (under their relative names), put beside them and unpacked there: one
    copy and one command, however many files (each file on its own costs round trips)."""
    from dsparse_cli.remote.shell import sh_path

    with tarfile.open(tar_path, "w") as tf:
        for p in paths:
            tf.add(root / p, arcname=p, recursive=False)
    remote_tar = f"{data_dir.rstrip('/')}/{TAR_NAME}"
    transport.put(str(tar_path), remote_tar)
    r = transport.run(f"{sh_path(transport.target.python)} - {sh_path(data_dir)} {sh_path(remote_tar)}",
                      input=EXTRACT_SCRIPT.encode(), timeout=EXTRACT_TIMEOUT)
    if r.rc != 0:
        raise RemoteError(f"cannot unpack files into {data_dir} on {transport.target.name}: {r.last_error()}")
    os.remove(tar_path)

