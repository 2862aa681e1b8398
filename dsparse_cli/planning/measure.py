"""Measure a model's per-unit training-memory costs (the torch side of `profile`).

Run as `python -m dsparse_cli.planning.measure --out FILE --model ...` in a fresh process whose
environment holds `profile.MALLOC_ENV` (`profile.get_profile` does this): glibc then serves every
block of a page or more with mmap and unmaps it on free, so the resident set follows live tensors
and the RSS peaks measured here mean tensor bytes plus what the kernels really allocate.
See `profile`'s module docstring for what is measured, `replay`'s for how a plan's memory is
replayed from it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Iterable

from dsparse_cli.errors import ConfigError, DsparseError
from dsparse_cli.planning.profile import (MALLOC_ENV, Profile, UnitCost, measure_launcher_bytes, profile_key,
                                          save_profile)
from dsparse_cli.planning.replay import FROZEN, PASSTHROUGH, UPDATED, live_peak_bytes
from dsparse_cli.runtime.memory import private_rss, reset_peak_rss
from dsparse_cli.runtime.verify_step import read_rss, worker_setup

WARMUP_STEPS = 2
MEASURED_STEPS = 2


def reset_hwm() -> None:
    if not reset_peak_rss():
        raise ConfigError("cannot reset the peak RSS (/proc/self/clear_refs refused)",
                          "profile on Linux with a writable /proc")


class _Recorder:
    """Hooks that attribute saved tensors to regions and measure each region's RSS peak and
    seconds (`rss=False`: seconds only, without the /proc reads that would add to them)."""

    def __init__(self, model, units, rss: bool = True):
        import torch

        self.torch = torch
        self.rss = rss
        self.units = units
        self.weight_keys = {self._key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
        self.batch_bytes = 0
        self._handles = []
        for u in units:
            for name in u.modules:
                mod = model.get_submodule(name)
                self._handles.append(mod.register_forward_pre_hook(self._pre_hook(u.index)))
        self.reset()

    def _key(self, t) -> tuple[int, int]:
        from torch.multiprocessing.reductions import StorageWeakRef

        s = t.untyped_storage()
        ref = StorageWeakRef(s)
        getattr(self, "_refs", []).append(ref)   # pins the identity while the step runs
        return ref.cdata, s.nbytes()

    def reset(self) -> None:
        """Forget the previous step (call before each step)."""
        self._refs = []
        self.current = 0
        self.savers: dict[int, set[int]] = {}
        self.sizes: dict[int, int] = {}
        self.inputs: dict[int, tuple[int, int]] = {}
        self.batch_keys: set[int] = set()
        self.peaks: dict[tuple, int] = {}
        self.seconds: dict[tuple, float] = {}
        self.segment = None
        self.abs_peak = 0
        self.step_start = 0

    def mark(self, label) -> None:
        """Close the running segment (its peak growth and seconds) and open `label`."""
        now = time.perf_counter()
        rss, hwm = read_rss() if self.rss else (0, 0)
        if self.segment is not None:
            lab, start, began = self.segment
            self.peaks[lab] = max(0, max(rss, hwm) - start)
            self.seconds[lab] = now - began
            self.abs_peak = max(self.abs_peak, rss, hwm)
        if self.rss:
            reset_hwm()
        self.segment = (label, rss, time.perf_counter())
        if label == ("step_start",):
            self.step_start = rss

    def _pre_hook(self, index: int):
        def hook(module, args):
            if index == self.current and self.inputs.get(index):
                return
            self.current = index
            t = next((a for a in args if isinstance(a, self.torch.Tensor)), None)
            if t is None:
                return
            self.mark(("fwd", index))
            key, size = self._key(t)
            self.inputs[index] = (key, 0 if key in self.batch_keys else size)
            if index > 0 and t.grad_fn is not None:   # its grad_fn runs when region index-1's backward starts
                t.grad_fn.register_prehook(lambda grads, v=index - 1: self.mark(("bwd", v)))

        return hook

    def pack(self, t):
        key, size = self._key(t)
        if key not in self.weight_keys and key not in self.batch_keys:
            self.savers.setdefault(key, set()).add(self.current)
            self.sizes[key] = size
        return t

    def attribution(self, n: int) -> tuple[list[int], list[bool], list[bool], list[int]]:
        """Per region: saved bytes inside, saves its input, saves the next unit's input; and the
        bytes of each unit's entering activation."""
        saved, saves_in, saves_out = [0] * n, [False] * n, [False] * n
        input_of = {key: v for v, (key, _) in self.inputs.items()}
        for key, regions in self.savers.items():
            rest = set(regions)
            w = input_of.get(key)
            if w is not None:
                if w in rest:
                    saves_in[w] = True
                    rest.discard(w)
                if w - 1 in rest:
                    saves_out[w - 1] = True
                    rest.discard(w - 1)
            if rest:
                saved[min(rest)] += self.sizes[key]
        input_bytes = [self.inputs.get(v, (0, 0))[1] for v in range(n)]
        return saved, saves_in, saves_out, input_bytes


