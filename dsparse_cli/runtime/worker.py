"""The training worker: one per board, started by torchrun (or anything that sets RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the env:// rendezvous), as

    python -m dsparse_cli.runtime.worker --plan PLAN --job JOB

The rank is the board's index in the plan's `devices`. The worker applies the plan for its rank,
trains its shard with grouped aggregation, evaluates at each epoch end (the all-reduced accuracy
of the synchronised model, the same on every board), checkpoints, heartbeats to `status.json`,
and at the end writes `summary.json` and, on rank 0, the trained model (model_out.py). The job
file's `resume` key continues from its checkpoints. Plan checks and the learning-rate schedule
are in job_setup.py, SIGTERM/SIGINT handling in stopping.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsparse_cli.contract import JobSpec, WorkerState
from dsparse_cli.runtime import checkpoint as ckpt
from dsparse_cli.runtime import data as datamod
from dsparse_cli.runtime.aggregate import GroupedAggregator, broadcast_module
from dsparse_cli.runtime.batchnorm import batchnorms, recompute_statistics
from dsparse_cli.runtime.heartbeat import Heartbeat, write_json_atomic
from dsparse_cli.runtime.job_setup import (WorkerError, check_plan, check_units, compressor_for_job,
                                           init_distributed, lr_at, read_job, set_threads)
from dsparse_cli.runtime.memory import MemoryMeter
from dsparse_cli.runtime.model_out import model_meta, save_model
from dsparse_cli.runtime.models import ModelError, build_model, unit_modules, units_from_plan
from dsparse_cli.runtime.sparse import apply_plan, make_optimizer, set_train_mode
from dsparse_cli.runtime.stopping import (EXIT_STOPPED, MasterWatch, SignalWatch, StopControl, Stopped,
                                          agree_stop)
from dsparse_cli.runtime.weights import WeightsError, load_weights

# --- the trainer -------------------------------------------------------------------------
class Trainer:
    def __init__(self, plan: dict, job: dict, rank: int, world: int, *, heartbeat: Heartbeat | None = None,
                 stop: StopControl | None = None, device: torch.device | None = None):
        self.plan, self.job = plan, job if isinstance(job, JobSpec) else read_job(job)
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.workdir = self.job.workdir or "."
        self.device_entry = check_plan(plan, rank, world)
        self.updated = [int(u) for u in self.device_entry["units"]]
        self.trained_elsewhere = sorted({int(u) for d in plan["devices"] for u in d["units"]} - set(self.updated))
        self.hb = heartbeat or Heartbeat(self.workdir, self.job.id, rank, self.device_entry["name"],
                                         self.job.heartbeat_s)
        self.stop = stop or StopControl()
        self.on_step = None  # tests: called as on_step(trainer) after every step
        self.plan_hash, self.epoch, self.step_in_epoch, self.global_step = ckpt.plan_hash(plan), 0, 0, 0
        self.history: list[dict] = []
        self.accuracy = self.resumed_from = None
        self.train_time = 0.0
        self._last_loss: float | None = None

    # --- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything; `run` calls it unless it was called already."""
        if getattr(self, "model", None) is not None:
            return
        job, plan = self.job, self.plan
        seed = job.seed
        torch.manual_seed(seed)  # the same initial model on every rank
        self.model = build_model(plan["model"], int(plan.get("num_classes", 10)), search_dirs=[self.workdir])
        self.units = units_from_plan(plan)
        check_units(self.model, self.units)
        resumed = ckpt.agreed_checkpoint(self.workdir, self.plan_hash, self.rank, self.world) if job.resume else None
        if job.weights and resumed is None:   # a resume continues from its checkpoint instead
            self.log(load_weights(self.model, self.units, job.weights, spec=plan["model"], search_dirs=[self.workdir]))
        self.model.to(self.device)
        torch.manual_seed(seed + 1 + self.rank)  # per-rank stream (dropout), after the shared init
        params = apply_plan(self.model, self.units, self.updated)
        self.compressor = compressor_for_job(job)
        self.optimizer = self._optimizer(params)
        self.data = datamod.load_dataset(job.dataset, data_dir=job.data_dir, download=job.download,
                                         image_size=int(plan.get("image_size", 32)), seed=seed,
                                         synthetic_samples=job.synthetic_samples, workdir=self.workdir,
                                         rank=self.rank, world=self.world, val_fraction=job.val_fraction,
                                         skip_bad_images=job.skip_bad_images)
        if getattr(self.data, "skipped", 0):
            self.log(f"skipped {self.data.skipped} image(s) that do not decode (--skip-bad-images)")
        if self.data.num_classes > int(plan.get("num_classes", 10)):
            raise WorkerError(f"dataset {job.dataset} has {self.data.num_classes} classes but the plan's model "
                              f"has {plan.get('num_classes')} outputs; re-plan with --num-classes")
        self.batch_size = job.batch_size
        self.spe = datamod.dataset_steps_per_epoch(self.data, self.world, self.batch_size)
        if self.spe < 1:
            raise WorkerError(f"dataset {job.dataset} has {self.data.train.size} training samples: too few for "
                              f"{self.world} boards at batch size {self.batch_size}; lower --batch-size")
        self.total_steps = self.spe * job.epochs
        if job.max_steps:
            self.total_steps = min(self.total_steps, job.max_steps)
        self.agg = GroupedAggregator(plan, self.rank, self.model, self.units, self.compressor,
                                     sync_every=job.sync_every, device=self.device,
                                     timeout_s=job.collective_timeout_s)
        if resumed is not None:
            self._resume(resumed)
        else:
            if job.resume:   # stopped before its first checkpoint (Ctrl-C during the launch)
                self.log("no checkpoint on any board yet: starting from step 0")
            broadcast_module(self.model, src=0)
        self.meter = MemoryMeter(self.device)

    def _optimizer(self, params):
        if not params:
            return None
        name, momentum = self.job.optimizer, float(self.job.momentum)
        if self.compressor.momentum > 0 and name == "sgd-momentum":
            name = "sgd"  # the compressor applies momentum itself (DGC momentum correction)
            self.log(f"compression {self.compressor.name} applies momentum: optimizer runs plain sgd")
        return make_optimizer(name, params, float(self.job.lr), momentum, float(self.job.weight_decay))

    # --- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict:
        return {"plan_hash": self.plan_hash, "rank": self.rank, "job": self.job.id,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "rng": ckpt.rng_state(), "aggregator": self.agg.state_dict(),
                "history": self.history, "accuracy": self.accuracy}

    def save(self) -> None:
        with self.stop.save_lock:
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.workdir), self.state())

    def _resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.agg.load_state_dict(state["aggregator"])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = self.resumed_from = int(state["global_step"])
        self.history, self.accuracy = list(state["history"]), state["accuracy"]
        self.log(f"resumed from step {self.global_step} (epoch {self.epoch + 1}, step {self.step_in_epoch})")

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.time()
        self.setup()
        self.meter.mark_base()
        self.beat(WorkerState.RUNNING, force=True)
        epochs = self.job.epochs
        while self.epoch < epochs and self.global_step < self.total_steps:
            self._train_epoch()
            if self.step_in_epoch >= self.spe or self.global_step >= self.total_steps:
                self._end_epoch()
        summary = self.summary(time.time() - t_start)   # the hand-back's one-time sync is no per-step traffic
        self._hand_back_model()
        write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)
        self.stop.done.set()
        self.beat(WorkerState.FINISHED, force=True)
        return summary

    def _train_epoch(self) -> None:
        set_train_mode(self.model, self.units, self.updated, self.trained_elsewhere)
        window: list[float] = []
        batches = datamod.batches_for(self.data, self.rank, self.world, self.epoch, self.job.seed,
                                      self.batch_size, start=self.step_in_epoch)
        for x, y in batches:
            if self.global_step >= self.total_steps:
                break
            t0 = time.perf_counter()
            loss = self.train_step(x.to(self.device), y.to(self.device), self.global_step)
            self.train_time += time.perf_counter() - t0
            self.global_step += 1
            self.step_in_epoch += 1
            window.append(loss)
            self._last_loss = loss
            self._after_step(window)

    def _after_step(self, window: list[float]) -> None:
        self.meter.sample()
        every = self.job.checkpoint_every_steps
        saved = bool(every) and self.global_step % int(every) == 0
        if saved:
            self.save()
        if self.on_step is not None:
            self.on_step(self)
        every_log = int(self.job.log_every_steps or 10)
        if self.global_step % every_log == 0 or self.step_in_epoch == self.spe or self.global_step == self.total_steps:
            self.log(f"epoch {self.epoch + 1}/{self.job.epochs} step {self.step_in_epoch}/{self.spe} "
                     f"loss {sum(window) / len(window):.4f} lr {self._lr(self.global_step - 1):.4g}")
            window.clear()
        self.beat(WorkerState.RUNNING)
        if agree_stop(self.stop, self.device):
            if not saved:
                self.save()
            self.stop.done.set()
            raise Stopped(f"{self.stop.reason} at step {self.global_step}; checkpoint saved")

    def _lr(self, step: int) -> float:
        return lr_at(self.job.lr_schedule, float(self.job.lr), step, self.total_steps)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        self.agg.before_forward()
        if self.optimizer is None:  # nothing to update here: forward for the loss, keep in step
            with torch.no_grad():
                loss = F.cross_entropy(self.model(x), y)
            self.agg.reduce_gradients()
            self.agg.after_step(step)
            return float(loss)
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.agg.reduce_gradients()
        self.optimizer.step()
        self.agg.after_step(step)
        return float(loss.detach())

    def _end_epoch(self) -> None:
        # the model scored and handed back carries its own weights' statistics
        synced = (self.job.eval or self.global_step >= self.total_steps) and self._recompute_batchnorm()
        if self.job.eval:
            self.accuracy = self.evaluate(synced=synced)
            self.meter.sample()
            self.log(f"epoch {self.epoch + 1} accuracy {self.accuracy:.4f}")
        self.history.append({"epoch": self.epoch + 1, "global_step": self.global_step, "accuracy": self.accuracy,
                             "train_s": round(self.train_time, 3)})   # accuracy over training time (bench/)
        if self.step_in_epoch >= self.spe:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save()
        self.beat(WorkerState.RUNNING, force=True)

    def _recompute_batchnorm(self) -> bool:
        """BatchNorm statistics of the units some board trains, from the weights as they are now
        (synchronised first: -> True); every rank at once."""
        trained = set(self.updated) | set(self.trained_elsewhere)
        bns = batchnorms(m for u in self.units if u.index in trained for m in unit_modules(self.model, u))
        if not bns or self.job.bn_batches < 1:
            return False
        self.agg.sync_all()
        batches = datamod.batches_for(self.data, self.rank, self.world, self.epoch, self.job.seed, self.batch_size)
        n = recompute_statistics(self.model, bns, (x for x, _ in batches), self.job.bn_batches, self.device, self.world)
        self.log(f"BatchNorm statistics of the trained units recomputed over {n} batches")
        return True

    @torch.no_grad()
    def evaluate(self, synced: bool = False) -> float:
        """Accuracy of the synchronised model; each rank scores a slice of the test set."""
        if not synced:
            self.agg.sync_all()
        self.model.eval()
        correct = total = 0
        for chunk in datamod.eval_slice(self.data, self.rank, self.world).split(self.batch_size):
            x, y = self.data.test.fetch(chunk)
            pred = self.model(x.to(self.device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
            self.beat(WorkerState.RUNNING)
        counts = torch.tensor([correct, total], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        set_train_mode(self.model, self.units, self.updated, self.trained_elsewhere)
        return float(counts[0]) / max(1, int(counts[1]))

    def _hand_back_model(self) -> None:
        """The trained model as model.pt + model.json in rank 0's run dir. Every rank joins a last
        weight sync, so rank 0 holds the latest of units it only runs forward; only rank 0 writes."""
        self.agg.sync_weights()
        if self.rank != 0:
            return
        d, plan = self.data, self.plan
        meta = model_meta(spec=plan["model"], num_classes=int(plan.get("num_classes", 10)),
                          image_size=int(plan.get("image_size", 32)), classes=getattr(d, "classes", None),
                          mean=getattr(d, "mean", None), std=getattr(d, "std", None), accuracy=self.accuracy,
                          job=self.job.id, dataset=self.job.dataset, steps=self.global_step, weights=self.job.weights)
        self.log(f"trained model written to {save_model(self.workdir, self.model, meta)}")

    # --- reporting -------------------------------------------------------------------------
    def metrics(self) -> dict:
        steps_here = self.global_step - (self.resumed_from or 0)
        rate = steps_here * self.batch_size / self.train_time if self.train_time > 0 else None
        out = {"epoch": min(self.epoch + 1, self.job.epochs), "epochs": self.job.epochs,
               "step": self.step_in_epoch, "steps_per_epoch": self.spe, "accuracy": self.accuracy,
               "samples_per_s": rate, "updated_units": self.updated, "global_step": self.global_step,
               "total_steps": self.total_steps, "threads": torch.get_num_threads()}
        out.update(self.agg.report())
        out.update(self.meter.report())
        return out

    def beat(self, state: str, force: bool = False) -> None:
        if not force and state == self.hb.state and not self.hb.due():
            return  # nothing would be written: skip gathering the metrics
        fields = self.metrics()
        if self._last_loss is not None:
            fields["loss"] = self._last_loss
        if force:
            self.hb.set_state(state, **fields)
        else:
            self.hb.update(state=state, **fields)

    def summary(self, wall_s: float) -> dict:
        doc = {"job": self.job.id, "rank": self.rank, "name": self.device_entry["name"], "state": WorkerState.FINISHED.value,
               "dataset": self.job.dataset, "model": self.plan["model"], "world": self.world,
               "steps": self.global_step, "wall_s": wall_s, "train_s": self.train_time,
               "resumed_from_step": self.resumed_from, "history": self.history, "compression": self.job.compression,
               "sync_every": {g.id: g.sync_every for g in self.agg.groups if g.op == "broadcast"}}
        doc.update(self.metrics())
        doc["compressor"] = self.compressor.report()
        return doc

    def log(self, msg: str) -> None:
        print(f"[{self.device_entry['name']} rank {self.rank}] {msg}", flush=True)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}".strip()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dsparse_cli.runtime.worker")
    for name in ("--plan", "--job"):   # the job's `resume` key drives resume
        p.add_argument(name, required=True)
    return p.parse_args(argv)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise WorkerError(f"cannot read the {what} file {path}: {exc}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        plan, job = _read_json(args.plan, "plan"), read_job(_read_json(args.job, "job"))
        job.workdir = job.workdir or os.path.dirname(os.path.abspath(args.job))
        entry = check_plan(plan, rank, world)
        set_threads()   # before any torch work: torch alone would ignore the board's CPU quota
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    hb = Heartbeat(job.workdir, job.id, rank, entry["name"], job.heartbeat_s)
    stop = StopControl()

    def on_stuck():
        hb.set_state(WorkerState.STOPPED, error=f"{stop.reason} before reaching a step boundary (blocked in a collective "
                                      "or still starting); last checkpoint kept")

    SignalWatch(stop, job.stop_grace_s, on_stuck)

    def on_master_lost(silent_s: float):
        with stop.save_lock:  # never cut a checkpoint write in half
            if stop.done.is_set():
                return  # finished (or failed) meanwhile: nothing was lost
            hb.set_state(WorkerState.FAILED, error=f"lost the master {os.environ.get('MASTER_ADDR')} for "
                                                   f"{silent_s:.0f}s (link down or rank 0 gone); exiting")
            print(f"error: lost the master for {silent_s:.0f}s; exiting", file=sys.stderr, flush=True)
            os._exit(1)

    try:
        device = init_distributed(job, rank, world)
        if world > 1:
            MasterWatch(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), job.master_lost_s, stop,
                        on_master_lost)
        Trainer(plan, job, rank, world, heartbeat=hb, stop=stop, device=device).run()
        return 0
    except Stopped as exc:
        hb.set_state(WorkerState.STOPPED, error=str(exc))
        print(str(exc), flush=True)
        return EXIT_STOPPED
    except (WorkerError, datamod.DataError, ckpt.CheckpointError, ModelError, WeightsError) as exc:
        stop.done.set()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        hb.set_state(WorkerState.FAILED, error=str(exc))
        return 1
    except Exception as exc:
        stop.done.set()
        traceback.print_exc()
        hb.set_state(WorkerState.FAILED, error=_one_line(exc))
        return 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: it restores default signal handlers (a late SIGTERM from the
    # launcher would turn our exit code into -15) and process-group destructors can block.
    os._exit(code)
