"""status.json written by the worker (dsparse_cli/runtime/heartbeat.py)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from dsparse_cli.contract import HEARTBEAT_KEYS as KEYS
from dsparse_cli.runtime.heartbeat import Heartbeat

CONTRACT_KEYS = {"job", "rank", "name", "state", "epoch", "epochs", "step", "steps_per_epoch", "loss", "accuracy",
                 "samples_per_s", "peak_memory_bytes", "base_memory_bytes", "agg_ms_per_step",
                 "bytes_sent_per_step", "bytes_recv_per_step", "bytes_per_step", "dense_bytes_per_step",
                 "compression_ratio", "compress_ms_per_step", "updated_units", "pid", "time", "error"}


def read(path):
    with open(path) as fh:
        return json.load(fh)


def test_schema_has_every_contract_key_from_the_start(tmp_path):
    hb = Heartbeat(str(tmp_path / "w"), "job-1", 2, "b2", interval=60)
    doc = read(hb.path)
    assert CONTRACT_KEYS <= set(doc) and set(KEYS) == CONTRACT_KEYS
    assert doc["state"] == "starting" and doc["job"] == "job-1" and doc["rank"] == 2 and doc["name"] == "b2"
    assert doc["pid"] == os.getpid() and isinstance(doc["time"], float)
    assert hb.path == str(tmp_path / "w" / "status.json")


def test_rate_limited_but_state_changes_are_written_at_once(tmp_path):
    hb = Heartbeat(str(tmp_path), "j", 0, "b0", interval=3600)
    assert hb.update(state="running", step=1) is True      # state change
    assert hb.update(state="running", step=2) is False     # within the interval: not written
    assert read(hb.path)["step"] == 1
    hb.set_state("failed", error="boom: it broke")
    doc = read(hb.path)
    assert doc["state"] == "failed" and doc["error"] == "boom: it broke" and doc["step"] == 2
    fast = Heartbeat(str(tmp_path / "f"), "j", 0, "b0", interval=0)
    assert fast.update(step=5) is True and read(fast.path)["step"] == 5


def test_unknown_keys_and_states_are_refused(tmp_path):
    hb = Heartbeat(str(tmp_path), "j", 0, "b0")
    with pytest.raises(KeyError):
        hb.update(stpe=3)
    with pytest.raises(ValueError):
        hb.set_state("exploded")


def test_writes_are_atomic_for_a_concurrent_reader(tmp_path):
    hb = Heartbeat(str(tmp_path), "j", 0, "b0", interval=0)
    stop, bad, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                doc = read(hb.path)
                reads[0] += 1
                if set(doc) < CONTRACT_KEYS:
                    bad.append(doc)
            except ValueError as exc:  # a torn file would not parse
                bad.append(str(exc))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        hb.update(step=i, loss=float(i), updated_units=list(range(i % 50)))
    stop.set()
    t.join()
    assert not bad and reads[0] > 0
    assert [p for p in os.listdir(tmp_path) if p != "status.json"] == []  # no tmp files left
