"""fan_out: parallel per-board calls whose failures are results, in target order."""

from __future__ import annotations

import threading

import pytest

from dsparse_cli.errors import ConfigError, RemoteError
from dsparse_cli.inventory import Target
from dsparse_cli.remote import BoardResult, fan_out

pytestmark = pytest.mark.timeout(30)


def _targets(n: int) -> list[Target]:
    return [Target(name=f"b{i}", host="127.0.0.1", port=22, user=None, identity_files=[],
                   proxy_command=None, python="python3", workdir="/tmp", local=True,
                   memory_limit=None, iface=None, kind="auto") for i in range(n)]


def test_results_keep_target_order_even_when_completion_order_differs():
    targets = _targets(4)
    done = {t.name: threading.Event() for t in targets}
    finished = []

    def fn(t):
        # Each board waits for the next one to finish first: completion order is b3..b0.
        idx = int(t.name[1:])
        if idx + 1 < len(targets):
            assert done[f"b{idx + 1}"].wait(10)
        finished.append(t.name)
        done[t.name].set()
        return idx * 10

    results = fan_out(targets, fn)
    assert finished == ["b3", "b2", "b1", "b0"]
    assert [r.name for r in results] == ["b0", "b1", "b2", "b3"]
    assert [r.value for r in results] == [0, 10, 20, 30]
    assert all(r.ok and r.error is None for r in results)


def test_a_failing_board_does_not_stop_the_others():
    calls = []

    def fn(t):
        calls.append(t.name)
        if t.name == "b1":
            raise RemoteError("connection refused on 127.0.0.1:22", hint="is sshd running?")
        if t.name == "b2":
            raise ValueError("bad json")
        if t.name == "b3":
            raise ConfigError("identity file k does not exist")
        return t.name.upper()

    results = fan_out(_targets(5), fn)
    assert sorted(calls) == ["b0", "b1", "b2", "b3", "b4"]
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert results[0].value == "B0" and results[4].value == "B4"
    assert results[1].error == "connection refused on 127.0.0.1:22 (is sshd running?)"
    assert results[2].error == "ValueError: bad json"
    assert results[3].error == "identity file k does not exist"
    assert results[1].value is None
    assert isinstance(results[2].exception, ValueError)


def test_max_workers_bounds_concurrency():
    lock = threading.Lock()
    running, peak = 0, 0
    barrier_hit = threading.Event()

    def fn(t):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                barrier_hit.set()
        barrier_hit.wait(5)  # let two overlap, so the bound (not luck) is what caps it
        with lock:
            running -= 1
        return True

    results = fan_out(_targets(6), fn, max_workers=2)
    assert all(r.ok for r in results)
    assert peak == 2


def test_runs_in_parallel():
    # All four must be inside fn at once for any of them to pass the barrier.
    barrier = threading.Barrier(4, timeout=10)
    results = fan_out(_targets(4), lambda t: barrier.wait() >= 0)
    assert [r.ok for r in results] == [True] * 4


def test_empty_target_list():
    assert fan_out([], lambda t: 1) == []


def test_board_result_shape():
    r = BoardResult("b0", True, 3)
    assert (r.name, r.ok, r.value, r.error) == ("b0", True, 3, None)
