"""`dsparse plan`: measure the model's per-unit costs and give each board a sparse-update plan."""

from __future__ import annotations

import typer

from dsparse_cli.cli.app import AcceptNewOpt, app, done, inventory, options, print_json
from dsparse_cli.errors import EXIT_OK


@app.command()
def plan(
    model: str = typer.Option("mobilenet_v2", help="mobilenet_v2, mobilenet_v3_small, resnet18, shufflenet_v2_x0_5, tiny_cnn."),
    batch_size: int = typer.Option(64, "--batch-size", help="Per-board batch size."),
    image_size: int = typer.Option(32, "--image-size", help="Input height and width."),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes the model's head predicts."),
    optimizer: str = typer.Option("sgd-momentum", help="sgd, sgd-momentum or adam."),
    headroom: float = typer.Option(0.15, help="Fraction of usable memory kept free."),
    sync_every: int = typer.Option(1, "--sync-every", help="Broadcast updated weights every N steps "
                                   "(--objective time: at most every N, per group)."),
    importance: str = typer.Option("depth", help="depth (later layers first) or grad (measured)."),
    objective: str = typer.Option("auto", help="memory (each board trains as much as fits), time (least predicted "
                                  "step: compute + aggregation; needs every board's link: in cluster.yaml or from `probe "
                                  "--links`), or auto: time when every board's link is known, else memory."),
    allow_frozen: bool = typer.Option(False, "--allow-frozen", help="Allow units no board trains (fine-tuning)."),
    exclude_small: bool = typer.Option(False, "--exclude-small", help="Leave out boards too small to train."),
    probe_first: bool = typer.Option(False, "--probe", help="Probe the boards first if the cache is missing or old."),
    push: bool = typer.Option(False, "--push", help="Copy each board's plan to its workdir."),
    verify: bool = typer.Option(False, "--verify", help="Check the plan where it runs: one real training step per "
                                "planned device on its board (SSH boards over SSH, local boards here); show measured "
                                "vs predicted."),
    accept_new_host_keys: bool = AcceptNewOpt,
) -> None:
    """Plan which units each board trains, and the AllReduce/Broadcast groups that aggregate them.

    Budgets and peaks are whole-process bytes: the measured process base plus training memory."""
    from dsparse_cli import render
    from dsparse_cli.console import show
    from dsparse_cli.planning import make

    quiet = options.json
    inv = inventory()
    if probe_first:
        make.probe_if_needed(inv, options.connect_timeout, accept_new_host_keys, quiet)
    doc = make.make_plan(inv, model=model, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
                         optimizer=optimizer, headroom=headroom, sync_every=sync_every, importance=importance,
                         allow_frozen=allow_frozen, exclude_small=exclude_small, objective=objective,
                         quiet=quiet)
    if verify:
        make.verify(inv, doc, options.connect_timeout, accept_new_host_keys, quiet)
    if push:
        make.push(inv, doc, options.connect_timeout, accept_new_host_keys, quiet)
    if options.json:
        print_json(doc)
    else:
        show(render.plan_view(doc))
    done(EXIT_OK)
