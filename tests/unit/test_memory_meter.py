"""The worker's meter counts private memory as training memory: an anonymous allocation after the
base point counts (its peak, even once freed), pages mapped from a file do not (runtime/memory.py)."""

from __future__ import annotations

import mmap
import os

import pytest

torch = pytest.importorskip("torch")
from dsparse_cli.runtime.memory import MemoryMeter  # noqa: E402

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")


def test_an_anonymous_peak_counts_and_mapped_file_pages_do_not(tmp_path):
    path = tmp_path / "code.bin"
    path.write_bytes(os.urandom(64 * MiB))   # stands in for torch's libraries
    meter = MemoryMeter(torch.device("cpu"))
    meter.mark_base()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        touched = sum(mapped[i] for i in range(0, len(mapped), 4096))   # every page resident now
        meter.sample()
        block = bytearray(48 * MiB)          # private: written, so every page is resident
        block[::4096] = b"x" * len(block[::4096])
        meter.sample()
        del block
        meter.sample()
        training, process = meter.peak_training_bytes(), meter.peak_process_bytes()
    assert touched >= 0
    assert 48 * MiB <= training < 56 * MiB, training / MiB              # the freed block's peak, no file pages
    assert process >= meter.base_process_bytes + 48 * MiB + 60 * MiB    # the whole process had both
