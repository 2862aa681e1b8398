"""What goes to a board besides the job's own files: the runtime package the worker imports (shipped
to SSH boards as one tar, and only when the board does not have this very version) and the
bundled digits data."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import dsparse_cli
from dsparse_cli.errors import ConfigError, JobError
from dsparse_cli.remote.base import Transport


def package_root() -> Path:
    """The directory holding the `dsparse_cli` package (what PYTHONPATH must point at)."""
    return Path(dsparse_cli.__file__).resolve().parent.parent


def digits_file() -> Path:
    """scikit-learn's bundled digits data, found without importing sklearn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if not path or not path.exists():
        raise ConfigError("scikit-learn's digits data was not found on this machine",
                          "pip install scikit-learn, or use --dataset synthetic")
    return path


def runtime_files() -> list[tuple[Path, str]]:
    """(local file, path relative to the shipped package root) for the runtime package."""
    root = package_root()
    files = [root / "dsparse_cli" / f for f in ("__init__.py", "contract.py", "modelspec.py",
                                                 "probing/__init__.py", "probing/board_script.py")]
    files += sorted((root / "dsparse_cli" / "runtime").rglob("*.py"))
    return [(f, str(f.relative_to(root))) for f in files]


@lru_cache(maxsize=1)
def runtime_digest() -> str:
    """Names the runtime's exact contents, so a board that has it already is not sent it again."""
    h = hashlib.sha256()
    for local_file, rel in runtime_files():
        h.update(rel.encode() + b"\0" + local_file.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ship_runtime(transport: Transport, pkg: str, staging: Path) -> None:
    """The runtime package, in one tar, unless the board has this very one (its stamp file)."""
    from dsparse_cli.jobs.datapush import send_tar
    from dsparse_cli.remote.shell import sh_path

    stamp = f"{pkg}/.runtime-{runtime_digest()}"
    if transport.run(f"test -f {sh_path(stamp)}", timeout=30).rc == 0:
        return
    send_tar(transport, package_root(), [rel for _, rel in runtime_files()], pkg, staging / "runtime.tar")
    if transport.run(f"rm -f {sh_path(pkg)}/.runtime-*; touch {sh_path(stamp)}", timeout=30).rc != 0:
        raise JobError(f"cannot write {stamp} on {transport.target.name}")
