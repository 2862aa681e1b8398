"""`DIR/testbed.json`: what `up` made, written before each thing is made so `down` finds it all."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import TestbedError

NAME = "testbed.json"


def testbed_id(directory: Path, salt: int = 0) -> str:
    """4 hex digits from the absolute dir (`salt` picks another when those names are taken)."""
    key = f"{directory.resolve()}#{salt}" if salt else str(directory.resolve())
    return hashlib.sha1(key.encode()).hexdigest()[:4]


def path(directory: Path) -> Path:
    return directory / NAME


def load(directory: Path) -> dict | None:
    p = path(directory)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TestbedError(f"cannot read {p}: {e}; remove it only after checking `ip netns list`")


def save(directory: Path, rec: dict) -> None:
    p = path(directory)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, p)


def remove(directory: Path) -> None:
    path(directory).unlink(missing_ok=True)
