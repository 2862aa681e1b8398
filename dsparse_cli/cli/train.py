"""`dsparse train`: start the workers on every board under the current plan and follow them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

from dsparse_cli.cli.app import AcceptNewOpt, app, done, inventory, options, print_json
from dsparse_cli.contract import COMPRESSOR_OPTIONS, JobSpec, JobState
from dsparse_cli.errors import EXIT_BOARD_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError

if TYPE_CHECKING:
    from dsparse_cli.inventory import Inventory

SPEC, TOPK, PBGC = JobSpec(), COMPRESSOR_OPTIONS["topk"], COMPRESSOR_OPTIONS["pbgc"]   # the defaults


@app.command()
def train(
    ctx: typer.Context,
    dataset: str = typer.Option(SPEC.dataset, help="digits (bundled, no network), cifar10, synthetic, or "
                                "imagefolder (your images: DIR/<class>/... or DIR/train|val/<class>/...)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Dataset folder (cifar10, imagefolder)."),
    val_fraction: float = typer.Option(SPEC.val_fraction, "--val-fraction", min=0.0, max=0.9, metavar="<fraction>",
                                       help="imagefolder without train/ and val/: share held out for accuracy."),
    skip_bad_images: bool = typer.Option(SPEC.skip_bad_images, "--skip-bad-images",
                                         help="imagefolder: skip (and count) images that do not decode."),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="<file|name>",
                                          help="Start from these weights: a file (state_dict, checkpoint or a job's "
                                          "model.pt) or a torchvision weights name (DEFAULT, IMAGENET1K_V1...)."),
    download: bool = typer.Option(False, "--download", help="Download cifar10 into --data-dir if missing."),
    epochs: int = typer.Option(SPEC.epochs, min=1, metavar="<int>", help="Epochs to train."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, metavar="<int>",
                                            help="Stop after this many steps in total."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, metavar="<int>",
                                             help="Per-board batch (default: the plan's)."),
    lr: float = typer.Option(SPEC.lr, min=0.0, metavar="<float>", help="Learning rate (cosine-decayed over the run)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd, sgd-momentum or adam (default: the plan's)."),
    seed: int = typer.Option(SPEC.seed, min=0, metavar="<int>", help="Seed for model init and data order."),
    sync_every: Optional[int] = typer.Option(None, "--sync-every", min=1, metavar="<int>",
                                             help="Broadcast every N steps, every group (default: the plan's, per group)."),
    compression: str = typer.Option(SPEC.compression["name"], help="Gradient compression: none, fp16, topk or pbgc."),
    density: float = typer.Option(TOPK["density"], min=1e-6, max=1.0, metavar="<fraction>",
                                  help="topk: fraction of gradient values sent."),
    key_fraction: float = typer.Option(PBGC["key_fraction"], "--key-fraction", min=1e-6, max=0.5, metavar="<fraction>",
                                       help="pbgc: fraction sent at full precision."),
    entropy_bins: int = typer.Option(PBGC["entropy_bins"], "--entropy-bins", min=2, max=4096, metavar="<int>",
                                     help="pbgc: histogram bins for the entropy threshold."),
    warmup_steps: int = typer.Option(PBGC["warmup_steps"], "--warmup-steps", min=0, metavar="<int>",
                                     help="topk/pbgc: steps before full compression."),
    bn_batches: int = typer.Option(SPEC.bn_batches, "--bn-batches", min=0, metavar="<int>",
                                   help="Before each evaluation and the model's hand-back, recompute BatchNorm statistics "
                                   "from the weights over this many training batches per board (0: keep the "
                                   "running averages)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest job from its checkpoints."),
    detach: bool = typer.Option(False, "--detach", help="Start the job and return at once."),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1, max=65535, metavar="<port>",
                                              help="Rendezvous port (default: inventory's)."),
    collective_timeout: float = typer.Option(SPEC.collective_timeout_s, "--collective-timeout", min=1.0,
                                             metavar="<seconds>", help="Seconds before a collective gives up."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=1, metavar="<int>",
                                                   help="Also checkpoint every N steps."),
    accept_new_host_keys: bool = AcceptNewOpt,
) -> None:
    """Train on every board under the plan (made on the fly if there is none). Exit 0 only when every
    board finished; 1 when a board failed (the others are stopped); 130 on Ctrl-C."""
    from dsparse_cli.console import info, success
    from dsparse_cli.contract import plan_hash
    from dsparse_cli.jobs import records
    from dsparse_cli.jobs.launch import start_job
    from dsparse_cli.jobs.preflight import PreflightError

    json_out = options.json
    inv = inventory()
    if master_port:
        inv.master_port = master_port
    plan = _current_plan(inv, quiet=json_out)
    opts = JobSpec(
        dataset=dataset, data_dir=data_dir, download=download, epochs=epochs, max_steps=max_steps,
        val_fraction=val_fraction, skip_bad_images=skip_bad_images, weights=weights,
        batch_size=batch_size or plan["batch_size"], lr=lr, optimizer=optimizer or plan["optimizer"],
        seed=seed, sync_every=sync_every,
        compression=_compression_spec(compression, density=density, key_fraction=key_fraction,
                                      entropy_bins=entropy_bins, warmup_steps=warmup_steps),
        collective_timeout_s=collective_timeout, checkpoint_every_steps=checkpoint_every, bn_batches=bn_batches,
        backend="nccl" if _all_cuda(plan) else "gloo",
    )
    previous = None
    if resume:
        previous = records.load(inv.state_dir)
        if previous.plan_hash != plan_hash(plan):
            raise ConfigError(f"job {previous.id} ran under another plan than the current one",
                              "resume needs the same plan; start a new job without --resume")
        opts = _resumed_options(opts, previous.options, ctx)
    if opts.optimizer != plan["optimizer"]:
        raise ConfigError(f"the plan was made for optimizer {plan['optimizer']}, not {opts.optimizer}",
                          f"re-run `dsparse plan --optimizer {opts.optimizer}`")
    try:
        rec, transports = start_job(inv, plan, opts, connect_timeout=options.connect_timeout,
                                    accept_new_host_keys=accept_new_host_keys, resume_of=previous)
    except PreflightError as exc:   # the table on stdout, the first problem as the error line
        if not json_out:
            from dsparse_cli import render
            from dsparse_cli.console import show

            show(render.preflight_table(exc.columns, exc.rows, exc.problems))
        raise
    if detach:
        if json_out:
            print_json({"job": rec.id, "state": rec.state, "boards": [b.name for b in rec.boards]})
        else:
            success(f"job {rec.id} started on {len(rec.boards)} boards; follow it with `dsparse status --watch`")
        done(EXIT_OK)
    if not json_out:
        info(f"job {rec.id}: {len(rec.boards)} boards, {opts.dataset}, {opts.epochs} epoch(s); Ctrl-C stops it")
    done(_follow(inv, rec, plan, transports, json_out))


# CLI parameter -> the JobSpec fields it sets (for --resume: what the user changed).
_OPTION_FIELDS = {"collective_timeout": ("collective_timeout_s",), "checkpoint_every": ("checkpoint_every_steps",),
                  "density": ("compression",), "key_fraction": ("compression",), "entropy_bins": ("compression",),
                  "warmup_steps": ("compression",)}


def _resumed_options(opts, previous: dict | None, ctx: typer.Context):
    """--resume continues the same run: the previous attempt's options, except those given now."""
    import dataclasses

    if not previous:
        return opts
    fields = {f.name for f in dataclasses.fields(opts)}
    merged = {k: v for k, v in previous.items() if k in fields}
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        for field in _OPTION_FIELDS.get(name, (name,)):
            if field in fields:
                merged[field] = getattr(opts, field)
    return dataclasses.replace(opts, **merged)


