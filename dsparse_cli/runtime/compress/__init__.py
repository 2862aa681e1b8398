"""Gradient compression for AllReduce buckets: none, fp16, topk (DGC), pbgc, and their registry.

See base.py for the interface and pbgc.py for our reading of PBGC. The registry lives here, not
in base.py, so the base class never imports its subclasses."""

from __future__ import annotations

from dsparse_cli.runtime.compress.base import CompressStats, Compressor, Payload, StatsSnapshot
from dsparse_cli.runtime.compress.fp16 import Fp16Compressor
from dsparse_cli.runtime.compress.none import NoCompression
from dsparse_cli.runtime.compress.pbgc import PBGCCompressor
from dsparse_cli.runtime.compress.topk import TopKCompressor

CLASSES = {c.name: c for c in (NoCompression, Fp16Compressor, TopKCompressor, PBGCCompressor)}
NAMES = tuple(CLASSES)


def make_compressor(spec: dict | None) -> Compressor:
    """{"name": "none"|"fp16"|"topk"|"pbgc", <options>} -> Compressor; None means none. Raises
    ValueError with one line for an unknown name or a bad option."""
    spec = {"name": "none"} if spec is None else spec
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"compression spec must be a mapping with a 'name' "
                         f"({', '.join(NAMES)}), got {spec!r}")
    name = spec["name"]
    if name not in CLASSES:
        raise ValueError(f"unknown compression {name!r} (choose one of {', '.join(NAMES)})")
    return CLASSES[name](**{k: v for k, v in spec.items() if k != "name"})


__all__ = ["NAMES", "CompressStats", "Compressor", "Payload", "StatsSnapshot", "make_compressor"]
