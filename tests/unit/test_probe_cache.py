"""The probe cache merges (issue #16): a board that fails a probe keeps its last good result,
marked stale with the new error and its age, and `plan` budgets on it with a warning naming it."""

from __future__ import annotations

import json
import time

from dsparse_cli.inventory import load_inventory
from dsparse_cli.planning.make import _budget_sources
from dsparse_cli.probing.collect import read_cache, write_cache
from dsparse_cli.probing.parse import DeviceInfo

GiB = 1024**3


def two_boards(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("name: lab\nboards:\n  - {name: a, local: true}\n  - {name: b, local: true}\n")
    return load_inventory(path)


def good(name: str, gib: int) -> DeviceInfo:
    return DeviceInfo(name=name, usable_memory_bytes=gib * GiB, torch="2.3.0", kind="x86")


def test_a_failed_probe_keeps_the_last_good_result_marked_stale(tmp_path, capsys):
    inv = two_boards(tmp_path)
    write_cache(inv, [good("a", 4), good("b", 2)])
    first = read_cache(inv).answered()["b"].probed_at
    time.sleep(0.01)
    write_cache(inv, [good("a", 3), DeviceInfo.failed("b", "connection refused on 10.0.0.2:22")])

    boards = {b["name"]: b for b in json.loads((inv.state_dir / "probe.json").read_text())["boards"]}
    assert boards["a"]["usable_memory_bytes"] == 3 * GiB and boards["a"]["stale_error"] is None
    assert boards["b"]["ok"] is True and boards["b"]["usable_memory_bytes"] == 2 * GiB
    assert boards["b"]["stale_error"] == "connection refused on 10.0.0.2:22" and boards["b"]["probed_at"] == first

    facts = _budget_sources(inv)
    assert facts["b"]["usable_memory_bytes"] == 2 * GiB and facts["b"]["source"] == "probe"
    err = capsys.readouterr().err
    assert "board b did not answer the last probe (connection refused on 10.0.0.2:22)" in err
    assert "planning with its result from 0 min ago" in err and "board a" not in err


def test_a_board_that_never_answered_stays_failed_and_an_answer_clears_stale(tmp_path):
    inv = two_boards(tmp_path)
    write_cache(inv, [good("a", 4), DeviceInfo.failed("b", "timed out")])
    assert set(read_cache(inv).answered()) == {"a"}
    write_cache(inv, [DeviceInfo.failed("a", "timed out"), good("b", 2)])
    write_cache(inv, [good("a", 5), good("b", 2)])
    answered = read_cache(inv).answered()
    assert answered["a"].usable_memory_bytes == 5 * GiB and answered["a"].stale_error is None