def _follow(inv: Inventory, rec, plan: dict, transports, json_out: bool) -> int:
    from rich.markup import escape

    from dsparse_cli import render
    from dsparse_cli.console import err_console, error, info, show, warning
    from dsparse_cli.jobs import records
    from dsparse_cli.jobs.follow import Follower
    from dsparse_cli.jobs.status import stopped_on_request
    from dsparse_cli.jobs.stop import stop_job

    follower = Follower(inv, rec, plan, transports, show_logs=not json_out, live=not json_out)
    try:
        outcome = follower.run()
    except KeyboardInterrupt:
        warning("interrupted: stopping every board of the job")
        stop_job(inv, rec, transports=transports, state=JobState.STOPPED)
        return EXIT_INTERRUPTED
    if outcome.state == JobState.FAILED and stopped_on_request(inv.state_dir, rec):  # `dsparse stop` from elsewhere
        warning(f"job {rec.id} was stopped by `dsparse stop` (resume with `dsparse train --resume`)")
        return EXIT_INTERRUPTED
    if outcome.state == JobState.FAILED:
        # Named as soon as it is known (with the error, on stderr: stdout may be --json); stopping
        # the others can take a while when one of them is cut off.
        error(f"board {outcome.failed_board} failed: {outcome.error}; stopping the other boards "
              "(resume with `dsparse train --resume`)")
        for line in outcome.last_lines:
            err_console.print(f"  [dim]{outcome.failed_board} |[/] {escape(line)}", highlight=False)
        stopped = stop_job(inv, rec, transports=transports, state=JobState.FAILED)
        rec.advance(JobState.FAILED)
        rec.failed_board, rec.error = outcome.failed_board, outcome.error
        records.save(inv.state_dir, rec)
        if json_out:
            print_json(_summary_doc(rec, plan, outcome.rows))
        for res in stopped:
            if not res.ok:
                warning(f"could not stop board {res.name}: {res.error}")
        return EXIT_BOARD_FAILED
    if outcome.lingering:  # every board finished but a process did not exit: end it
        stop_job(inv, rec, transports=transports, state=JobState.FINISHED)
    rec.advance(JobState.FINISHED)
    rec.summary = _summary_doc(rec, plan, outcome.rows)
    rec.summary["model"] = _fetch_model(inv, rec, transports)
    records.save(inv.state_dir, rec)
    if json_out:
        print_json(rec.summary)
    else:
        show(render.train_summary(rec.summary))
        if rec.summary["model"]:
            info(f"trained model: {rec.summary['model']} (deploy it with `dsparse export {rec.id}`)")
    return EXIT_OK