def _make_batch(torch, batch_size: int, image_size: int, num_classes: int, dtype, gen):
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(dtype)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    return x, y


def _run_step(torch, model, opt, rec: _Recorder, batch_fn) -> None:
    """One training step, marked: step_start, fwd regions, bwd regions, optimizer step."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    rec.reset()
    rec.mark(("step_start",))
    x, y = batch_fn()
    rec.batch_keys = {rec._key(x)[0], rec._key(y)[0]}
    rec.batch_bytes = x.nbytes + y.nbytes
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    if loss.requires_grad:
        rec.mark(("bwd", len(rec.units) - 1))
        loss.backward()
        rec.mark(("opt",))
        opt.step()
    rec.mark(("end",))


def _trained_by_someone(units) -> list[int]:
    """Units some board trains, for `set_train_mode`: all of them. Plans cover every unit in
    practice, so a unit this process does not update runs BatchNorm on batch statistics, which
    is what the worker does. (Eval-mode BN saves its input for backward too; train mode adds
    only the per-channel batch mean and inverse std.)"""
    return [u.index for u in units]


def _run_config(torch, model, units, updated: set[int], optimizer: str, rec: _Recorder, batch_fn):
    """Warm up, then measure: per-region peaks (max over the measured steps) and attribution."""
    from dsparse_cli.runtime.sparse import apply_plan, make_optimizer, set_train_mode

    for p in model.parameters():
        p.grad = None
    params = apply_plan(model, units, updated)
    set_train_mode(model, units, updated, _trained_by_someone(units))
    opt = make_optimizer(optimizer, params, lr=1e-3) if params else None
    for _ in range(WARMUP_STEPS):
        _run_step(torch, model, opt, rec, batch_fn)
    peaks: dict[tuple, int] = {}
    seconds: dict[tuple, float] = {}
    growth = 0
    for _ in range(MEASURED_STEPS):
        _run_step(torch, model, opt, rec, batch_fn)
        for k, v in rec.peaks.items():
            peaks[k] = max(peaks.get(k, 0), v)
        for k, v in rec.seconds.items():   # the quicker step: the other one was interrupted more
            seconds[k] = min(seconds.get(k, v), v)
        growth = max(growth, rec.abs_peak - rec.step_start)
    result = {"peaks": peaks, "seconds": seconds, "attribution": rec.attribution(len(units)), "growth": growth,
              "step_start": rec.step_start, "batch_bytes": rec.batch_bytes}
    return result, opt, params


def _first_steps(torch, model, units, optimizer: str, batch_fn) -> dict:
    """On the cold process, before any other step: the base point (as the worker takes it: model
    built, optimizer made, nothing run), then what the first steps add for good. The worker's
    meter counts that growth of private memory as training memory (its base point is before its
    first step): the Python heap, allocator and kernel caches. Suffixes of units train one step
    each, the last unit first, each with a fresh optimizer dropped with the gradients afterwards,
    so what stays is one-time; a unit's share is what the suffix starting at it added over the
    one before (the first one also pays the no-grad forward, the loss and the optimizer's code).
    Then one eval-mode forward, as the worker's evaluation runs after its steps.
    "file": what the same steps mapped of torch's code (file-backed, 18-37 MiB with the same
    packages: see `runtime/memory.py`), which the profile puts in the process base."""
    from dsparse_cli.runtime.sparse import apply_plan, make_optimizer, set_train_mode

    n = len(units)
    shares, base, rss0 = [0] * n, None, 0
    for v in range(n - 1, -1, -1):
        suffix = set(range(v, n))
        params = apply_plan(model, units, suffix)
        set_train_mode(model, units, suffix, _trained_by_someone(units))
        opt = make_optimizer(optimizer, params, lr=1e-3)
        gc.collect()
        if base is None:
            # torch.optim's first optimizer imports torch._dynamo: hundreds of thousands of
            # objects that every later full collection would walk (0.35 s each, dozens of them)
            gc.freeze()
            rss0, base = read_rss()[0], private_rss()
            prev = base
        x, y = batch_fn()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        del opt, x, y
        for p in model.parameters():
            p.grad = None
        gc.collect()
        now = private_rss()
        shares[v], prev = max(0, now - prev), now
    model.eval()
    with torch.no_grad():
        model(batch_fn()[0])
    gc.collect()
    now = private_rss()
    file_bytes = max(0, (read_rss()[0] - now) - (rss0 - base))
    return {"base": rss0, "shares": shares, "eval": max(0, now - prev), "file": file_bytes}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure_profile(model_name: str, *, num_classes: int = 10, image_size: int = 32, batch_size: int = 64,
                    dtype: str = "float32", optimizer: str = "sgd-momentum") -> Profile:
    """Measure in this process. Call it in a fresh process started with `MALLOC_ENV` (as
    `get_profile` does): RSS must follow live tensors."""
    import torch

    from dsparse_cli.runtime.models import build_model, split_units, unit_buffers, unit_params

    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    model = build_model(model_name, num_classes).to(tdtype)
    units = split_units(model, model_name)
    n = len(units)
    gc.collect()
    import_bytes = read_rss()[0]
    gen = torch.Generator().manual_seed(0)
    batch_fn = lambda: _make_batch(torch, batch_size, image_size, num_classes, tdtype, gen)  # noqa: E731
    worker_setup(model, image_size, batch_size)
    first = _first_steps(torch, model, units, optimizer, batch_fn)
    rec = _Recorder(model, units)

    full, opt, _ = _run_config(torch, model, units, set(range(n)), optimizer, rec, batch_fn)
    opt_bytes = [_tensor_bytes(t for p in unit_params(model, u) for t in opt.state.get(p, {}).values()
                               if torch.is_tensor(t)) for u in units]
    opt.zero_grad(set_to_none=True)
    x, y = batch_fn()
    torch.nn.functional.cross_entropy(model(x), y).backward()   # the real .grad tensors
    grad_bytes = [_tensor_bytes(p.grad for p in unit_params(model, u) if p.grad is not None) for u in units]
    del opt, x, y
    passthrough, _, _ = _run_config(torch, model, units, {0}, optimizer, rec, batch_fn)
    frozen, _, _ = _run_config(torch, model, units, set(), optimizer, rec, batch_fn)

    cfgs = {UPDATED: full, PASSTHROUGH: passthrough}
    att = {m: cfgs[m]["attribution"] for m in cfgs}
    costs = [UnitCost(
        index=v, name=u.name, modules=list(u.modules),
        param_bytes=_tensor_bytes(unit_params(model, u)), buffer_bytes=_tensor_bytes(unit_buffers(model, u)),
        grad_bytes=grad_bytes[v], optimizer_bytes=opt_bytes[v], input_bytes=att[UPDATED][3][v],
        saved={m: att[m][0][v] for m in cfgs}, saves_input={m: att[m][1][v] for m in cfgs},
        saves_output={m: att[m][2][v] for m in cfgs},
        forward_peak={m: c["peaks"].get(("fwd", v), 0) for m, c in {**cfgs, FROZEN: frozen}.items()},
        backward_peak={m: c["peaks"].get(("bwd", v), 0) for m, c in cfgs.items()},
        first_step_bytes=first["shares"][v],
    ) for v, u in enumerate(units)]
    prof = Profile(
        key=profile_key(model_name, num_classes, image_size, batch_size, dtype, optimizer),
        model=model_name, num_classes=num_classes, image_size=image_size, batch_size=batch_size, dtype=dtype,
        optimizer=optimizer, torch=torch.__version__, device="cpu", base_bytes=first["base"] + first["file"],
        import_bytes=import_bytes, batch_bytes=full["batch_bytes"],
        supervisor_bytes=measure_launcher_bytes("dsparse"),   # torchrun's: only for a plan that uses it
        step_peak_bytes=full["peaks"].get(("opt",), 0), units=costs,
        eval_first_bytes=first["eval"], first_step_file_bytes=first["file"])
    prof.checks = {
        "all_updated": {"measured_growth": full["growth"], "replayed_growth":
                        live_peak_bytes(prof, range(n))},
        "first_updated_only": {"measured_growth": passthrough["growth"], "replayed_growth":
                               live_peak_bytes(prof, {0})},
        "forward_only": {"measured_growth": frozen["growth"], "replayed_growth": live_peak_bytes(prof, set())},
    }
    gc.unfreeze()   # frozen by `_first_steps`; a caller in-process gets its collector back whole
    return prof


def count_saved(model, units, updated: Iterable[int], batch, loss_fn) -> dict:
    """Saved-for-backward attribution of one step, in this process (no RSS): per region the
    saved bytes inside it, whether it saves its input / the next unit's input, and the bytes of
    each entering activation. For tests and inspection."""
    import torch

    from dsparse_cli.runtime.sparse import apply_plan, set_train_mode

    apply_plan(model, units, updated)
    set_train_mode(model, units, updated, _trained_by_someone(units))
    rec = _Recorder(model, units)
    rec.mark = lambda label: None   # no RSS here
    rec.reset()
    rec.batch_keys = {rec._key(t)[0] for t in batch}
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = loss_fn(model(batch[0]), *batch[1:])
        saved, saves_in, saves_out, input_bytes = rec.attribution(len(units))
    finally:
        for h in rec._handles:
            h.remove()
    del loss
    return {"saved": saved, "saves_input": saves_in, "saves_output": saves_out, "input_bytes": input_bytes}


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsparse_cli.planning.measure")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--optimizer", default="sgd-momentum")
    a = ap.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        print("warning: started without profile.MALLOC_ENV: RSS will not follow live tensors", file=sys.stderr)
    from dsparse_cli.runtime.models import ModelError

    try:
        prof = measure_profile(a.model, num_classes=a.num_classes, image_size=a.image_size,
                               batch_size=a.batch_size, dtype=a.dtype, optimizer=a.optimizer)
    except DsparseError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    except ModelError as exc:   # a model that cannot be built or split: its one line, no traceback
        print(str(exc), file=sys.stderr)
        return 2
    save_profile(prof, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
