"""bench/compression.py end to end on a tiny config: real `dsparse plan` and `dsparse train`
(torchrun workers on 2 local boards, tiny_cnn, 3 steps) for every method; the JSON schema and the
byte figures the boards report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import seed_profile

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "compression.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_cnn_profile):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results" / "compression.json"
    seed_profile(tiny_cnn_profile, tmp / "work" / ".dsparse")   # its `dsparse plan` finds the session's profile
    res = subprocess.run([sys.executable, str(BENCH), "--boards", "2", "--model", "tiny_cnn", "--batch-size", "16",
                          "--epochs", "1", "--max-steps", "3", "--workdir", str(tmp / "work"), "--out", str(out),
                          "--json"], capture_output=True, text=True, timeout=840, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout), out, tmp / "work"


def test_json_schema_has_every_method(bench_run):
    doc, _, _ = bench_run
    assert [m["name"] for m in doc["methods"]] == ["none", "fp16", "topk", "pbgc"]
    assert doc["failed"] == []
    for m in doc["methods"]:
        assert {"name", "compression_ratio", "final_accuracy", "compress_ms_per_step"} <= set(m)
        assert isinstance(m["compression_ratio"], float) and m["compression_ratio"] >= 1.0
        assert 0.0 <= m["final_accuracy"] <= 1.0
        assert m["compress_ms_per_step"] >= 0.0
        assert m["steps"] == 3 and m["model"] == "tiny_cnn" and m["seed"] == 0


def test_ratios_come_from_the_bytes_the_boards_sent(bench_run):
    doc, _, _ = bench_run
    by = {m["name"]: m for m in doc["methods"]}
    assert by["none"]["compression_ratio"] == pytest.approx(1.0)
    assert by["fp16"]["compression_ratio"] == pytest.approx(2.0)  # half precision, nothing else
    assert by["pbgc"]["compression_ratio"] > 1.0
    for m in doc["methods"]:
        assert m["compression_ratio"] == pytest.approx(m["dense_bytes_per_step"] / m["sent_bytes_per_step"])
        assert m["dense_bytes_per_step"] == pytest.approx(by["none"]["dense_bytes_per_step"])  # same buckets
    # only the sparse methods pay for encoding; `none` reports no compression time
    assert by["none"]["compress_ms_per_step"] == 0.0
    assert by["pbgc"]["compress_ms_per_step"] > 0.0


def test_same_config_for_every_method_and_results_written(bench_run):
    doc, out, work = bench_run
    saved = json.loads(out.read_text())
    assert saved["methods"] == doc["methods"]
    jobs = {m["job"] for m in doc["methods"]}
    assert len(jobs) == 4  # one real job per method
    for m in doc["methods"]:
        for board in ("b0", "b1"):
            summary = json.loads((work / ".dsparse" / "boards" / board / "runs" / m["job"] / "summary.json").read_text())
            assert summary["compression"]["name"] == m["name"]
            assert summary["steps"] == 3
            status = json.loads((work / ".dsparse" / "boards" / board / "runs" / m["job"] / "status.json").read_text())
            assert status["state"] == "finished"
            for key in ("dense_bytes_per_step", "bytes_sent_per_step", "compression_ratio", "compress_ms_per_step"):
                assert status[key] is not None, key
    assert "pbgc_ratio" in doc["verdict"] and "pbgc_accuracy_gap_points" in doc["verdict"]
