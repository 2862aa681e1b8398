"""`make bench-smoke`: bench/edge.py --smoke end to end (torchrun + DDP, DDP + PowerSGD, and
`dsparse plan`/`train` on 2 local boards, tiny_cnn, 4 steps, fine-tuned from weights pretrained
on digits 0-4); every method reports figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import seed_profile

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "edge.py"
METHODS = ["ddp", "ddp_powersgd", "dsparse_memory", "dsparse_time", "dsparse_time_pbgc", "dsparse_frozen"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_cnn_profile):
    tmp = tmp_path_factory.mktemp("bench-edge")
    out = tmp / "results" / "edge.json"
    seed_profile(tiny_cnn_profile, tmp / "work" / ".dsparse")   # the smoke plans tiny_cnn at batch 16 too
    res = subprocess.run([sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp / "work"), "--out", str(out),
                          "--json"], capture_output=True, text=True, timeout=540, cwd=tmp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(res.stdout), out, tmp / "work"


def test_every_method_ran_with_a_finite_step_time_and_an_accuracy(smoke):
    doc, _, _ = smoke
    assert doc["failed"] == []
    assert [m["name"] for m in doc["methods"]] == METHODS
    for m in doc["methods"]:
        assert math.isfinite(m["step_ms"]) and m["step_ms"] > 0, m["name"]
        assert 0.0 <= m["final_accuracy"] <= 1.0, m["name"]
        assert m["steps"] == 4 and len(m["boards"]) == 2, m["name"]
        assert all(b["bytes_sent_per_step"] > 0 for b in m["boards"]), m["name"]  # 2 boards: all talk


def test_ddp_bytes_are_the_ring_model_and_powersgd_sends_fewer(smoke):
    doc, _, _ = smoke
    by = {m["name"]: m for m in doc["methods"]}
    n = doc["config"]["boards"]
    for b in by["ddp"]["boards"]:
        assert b["bytes_sent_per_step"] == pytest.approx(2 * (n - 1) / n * b["gradient_bytes"])
    assert by["ddp_powersgd"]["max_bytes_sent_per_step"] < by["ddp"]["max_bytes_sent_per_step"]
    # past its 2 warm-up steps PowerSGD sends less still
    assert by["ddp_powersgd"]["boards"][0]["last_step_bytes_sent"] < by["ddp_powersgd"]["max_bytes_sent_per_step"]


def test_dsparse_reports_aggregation_time_and_results_are_written(smoke):
    doc, out, _ = smoke
    for m in doc["methods"]:
        assert m["agg_ms_per_step"] >= 0 and m["peak_process_bytes"] > 0, m["name"]
        # every method's training memory by the same meter: private memory above the first step's start
        assert all(0 < b["peak_training_bytes"] < b["peak_process_bytes"] for b in m["boards"]), m["name"]
        if m["name"].startswith("dsparse"):
            assert 0 <= m["agg_ms_median"] <= m["agg_ms_p90"]
        else:   # DDP's exposed aggregation: its step less the step without the all-reduce
            assert all(b["agg_ms_per_step"] <= b["step_ms"] for b in m["boards"]), m["name"]
    assert json.loads(out.read_text())["methods"] == doc["methods"]
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)
    assert "| agg / floor |" in table and "| peak training |" in table and "| exposed wire ms (/ model) |" in table
    by = {m["name"]: m for m in doc["methods"]}
    for name in ("ddp", "dsparse_memory"):   # the step less the slowest board's compute, next to the model
        m = by[name]
        assert m["exposed_wire_ms"] == pytest.approx(
            max(b["step_ms"] for b in m["boards"]) - max(b["step_ms"] - b["agg_ms_per_step"] for b in m["boards"]))
        assert f"| {m['exposed_wire_ms']:.0f} (" in table and "x) |" in table
    # the time plan's compute model next to each board's measured compute (step less aggregation)
    assert "| compute ms (/ model) |" in table
    predicted = doc["plans"]["time"]["predicted_compute_s"]
    assert sorted(predicted) == ["b0", "b1"] and all(s > 0 for s in predicted.values())


def test_every_method_starts_from_the_pretrained_weights(smoke):
    doc, _, work = smoke
    assert doc["config"]["finetune"] and (work / "pretrained.pt").exists()
    by = {m["name"]: m for m in doc["methods"]}
    for name in ("ddp", "ddp_powersgd"):   # a 5-class head, fine-tuned on ten digits
        assert all("pretrained.pt (head re-initialised for 10 classes)" in b["weights"] for b in by[name]["boards"])
    logs = [p.read_text() for p in (work / ".dsparse" / "boards").glob("*/runs/*/worker.log*")]
    assert len(logs) == 2 * 4 and all("pretrained.pt (head re-initialised for 10 classes)" in t for t in logs)


def test_accuracy_over_training_time_and_time_to_the_target(smoke):
    doc, out, _ = smoke
    by = {m["name"]: m for m in doc["methods"]}
    assert doc["target_accuracy"] == pytest.approx(by["ddp"]["final_accuracy"] - 0.01)
    for m in doc["methods"]:
        h = m["history"]   # 4 steps are less than an epoch: one evaluation, at the last step
        assert [x["global_step"] for x in h] == [4], m["name"]
        assert h[-1]["accuracy"] == pytest.approx(m["final_accuracy"]), m["name"]
        assert 0 < h[-1]["train_s"] <= max(b["train_s"] for b in m["boards"]) + 1e-3, m["name"]
        reached = m["final_accuracy"] >= doc["target_accuracy"]
        assert m["time_to_target_s"] == (h[-1]["train_s"] if reached else None), m["name"]
    assert by["ddp"]["time_to_target_s"] is not None
    assert "training s to target" in out.with_suffix(".md").read_text()


def test_repeats_report_the_median_run_whole_and_every_runs_step():
    import importlib.util

    spec = importlib.util.spec_from_file_location("edge", BENCH)
    edge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edge)
    runs = [{"name": "ddp", "step_ms": ms, "final_accuracy": acc, "history": [{"train_s": ms / 100, "accuracy": acc}]}
            for ms, acc in ((3000, 0.9), (2500, 0.8), (2700, 0.7))]
    row = edge.median_run(runs)
    assert row["step_ms"] == 2700 and row["final_accuracy"] == 0.7 and row["step_ms_runs"] == [3000, 2500, 2700]
    assert [edge.time_to(0.75, h) for h in row["history_runs"]] == [30, 25, None]   # every run's, for main
    assert edge.median_run(runs[:2])["step_ms"] == 2500   # an even count: the lower of the two middle runs
    assert edge._step(row) == "2700.0 (2500-3000, 3 runs)" and edge._step(runs[0]) == "3000.0"
    with pytest.raises(SystemExit):
        edge.parse_args(["--repeat", "0"])