def _fetch_model(inv: Inventory, rec, transports) -> str | None:
    """The trained model copied here; a failed copy is a warning (`dsparse export` retries it)."""
    from dsparse_cli.console import warning
    from dsparse_cli.errors import DsparseError
    from dsparse_cli.jobs.model_back import fetch_model

    try:
        return str(fetch_model(inv, rec, transports))
    except (DsparseError, OSError) as exc:
        warning(f"could not copy the trained model from board {rec.boards[0].name}: {exc}; "
                "`dsparse export` tries again")
        return None


# What the summary repeats from the plan next to each board's measurements.
_PLAN_KEYS = ("budget_bytes", "predicted_training_bytes", "full_update_training_bytes", "predicted_peak_bytes",
              "full_update_peak_bytes")


def _summary_doc(rec, plan: dict, rows: list[dict]) -> dict:
    devices = {d["name"]: d for d in plan["devices"]}
    boards = []
    for r in rows:
        d = devices[r["name"]]
        boards.append({**r, "units": d["units"], **{k: d.get(k) for k in _PLAN_KEYS}})
    accuracy = next((b["accuracy"] for b in boards if b["rank"] == 0), None)
    agg = [b["agg_ms_per_step"] for b in boards if b.get("agg_ms_per_step") is not None]
    return {"job": rec.id, "state": rec.state,
            "failed_board": rec.failed_board, "accuracy": accuracy,
            "agg_ms_per_step": max(agg) if agg else None, "boards": boards}


def _compression_spec(name: str, **given) -> dict:
    """The compressor's name and its `train` options (COMPRESSOR_OPTIONS; none and fp16 have none)."""
    if name not in ("none", "fp16", *COMPRESSOR_OPTIONS):
        raise ConfigError(f"unknown compression {name!r}", "choose none, fp16, topk or pbgc")
    return {"name": name, **{key: given[key] for key in COMPRESSOR_OPTIONS.get(name, ())}}


def _all_cuda(plan: dict) -> bool:
    probe = plan.get("probe") or {}
    return bool(probe) and all(p.get("cuda") for p in probe.values())


def _current_plan(inv: Inventory, *, quiet: bool) -> dict:
    """The plan in .dsparse/plan.json; made on the fly with default options when there is none."""
    from dsparse_cli.console import info
    from dsparse_cli.planning.planfile import load_plan

    path = inv.state_dir / "plan.json"
    if path.exists():
        return load_plan(path, [b.name for b in inv.boards])
    if not quiet:
        info("no plan yet: planning with default options (run `dsparse plan` to choose them)")
    from dsparse_cli.planning.make import make_plan

    return make_plan(inv, quiet=quiet)
