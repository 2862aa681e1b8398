"""`dsparse plan` and `dsparse train` on local boards through the real entry point: contracts,
bad inputs, a real run, a killed worker and --resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import one_line_error, run_cli, seed_profile, wait_for

pytestmark = pytest.mark.slow

# Local boards sized for tiny_cnn at batch 16: each holds a worker (a 0.7-1.0 GiB base with the
# CUDA torch build, depending on the environment) and its launcher (torchrun's agent: ~0.3 GiB).
CLUSTER = """name: local2
master: {{addr: 127.0.0.1, port: {port}}}
boards:
  - {{name: a, local: true, memory_limit: 1900MiB}}
  - {{name: b, local: true, memory_limit: 1800MiB}}
"""
PLAN = ("plan", "--model", "tiny_cnn", "--batch-size", "16")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_cnn_profile) -> Path:
    """A directory with cluster.yaml and a plan (from the profile measured once for the session)."""
    d = tmp_path_factory.mktemp("local2")
    (d / "cluster.yaml").write_text(CLUSTER.format(port=free_port()))
    seed_profile(tiny_cnn_profile, d / ".dsparse")
    proc = run_cli(*PLAN, "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["profile_key"] == tiny_cnn_profile.stem, \
        "the plan measured a profile of its own: conftest.TINY_CNN_PROFILE no longer matches `dsparse plan`"
    return d


def fresh_copy(planned: Path, tmp_path: Path) -> Path:
    """A private copy (own job records and run dirs) that reuses the measured profile."""
    d = tmp_path / "c"
    shutil.copytree(planned, d)
    (d / "cluster.yaml").write_text(CLUSTER.format(port=free_port()))
    return d


def test_plan_json_contract_and_determinism(planned):
    plan_file = planned / ".dsparse" / "plan.json"
    first = plan_file.read_bytes()
    proc = run_cli(*PLAN, "--json", cwd=planned)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert plan_file.read_bytes() == first  # same inputs, same plan, byte for byte
    for key in ("version", "model", "batch_size", "units", "devices", "groups"):
        assert key in doc
    assert {"index", "name", "param_bytes"} <= set(doc["units"][0])
    for dev in doc["devices"]:
        assert {"name", "rank", "budget_bytes", "predicted_peak_bytes", "full_update_peak_bytes", "units"} <= set(dev)
        assert dev["predicted_peak_bytes"] <= dev["budget_bytes"]
    covered = set().union(*(d["units"] for d in doc["devices"]))
    assert covered == {u["index"] for u in doc["units"]}
    for g in doc["groups"]:
        assert g["op"] in ("allreduce", "broadcast") and g["root"] in g["ranks"] and g["bytes_per_step"] >= 0


def test_the_default_objective_is_time_once_every_link_is_known(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    assert json.loads((d / ".dsparse" / "plan.json").read_text())["objective"] == "memory"   # no links given
    (d / "cluster.yaml").write_text(CLUSTER.format(port=free_port()).replace(
        "boards:", "defaults: {link: 100mbit}\nboards:"))
    proc = run_cli(*PLAN, "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["objective"] == "time" and [dev["link_bytes_per_s"] for dev in doc["devices"]] == [12.5e6] * 2
    # the time objective weighs compute too: every board's measured here, the step is the slowest + the wire
    compute = [dev["predicted_compute_s_per_step"] for dev in doc["devices"]]
    assert all(c > 0 for c in compute)
    assert doc["predicted_step_s"] == pytest.approx(max(compute) + doc["predicted_agg_s_per_step"])
    proc = run_cli(*PLAN, cwd=d)   # the cached timings, rendered
    assert proc.returncode == 0 and "predicted step" in proc.stdout, proc.stderr


def test_plan_verify_through_cli(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    proc = run_cli(*PLAN, "--verify", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    for dev in json.loads(proc.stdout)["devices"]:
        assert dev["measured_peak_bytes"] > dev["measured_training_bytes"] > 0
        assert abs(dev["measured_training_bytes"] / dev["predicted_training_bytes"] - 1) <= 0.10


@pytest.mark.parametrize("args,needle", [
    (("--model", "nope"), "unknown model 'nope'"),
    (("--batch-size", "0"), "batch size 0"),
    (("--optimizer", "bogus"), "unknown optimizer"),
    (("--headroom", "1.5"), "headroom"),
    (("--sync-every", "0"), "sync-every"),
])
def test_plan_bad_options(planned, tmp_path, args, needle):
    proc = run_cli("plan", "--model", "tiny_cnn", *args, cwd=fresh_copy(planned, tmp_path))
    assert proc.returncode == 2
    assert needle in one_line_error(proc)


def test_plan_budget_too_small_names_board(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    (d / "cluster.yaml").write_text(CLUSTER.format(port=free_port()).replace("1800MiB", "400MiB"))
    proc = run_cli(*PLAN, cwd=d)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "board b" in line and "needs at least" in line and "--exclude-small" in line
    proc = run_cli(*PLAN, "--exclude-small", "--json", cwd=d)
    assert proc.returncode == 0
    assert [x["name"] for x in json.loads(proc.stdout)["devices"]] == ["a"]
    assert "left out" in proc.stderr


def test_plan_without_probe_or_limit(tmp_path):
    (tmp_path / "cluster.yaml").write_text("boards:\n  - {name: x, local: true}\n")
    proc = run_cli(*PLAN, cwd=tmp_path)
    assert proc.returncode == 2
    assert "no probe result and no memory_limit for board x" in one_line_error(proc)


def test_stale_and_mismatched_plans_refused(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    plan_file = d / ".dsparse" / "plan.json"
    doc = json.loads(plan_file.read_text())
    plan_file.write_text(json.dumps({**doc, "version": 0}))
    proc = run_cli("train", "--max-steps", "1", cwd=d)
    assert proc.returncode == 2 and "version 0" in one_line_error(proc)
    plan_file.write_text(json.dumps(doc))
    with open(d / "cluster.yaml", "a") as f:
        f.write("  - {name: c, local: true, memory_limit: 1800MiB}\n")
    proc = run_cli("train", "--max-steps", "1", cwd=d)
    assert proc.returncode == 2 and "re-run dsparse plan" in one_line_error(proc)


@pytest.mark.parametrize("args,needle", [
    (("--dataset", "imagenet"), "unknown dataset 'imagenet'"),
    (("--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"), "cifar10 needs --data-dir"),
    (("--batch-size", "64"), "larger than the plan's 16"),
    (("--optimizer", "adam"), "made for optimizer sgd-momentum"),
    (("--compression", "zip"), "unknown compression"),
])
def test_train_bad_inputs(planned, tmp_path, args, needle):
    d = fresh_copy(planned, tmp_path)
    proc = run_cli("train", "--max-steps", "1", *args, cwd=d)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)
    assert not (d / ".dsparse" / "jobs" / "latest").exists()  # nothing was started


def test_train_port_in_use(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    port = free_port()
    (d / "cluster.yaml").write_text(CLUSTER.format(port=port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        proc = run_cli("train", "--max-steps", "1", cwd=d)
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in one_line_error(proc)


def test_train_then_status(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    proc = run_cli("train", "--dataset", "digits", "--max-steps", "3", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["state"] == "finished" and summary["accuracy"] is not None
    for b in summary["boards"]:
        assert b["state"] == "finished" and b["peak_memory_bytes"] > 0
        assert b["full_update_training_bytes"] >= b["predicted_training_bytes"] > 0
    proc = run_cli("status", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["job"] == summary["job"] and status["state"] == "finished"
    for b in status["boards"]:
        for key in ("name", "rank", "state", "epoch", "step", "loss", "accuracy", "samples_per_s",
                    "peak_memory_bytes", "agg_ms_per_step", "bytes_per_step", "heartbeat_age_s", "error"):
            assert key in b
        assert b["state"] == "finished" and b["bytes_per_step"] > 0
    proc = run_cli("logs", "a", "-n", "10", cwd=d)
    assert proc.returncode == 0 and "accuracy" in proc.stdout
    # tiny_cnn has BatchNorm: its statistics were recomputed from the final weights before the score
    assert "BatchNorm statistics of the trained units recomputed over 8 batches" in proc.stdout


def test_launcher_torchrun_keeps_the_old_way_and_needs_its_own_plan(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    (d / "cluster.yaml").write_text("launcher: torchrun\n" + (d / "cluster.yaml").read_text())
    proc = run_cli("train", "--dataset", "digits", "--max-steps", "2", cwd=d)
    assert proc.returncode == 2 and "re-run `dsparse plan`" in one_line_error(proc)   # budgets hold the launcher
    doc = json.loads(run_cli(*PLAN, "--json", cwd=d).stdout)
    assert doc["launcher"] == "torchrun" and doc["launcher_bytes"] > 50 * 2**20   # its agent imports torch
    proc = run_cli("train", "--dataset", "digits", "--max-steps", "2", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = next((d / ".dsparse" / "boards" / "a" / "runs").glob("*/worker.log")).read_text()
    assert "[dsparse launcher]" not in log and json.loads(proc.stdout)["state"] == "finished"


def test_preflight_names_every_problem_in_one_table_and_starts_nothing(planned, tmp_path):
    d = fresh_copy(planned, tmp_path)
    text = (d / "cluster.yaml").read_text()
    (d / "cluster.yaml").write_text(text.replace("{name: b, local: true,", "{name: b, local: true, iface: nosuch0,"))
    proc = run_cli("train", "--dataset", "digits", "--max-steps", "2", cwd=d)
    assert proc.returncode == 1
    assert one_line_error(proc) == ("error: board b has no interface nosuch0 with an IPv4 address (No such device) "
                                    "(fix iface: in cluster.yaml); nothing was started")
    table = proc.stdout
    assert "preflight" in table and "nosuch0: absent" in table and "lo -> 127.0.0.1" in table   # a passed, b not
    assert not (d / ".dsparse" / "jobs").exists() or not list((d / ".dsparse" / "jobs").glob("*.json"))


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _job(d: Path) -> dict:
    jobs = d / ".dsparse" / "jobs"
    return json.loads((jobs / f"{(jobs / 'latest').read_text().strip()}.json").read_text())


def _heartbeat(job: dict, name: str) -> dict | None:
    run = next(b for b in job["boards"] if b["name"] == name)
    try:
        return json.loads(Path(run["run_dir"], "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


# SIGKILL, and SIGSTOP on SSH boards, are rows of the fault suite (tests/e2e/test_faults.py, as root);
# this one runs without root.
@pytest.mark.parametrize("sig,named", [(signal.SIGSTOP, "board b failed: worker process is stopped")])
def test_killed_or_hung_worker_stops_job_then_resume_finishes(planned, tmp_path, sig, named):
    d = fresh_copy(planned, tmp_path)
    args = ("--dataset", "synthetic", "--epochs", "3", "--checkpoint-every", "2", "--collective-timeout", "60")
    env = {**os.environ, "COLUMNS": "200"}
    train = subprocess.Popen([sys.executable, "-m", "dsparse_cli", "train", *args], cwd=d, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.5)
            if (d / ".dsparse" / "jobs" / "latest").exists():
                hb = _heartbeat(_job(d), "b")
                if hb and (hb.get("global_step") or 0) >= 3:
                    victim = hb["pid"]
        assert victim, "the job never got to step 3"
        os.kill(victim, sig)
        killed_at = time.monotonic()
        out, err = train.communicate(timeout=120)
        reported_after = time.monotonic() - killed_at
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 1, err[-3000:]
    assert reported_after < 30, f"failure reported after {reported_after:.1f}s"
    assert named in err
    job = _job(d)
    assert job["state"] == "failed" and job["failed_board"] == "b"
    pids = [p for b in job["boards"] for p in (b["pid"], b.get("worker_pid")) if p]
    assert len(pids) == 4 and not [p for p in pids if _pid_alive(p)]

    proc = run_cli("train", *args, "--resume", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["job"] == job["id"] and summary["state"] == "finished"
    hb = _heartbeat(_job(d), "a")
    assert hb["global_step"] == hb["total_steps"]


def test_stop_from_another_terminal_is_not_a_failure(planned, tmp_path):
    """Also `allocator: fast` on board b: its figures carry the profile's measured extra (the
    measurement itself is test_verify's; a known figure is seeded here), and its live worker runs
    with glibc's defaults while board a's runs with the lean settings it was profiled with."""
    d = fresh_copy(planned, tmp_path)
    extra = _seed_fast_allocator_bytes(d, 3 << 20)
    (d / "cluster.yaml").write_text((d / "cluster.yaml").read_text().replace(
        "memory_limit: 1800MiB}", "memory_limit: 1800MiB, allocator: fast}"))
    a, b = json.loads(run_cli(*PLAN, "--json", cwd=d).stdout)["devices"]
    assert (a["allocator"], b["allocator"]) == ("lean", "fast")
    assert b["predicted_breakdown"]["allocator"] == extra and "allocator" not in a["predicted_breakdown"]
    assert b["predicted_training_bytes"] == a["predicted_training_bytes"] + extra
    train = subprocess.Popen([sys.executable, "-m", "dsparse_cli", "train", "--dataset", "synthetic", "--epochs", "3"],
                             cwd=d, env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        stepped = wait_for(lambda: (d / ".dsparse" / "jobs" / "latest").exists()
                           and all((_heartbeat(_job(d), n) or {}).get("global_step") for n in "ab"), 240)
        assert stepped, "the job never stepped"
        env = {n: Path(f"/proc/{_heartbeat(_job(d), n)['pid']}/environ").read_bytes().split(b"\0") for n in "ab"}
        assert b"MALLOC_MMAP_THRESHOLD_=4096" in env["a"]                          # lean: as profiled
        assert not any(v.startswith(b"MALLOC_") for v in env["b"])              # fast: glibc's defaults
        proc = run_cli("stop", cwd=d, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out, err = train.communicate(timeout=120)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 130, err[-3000:]
    assert "was stopped by `dsparse stop`" in err and "error: board" not in err
    job = _job(d)
    assert job["state"] == "stopped" and job.get("failed_board") is None


def _seed_fast_allocator_bytes(d: Path, extra: int) -> int:
    """Put a fast-allocator figure into the cached profile, as if `plan` had measured it."""
    key = json.loads((d / ".dsparse" / "plan.json").read_text())["profile_key"]
    path = d / ".dsparse" / "profiles" / f"{key}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fast_allocator_bytes": extra}))
    return extra
