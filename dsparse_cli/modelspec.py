"""Model spec strings, parsed and checked without torch (shipped to boards; standard library only).

A spec is one of
* a plain name: a hand-split model of `contract.MODELS` or a torchvision classification model
  (checked where torchvision is at hand, `planning/profile.check_args`);
* `path/to/file.py:factory`: a user's model file (the launcher ships it into each run dir);
* `package.module:factory`: an importable module (installed on every board by the user).

`check` catches what can be caught before torch loads — a missing file, a syntax error, a factory
the file never defines, a module that cannot be found — each as a one-line `ValueError`.
`file_digest` lets a cache key follow edits of the file.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os

NAME, FILE, MODULE = "name", "file", "module"
_FORMS = "use NAME, FILE.py:factory or package.module:factory"


def parse(spec: str) -> tuple[str, str, str | None]:
    """-> (kind, location, factory): ("name", spec, None), ("file", path, factory) or
    ("module", dotted name, factory). A malformed spec is a `ValueError`."""
    if ":" not in spec:
        return NAME, spec, None
    location, _, factory = spec.rpartition(":")   # the last colon: a Windows path keeps its drive
    if not factory.isidentifier():
        raise ValueError(f"model spec {spec!r} names no factory function after ':' ({_FORMS})")
    if location.endswith(".py"):
        return FILE, location, factory
    if location and all(part.isidentifier() for part in location.split(".")):
        return MODULE, location, factory
    raise ValueError(f"model spec {spec!r}: {location!r} is neither a .py file nor a module name ({_FORMS})")


def check(spec: str) -> None:
    """Raise a one-line `ValueError` for a file or module spec that cannot work; plain names pass."""
    kind, location, factory = parse(spec)
    if kind == FILE:
        _check_file(location, factory)
    elif kind == MODULE:
        try:
            found = importlib.util.find_spec(location)
        except Exception:  # noqa: BLE001 - a parent package that fails to import: the module is not usable
            found = None
        if found is None:
            raise ValueError(f"model module {location} not found (is it installed for this Python?)")


def _check_file(location: str, factory: str) -> None:
    path = os.path.expanduser(location)
    if not os.path.isfile(path):
        raise ValueError(f"model file {location} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        compile(source, location, "exec")
    except SyntaxError as exc:
        raise ValueError(f"model file {location} line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"model file {location} cannot be read: {exc}") from None
    if factory not in top_level_names(ast.parse(source)):
        raise ValueError(f"model file {location} defines no {factory!r} at top level")


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines at import time: def, class, assignment, import (also inside a
    top-level if/try, e.g. an optional-dependency fallback)."""
    names: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            body += node.body + node.orelse + getattr(node, "finalbody", [])
            body += [n for h in getattr(node, "handlers", []) for n in h.body]
    return names


def file_digest(spec: str) -> str | None:
    """sha256 of a file spec's file (None for other specs or a missing file)."""
    kind, location, _ = parse(spec)
    path = os.path.expanduser(location)
    if kind != FILE or not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def torchvision_names() -> set[str] | None:
    """torchvision's classification model names, read from its source without importing it (the
    functions decorated `@register_model()` in `torchvision/models/*.py`, which is what
    `list_models(module=torchvision.models)` lists); None when torchvision is not found there."""
    found = importlib.util.find_spec("torchvision")
    folder = os.path.join(list(found.submodule_search_locations)[0], "models") if found else None
    if not folder or not os.path.isdir(folder):
        return None
    names: set[str] = set()
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".py"):
            with open(os.path.join(folder, entry), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            names.update(node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                         and any(_is_register(d) for d in node.decorator_list))
    return names or None


def _is_register(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return getattr(target, "id", getattr(target, "attr", None)) == "register_model"


def names_a_weights_file(source: str) -> bool:
    """`--weights` names a file when one exists there or when it is no identifier; torchvision
    weights names are identifiers (DEFAULT, IMAGENET1K_V1)."""
    return os.path.exists(os.path.expanduser(source)) or not source.replace("_", "a").isalnum()
