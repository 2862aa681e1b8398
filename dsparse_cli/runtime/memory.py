"""Peak training memory: what training adds on top of the process base.

* CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at the base point,
  minus `memory_allocated` at that point.
* CPU: the kernel's peak RSS (VmHWM in /proc/self/status) minus the RSS at the base point.
  Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS, so a spike before the
  base point (data loading, imports) does not count. Where that is refused the peak is the
  process's lifetime peak (an over-estimate only if something before the base was larger).
* No /proc (not Linux): `resource.getrusage` max RSS, not resettable.

The base point is taken after model, data, optimizer and process groups exist, right before the
first training step: the same split the planner's profile makes (base vs training bytes).
"""

from __future__ import annotations

import gc
import resource
import sys

import torch

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss()  # best we have without /proc


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """-> True when the kernel reset VmHWM to the current RSS."""
    try:
        with open(CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.base_bytes = 0
        self.base_process_bytes = 0
        self.resettable = False

    def mark_base(self) -> None:
        """Call right before the first training step."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.resettable = reset_peak_rss()
            self.base_bytes = current_rss()
        self.base_process_bytes = current_rss()

    def peak_process_bytes(self) -> int:
        """Whole-process peak RSS (host memory; on a Jetson that includes unified GPU memory)."""
        return peak_rss()

    def peak_training_bytes(self) -> int:
        """Peak memory above the base point."""
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base_bytes)
        return max(0, peak_rss() - self.base_bytes)

    def report(self) -> dict:
        return {"peak_memory_bytes": self.peak_training_bytes(), "base_memory_bytes": self.base_bytes,
                "peak_process_bytes": self.peak_process_bytes()}
