"""The weights bench/edge.py fine-tunes from: a model trained on another task, digits 0-4.

    python bench/peers/pretrain.py --model mobilenet_v2 --image-size 64 --steps 150 --out pretrained.pt

One process, dsparse's own model, data (the digits train split, only labels 0-4), optimizer and
schedule; writes the state dict (a 5-class head: fine-tuning on all ten digits re-initialises it,
as `dsparse train --weights` and the DDP peer's `--weights` do).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dsparse_cli.runtime import data as datamod  # noqa: E402
from dsparse_cli.runtime.job_setup import lr_at  # noqa: E402
from dsparse_cli.runtime.models import build_model  # noqa: E402
from dsparse_cli.runtime.sparse import make_optimizer  # noqa: E402

CLASSES = 5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    ds = datamod.load_dataset("digits", image_size=args.image_size, seed=args.seed)
    _, labels = ds.train.fetch(torch.arange(ds.train.size))
    low = torch.nonzero(labels < CLASSES).flatten()
    model = build_model(args.model, CLASSES)
    opt = make_optimizer("sgd-momentum", list(model.parameters()), args.lr)
    model.train()
    t0, gen = time.time(), torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at("cosine", args.lr, step, args.steps)
        x, y = ds.train.fetch(low[torch.randint(len(low), (args.batch_size,), generator=gen)])
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"pretrained {args.model} on digits 0-{CLASSES - 1}: {args.steps} steps, last loss {float(loss):.3f}, "
          f"{time.time() - t0:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
