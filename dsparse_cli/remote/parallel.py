"""Run one function per board in parallel; a failing board is a result, not an abort."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generic, Iterable, TypeVar

from dsparse_cli.errors import DsparseError

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

T = TypeVar("T")


@dataclass
class BoardResult(Generic[T]):
    name: str
    ok: bool
    value: T | None = None
    error: str | None = None
    # The original exception, for `-v` tracebacks; not part of any output format.
    exception: BaseException | None = field(default=None, repr=False, compare=False)


def fan_out(targets: Iterable["Target"], fn: Callable[["Target"], T], *,
            max_workers: int = 16) -> list[BoardResult[T]]:
    """``fn(target)`` for every target, concurrently; results in target order."""
    targets = list(targets)
    if not targets:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(targets))),
                              thread_name_prefix="dsparse-board")
    try:
        results = results_of([pool.submit(_one, fn, t) for t in targets])
    except BaseException:
        # Ctrl-C: don't start the boards still queued; running calls end on their timeouts.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def results_of(futures: list[Future[T]]) -> list[T]:
    """The futures' results in order. The wait wakes up every so often: Linux hands a Ctrl-C to any
    thread, and the main thread only sees it once it runs again (an SSH banner can take a minute)."""
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=0.2)
    return [f.result() for f in futures]


def _one(fn: Callable[["Target"], T], target: "Target") -> BoardResult[T]:
    try:
        return BoardResult(target.name, True, fn(target))
    except DsparseError as e:
        return BoardResult(target.name, False, None, e.one_line(), e)
    except Exception as e:  # noqa: BLE001 - one board's bug must not hide the others' results
        return BoardResult(target.name, False, None, f"{type(e).__name__}: {e}", e)
