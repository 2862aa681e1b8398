"""Shared test helpers: run the real `dsparse` entry point in a subprocess, wait for a condition."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | str | None = None, timeout: float = 300, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m dsparse_cli ARGS` as a user would run it; returns the completed process."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsparse_cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env, input=input)


def seed_profile(profile: Path, state_dir: Path) -> Path:
    """Put a measured profile (conftest's `tiny_cnn_profile`) into `state_dir`'s cache, where `dsparse
    plan` looks for it before measuring: the plan is the same, the measuring is not repeated."""
    dest = Path(state_dir) / "profiles" / Path(profile).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(profile, dest)
    return dest


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error output must be a single 'error: ...' line with no traceback."""
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("no cluster.yaml here")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def wait_for(predicate, limit: float, step: float = 0.3):
    """Poll `predicate` until it returns something truthy or `limit` seconds pass; its last value."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def make_digits_imagefolder(root: Path | str, classes=range(10), per_class: int | None = None,
                            split: bool = False, size: int = 16) -> Path:
    """An ImageFolder tree of scikit-learn's digits as `size`×`size` grey PNGs: `root/<digit>/...`,
    or with `split` `root/train/<digit>/...` and `root/val/<digit>/...` (every fifth image, from the first, to val).
    `per_class` images of each class (all of them by default). Returns `root`."""
    from PIL import Image

    from dsparse_cli.runtime.data import digits_path, read_digits

    root = Path(root)
    x8, y = read_digits(digits_path(None))
    for c in classes:
        images = x8[y == c][:per_class]
        for i, img in enumerate(images):
            part = ("val" if i % 5 == 0 else "train") if split else ""
            folder = root / part / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (img * (255.0 / 16.0)).round().byte().numpy()
            Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST).save(folder / f"{c}_{i:04d}.png")
    return root
