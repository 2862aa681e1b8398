"""Gradient compression for AllReduce buckets: none, fp16, topk (DGC), pbgc.

See base.py for the interface and pbgc.py for our reading of PBGC."""

from dsparse_cli.runtime.compress.base import (NAMES, CompressStats, Compressor, Payload,
                                               StatsSnapshot, make_compressor)

__all__ = ["NAMES", "CompressStats", "Compressor", "Payload", "StatsSnapshot", "make_compressor"]
