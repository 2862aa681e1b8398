"""The training worker (dsparse_cli/runtime/worker.py): plan application, resume, signals, torchrun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from _runtime_helpers import free_port, make_job, make_plan, run_ranks
from dsparse_cli.runtime import checkpoint as ckpt
from dsparse_cli.runtime.memory import MemoryMeter
from dsparse_cli.runtime.models import split_units, unit_buffers, unit_params
from dsparse_cli.runtime.worker import Stopped, Trainer, WorkerError, lr_at

REPO = Path(__file__).resolve().parents[2]


def test_lr_schedules():
    assert lr_at("constant", 0.1, 7, 10) == 0.1
    assert lr_at("cosine", 0.1, 0, 10) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 5, 10) == pytest.approx(0.05)
    assert lr_at("cosine", 0.1, 10, 10) == pytest.approx(0.0)
    assert [lr_at("step", 1.0, s, 8) for s in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(WorkerError):
        lr_at("linear", 0.1, 0, 10)


def test_memory_meter_counts_what_training_adds():
    meter = MemoryMeter(torch.device("cpu"))
    meter.mark_base()
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    assert meter.peak_training_bytes() >= 48 * 1024 * 1024
    del block
    rep = meter.report()
    assert rep["base_memory_bytes"] > 0 and rep["peak_process_bytes"] >= rep["base_memory_bytes"]


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_plan_application_freezes_units(world_of_one, tmp_path):
    plan = make_plan([[2, 3]])
    trainer = Trainer(plan, make_job(str(tmp_path / "w"), max_steps=3), 0, 1)
    trainer.setup()
    model, units = trainer.model, split_units(trainer.model, "tiny_cnn")
    frozen = [t.detach().clone() for u in units[:2] for t in unit_params(model, u) + unit_buffers(model, u)]
    updated_bufs = [b.clone() for b in unit_buffers(model, units[2])]
    for u in units:
        assert all(p.requires_grad == (u.index in (2, 3)) for p in unit_params(model, u))
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for u in units[2:] for p in unit_params(model, u)}
    trainer.run()
    after = [t for u in units[:2] for t in unit_params(model, u) + unit_buffers(model, u)]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after))  # weights and BN statistics untouched
    assert int(model.features[0][1].num_batches_tracked) == 0
    assert int(model.features[2][1].num_batches_tracked) == 3  # the updated unit's BN did train
    assert not torch.equal(updated_bufs[0], unit_buffers(model, units[2])[0])
    assert all(s.get("momentum_buffer") is not None for s in trainer.optimizer.state.values())
    assert len(trainer.optimizer.state) == len(in_opt)
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["updated_units"] == [2, 3] and summary["steps"] == 3 and summary["state"] == "finished"
    assert summary["peak_memory_bytes"] > 0


def test_plan_for_another_world_size_is_refused(tmp_path):
    with pytest.raises(WorkerError, match="2 devices but the launcher started 3"):
        Trainer(make_plan([[0, 1, 2, 3], [3]]), make_job(str(tmp_path)), 0, 3)


# --- resume -------------------------------------------------------------------------------
RESUME_JOB = dict(dataset="synthetic", synthetic_samples=200, epochs=2, max_steps=None, eval=True,
                  sync_every=2, compression={"name": "fp16"}, checkpoint_every_steps=2, seed=3)
NESTED2 = [[0, 1, 2, 3], [3]]


def _state_of(trainer):
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, s in enumerate(trainer.optimizer.state.values()):
        out[f"mom.{i}"] = s["momentum_buffer"].clone()
    return out


def _resume(rank, world, tmp):
    plan = make_plan(NESTED2, sync_every=2)
    straight = Trainer(plan, make_job(f"{tmp}/a{rank}", **RESUME_JOB), rank, world)
    straight.run()
    interrupted = Trainer(plan, make_job(f"{tmp}/b{rank}", **RESUME_JOB), rank, world)

    def stop_rank1_at_3(t):  # only rank 1 asks; rank 0 must stop at the same step
        if t.rank == 1 and t.global_step == 3:
            t.stop.requested.set()

    interrupted.on_step = stop_rank1_at_3
    try:
        interrupted.run()
        raise AssertionError("the stop request was ignored")
    except Stopped:
        pass
    steps = [ckpt.load_checkpoint(p, ckpt.plan_hash(plan), rank)["global_step"]
             for p in ckpt.candidate_paths(f"{tmp}/b{rank}")]
    assert steps == [3, 2], steps
    if rank == 0:  # as if rank 0 died while writing step 3: the ranks must fall back to step 2
        os.unlink(ckpt.checkpoint_path(f"{tmp}/b0"))
    dist.barrier()
    resumed = Trainer(plan, make_job(f"{tmp}/b{rank}", **RESUME_JOB, resume=True), rank, world)
    summary = resumed.run()
    assert summary["resumed_from_step"] == 2 and summary["steps"] == straight.global_step == 10
    torch.save({"straight": _state_of(straight), "resumed": _state_of(resumed),
                "acc": (straight.accuracy, resumed.accuracy),
                "hist": tuple([{k: v for k, v in h.items() if k != "train_s"} for h in w.history]   # timing differs
                              for w in (straight, resumed)),
                "residual": resumed.compressor.residual("g0")}, f"{tmp}/rank{rank}.pt")


def test_a_resume_before_any_checkpoint_starts_from_step_0_with_the_same_weights(world_of_one, tmp_path, capsys):
    """Ctrl-C during the launch stops a job before its first checkpoint: `--resume` starts it again."""
    plan, job = make_plan([[0, 1, 2, 3]]), dict(dataset="synthetic", synthetic_samples=64, max_steps=2, eval=False)
    fresh = Trainer(plan, make_job(str(tmp_path / "a"), **job), 0, 1)
    fresh.run()
    resumed = Trainer(plan, make_job(str(tmp_path / "b"), **job, resume=True), 0, 1)
    summary = resumed.run()
    assert "no checkpoint on any board yet: starting from step 0" in capsys.readouterr().out
    assert summary["steps"] == 2 and summary["resumed_from_step"] is None
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in fresh.model.state_dict().items())
    torch.save({"format": ckpt.FORMAT_VERSION, "plan_hash": "other"}, ckpt.checkpoint_path(str(tmp_path / "b")))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint step common to all boards"):
        Trainer(plan, make_job(str(tmp_path / "b"), **job, resume=True), 0, 1).setup()   # a bad one is not ignored


@pytest.mark.slow
def test_stop_and_resume_gives_the_uninterrupted_weights(tmp_path):
    run_ranks(_resume, 2, str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["straight"].keys() == res["resumed"].keys()
        for k, v in res["straight"].items():
            assert torch.equal(v, res["resumed"][k]), (r, k)
        assert res["acc"][0] == res["acc"][1] and res["hist"][0] == res["hist"][1]
        assert len(res["hist"][0]) == 2  # evaluated at both epoch ends
        assert res["residual"] is not None and res["residual"].abs().max() > 0  # fp16 error feedback


# --- real processes -----------------------------------------------------------------------
def _write(tmp: Path, plan: dict, job: dict, rank: int) -> tuple[Path, Path]:
    d = tmp / f"board{rank}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps(plan, indent=1, sort_keys=True))
    (d / "job.json").write_text(json.dumps({**job, "workdir": str(d)}, indent=1, sort_keys=True))
    return d / "plan.json", d / "job.json"


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "TORCH_CPP_LOG_LEVEL": "ERROR", **extra}


def _start_workers(tmp: Path, plan: dict, job: dict, world: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        plan_path, job_path = _write(tmp, plan, job, rank)
        log = open(tmp / f"board{rank}" / "worker.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dsparse_cli.runtime.worker", "--plan", str(plan_path), "--job", str(job_path)],
            env=_env(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _status(tmp: Path, rank: int) -> dict:
    try:
        return json.loads((tmp / f"board{rank}" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for(pred, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _log(tmp: Path, rank: int) -> str:
    return (tmp / f"board{rank}" / "worker.log").read_text(errors="replace")[-3000:]


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


LONG_JOB = dict(dataset="synthetic", synthetic_samples=200, epochs=10000, max_steps=None, eval=False,
                lr_schedule="constant", heartbeat_s=0.0, stop_grace_s=2.0, checkpoint_every_steps=50)


@pytest.mark.slow
def test_sigterm_checkpoints_the_same_step_everywhere_then_resumes(tmp_path):
    plan = make_plan(NESTED2)
    procs = _start_workers(tmp_path, plan, make_job("", **LONG_JOB), 2)
    try:
        _wait_for(lambda: all((_status(tmp_path, r).get("global_step") or 0) >= 3 for r in range(2)),
                  what="3 steps")
        procs[1].send_signal(signal.SIGTERM)  # one board first: the other must stop at the same step
        time.sleep(0.3)
        procs[0].send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=60) for p in procs]
    finally:
        _reap(procs)
    assert rcs == [143, 143], [_log(tmp_path, r) for r in range(2)]
    steps = []
    for r in range(2):
        st = _status(tmp_path, r)
        assert st["state"] == "stopped" and "checkpoint saved" in st["error"]
        # rank 1 was signalled first; rank 0 stops at the same step whether or not its own
        # signal had arrived by then
        assert "SIGTERM" in st["error"] or (r == 0 and "another board was stopped" in st["error"])
        steps.append(ckpt.load_checkpoint(ckpt.checkpoint_path(str(tmp_path / f"board{r}")),
                                          ckpt.plan_hash(plan), r)["global_step"])
    assert steps[0] == steps[1] >= 3

    job = make_job("", **{**LONG_JOB, "max_steps": steps[0] + 2, "resume": True})  # as the launcher resumes
    procs = _start_workers(tmp_path, plan, job, 2)
    try:
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        _reap(procs)
    assert rcs == [0, 0], [_log(tmp_path, r) for r in range(2)]
    for r in range(2):
        summary = json.loads((tmp_path / f"board{r}" / "summary.json").read_text())
        assert summary["resumed_from_step"] == steps[0] and summary["steps"] == steps[0] + 2


@pytest.mark.slow
def test_sigterm_while_blocked_in_a_collective_exits_and_keeps_the_checkpoint(tmp_path):
    plan = make_plan(NESTED2)
    procs = _start_workers(tmp_path, plan, make_job("", **{**LONG_JOB, "checkpoint_every_steps": 2}), 2)
    try:
        path0 = ckpt.checkpoint_path(str(tmp_path / "board0"))
        _wait_for(lambda: os.path.exists(path0), what="a checkpoint")
        os.kill(procs[1].pid, signal.SIGSTOP)  # a peer that stops answering
        time.sleep(0.5)
        procs[0].send_signal(signal.SIGTERM)
        rc0 = procs[0].wait(timeout=60)
    finally:
        if procs[1].poll() is None:
            os.kill(procs[1].pid, signal.SIGCONT)
        _reap(procs)
    assert rc0 == 143, _log(tmp_path, 0)
    st = _status(tmp_path, 0)
    assert st["state"] == "stopped" and "blocked in a collective" in st["error"]
    assert ckpt.load_checkpoint(path0, ckpt.plan_hash(plan), 0)["global_step"] >= 2  # intact


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(tmp_path):
    """Exactly the launcher's command line (jobs/launch.py worker_command), two nodes."""
    plan = make_plan(NESTED2)
    job = make_job("", dataset="digits", epochs=1, max_steps=4, eval=True, heartbeat_s=1.0)
    port = free_port()
    procs = []
    try:
        for rank in range(2):
            plan_path, job_path = _write(tmp_path, plan, job, rank)
            log = open(tmp_path / f"board{rank}" / "worker.log", "ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                 "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                 "--max-restarts", "0", "--monitor-interval", "1",
                 "-m", "dsparse_cli.runtime.worker", "--plan", str(plan_path), "--job", str(job_path)],
                env=_env(), cwd=tmp_path / f"board{rank}", stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        _reap(procs)
    assert rcs == [0, 0], [_log(tmp_path, r) for r in range(2)]
    accs = []
    for rank in range(2):
        d = tmp_path / f"board{rank}"
        st = json.loads((d / "status.json").read_text())
        assert st["state"] == "finished" and st["rank"] == rank and st["name"] == f"b{rank}"
        assert st["global_step"] == 4 and st["error"] is None
        assert ckpt.load_checkpoint(str(d / "checkpoints" / "latest.pt"), ckpt.plan_hash(plan), rank)
        summary = json.loads((d / "summary.json").read_text())
        for key in ("accuracy", "peak_memory_bytes", "agg_ms_per_step", "bytes_per_step", "steps", "wall_s"):
            assert summary[key] is not None, key
        assert summary["steps"] == 4 and summary["updated_units"] == NESTED2[rank]
        assert f"b{rank} rank {rank}] epoch 1/1 step 4/" in _log(tmp_path, rank)
        accs.append(summary["accuracy"])
    assert accs[0] == accs[1] and 0.0 <= accs[0] <= 1.0 and not math.isnan(accs[0])
