"""`dsparse export`: the trained model of a finished job as a file to deploy."""

from __future__ import annotations

from typing import Optional

import typer

from dsparse_cli.cli.app import app, done, options, print_json
from dsparse_cli.errors import EXIT_OK, ConfigError

FORMATS = ("torchscript", "state_dict")


@app.command()
def export(
    job: Optional[str] = typer.Argument(None, metavar="[JOB]", help="Job id (default: the latest job)."),
    format: str = typer.Option("torchscript", "--format", help="torchscript (runs without dsparse or the model's "
                               "code) or state_dict (load into the model yourself)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="File to write (default: next to the job's model.pt)."),
) -> None:
    """Write a finished job's trained model as a deployable file, with its model.json (classes,
    image size, normalisation) beside it."""
    import shutil
    from pathlib import Path

    from dsparse_cli.console import success
    from dsparse_cli.contract import MODEL_SIDECAR as SIDECAR
    from dsparse_cli.jobs.model_back import local_model
    from dsparse_cli.jobs.reach import open_job

    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}", f"choose {' or '.join(FORMATS)}")
    inv, rec = open_job(job, options.cluster)
    src = local_model(inv, rec, options.connect_timeout)
    dest = Path(out) if out else src.with_name("model.ts" if format == "torchscript" else "model.state_dict.pt")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write(src, dest, format)
    sidecar = dest.with_suffix(".json")
    if sidecar != src.with_name(SIDECAR):
        shutil.copyfile(src.with_name(SIDECAR), sidecar)
    if options.json:
        print_json({"job": rec.id, "format": format, "file": str(dest), "meta": str(sidecar)})
    else:
        success(f"job {rec.id}: {format} model written to {dest} (classes and input size in {sidecar})")
    done(EXIT_OK)


def _write(src, dest, format: str) -> None:
    """TorchScript by tracing one input of the model's size (works for any feed-forward model)."""
    import torch

    from dsparse_cli.runtime.model_out import ModelFileError, load_model

    try:
        model, meta = load_model(str(src))
    except ModelFileError as exc:
        raise ConfigError(str(exc)) from None
    if format == "state_dict":
        torch.save(model.state_dict(), dest)
        return
    size = int(meta["image_size"])
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, 3, size, size))
    traced.save(str(dest))
