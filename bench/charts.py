"""PNG charts of a bench/edge.py run for BENCHMARKS.md (needs the `bench` extra: matplotlib).

    .venv/bin/python bench/charts.py [bench/results/edge.json] [--out docs/bench]

Writes STEM-memory.png (whole-process peak and training memory per board and method),
STEM-time.png (step time of the slowest board per method, with the part measured as aggregation:
DDP's exposed part for the peers) and STEM-accuracy.png (accuracy at each epoch's end over the training seconds so far,
with the target as a line; empty for results written before `history` existed), STEM being the
results file's name (edge, edge-paper7, edge-uniform7).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench/charts.py needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def memory_chart(plt, doc: dict, path: Path) -> None:
    methods = doc["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for k, key, ax, title in ((0, "peak_process_bytes", axes[0], "whole-process peak (MiB)"),
                              (1, "peak_training_bytes", axes[1], "training memory (MiB)")):
        for i, m in enumerate(methods):
            vals = [(b.get(key) or 0) / MiB for b in m["boards"]]
            ax.bar([j + i * width for j in range(len(vals))], vals, width, label=m["name"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods[0]["boards"]))],
                      [f"b{j}" for j in range(len(methods[0]["boards"]))])
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_chart(plt, doc: dict, path: Path) -> None:
    methods = doc["methods"]
    names = [m["name"] for m in methods]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [m["step_ms"] for m in methods], label="step (slowest board)", color="#9bb7d4")
    ax.bar(names, [m["agg_ms_per_step"] or 0 for m in methods], width=0.4, label="of it aggregation (DDP: exposed)",
           color="#d48c5b")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_chart(plt, doc: dict, path: Path) -> None:
    """Accuracy at each epoch's end over the training seconds so far; the target as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in doc["methods"]:
        h = [x for x in m.get("history") or [] if x.get("train_s") is not None and x.get("accuracy") is not None]
        if h:
            ax.plot([x["train_s"] for x in h], [100 * x["accuracy"] for x in h], marker="o", ms=3, label=m["name"])
    if doc.get("target_accuracy") is not None:
        ax.axhline(100 * doc["target_accuracy"], color="grey", ls="--", lw=0.8, label="target")
    ax.set_xlabel("training s (evaluation and start-up excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", type=Path, default=REPO / "bench" / "results" / "edge.json")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text())
    plt = _plt()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.results.stem
    for name, chart in (("memory", memory_chart), ("time", time_chart), ("accuracy", accuracy_chart)):
        chart(plt, doc, args.out / f"{stem}-{name}.png")
    print(f"wrote {stem}-memory.png, {stem}-time.png, {stem}-accuracy.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
