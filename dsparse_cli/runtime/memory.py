"""Peak training memory: what training adds on top of the process base.

* CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at the base point,
  minus `memory_allocated` at that point.
* CPU: the peak of the process's *private* resident memory (RSS less RssFile: anonymous and
  shared-memory pages) above its value at the base point. File-backed pages (torch's code,
  mapped as the first step first runs it) are left out: how many pages a touched page maps
  depends on what the page cache holds around it (the kernel's fault-around), so the same step
  maps 18 MiB on one machine and 37 MiB on another, and they are pages the cache holds anyway.
  The kernel keeps the peak of the whole RSS (VmHWM), not of its private part, so `sample`
  reads VmHWM less the RssFile of that moment after every step and resets VmHWM through
  /proc/self/clear_refs ("5"); code pages are mapped in the first steps only, so between two
  samples RssFile barely moves. Where the reset is refused the peak is the process's lifetime
  peak (an over-estimate only if something before the base was larger).
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


def _status_kib(*fields: str) -> list[int | None]:
    found: dict[str, int] = {}
    try:
        with open(STATUS) as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in fields:
                    found[name] = int(rest.split()[0])
    except OSError:
        pass
    return [found.get(f) for f in fields]


def current_rss() -> int:
    kib, = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()  # best we have without /proc


def private_rss() -> int:
    """Resident bytes that are not file-backed (anonymous and shared memory)."""
    rss, file = _status_kib("VmRSS", "RssFile")
    return (rss - (file or 0)) * 1024 if rss is not None else peak_rss()


def peak_rss() -> int:
    kib, = _status_kib("VmHWM")
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
        self.base_bytes = 0            # private (CUDA: allocated) bytes at the base point
        self.base_process_bytes = 0    # the whole RSS there
        self.resettable = False
        self._peak_private = 0
        self._peak_process = 0

    def mark_base(self) -> None:
        """Call right before the first training step."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.resettable = reset_peak_rss()
            self.base_bytes = self._peak_private = private_rss()
        self.base_process_bytes = self._peak_process = current_rss()

    def sample(self) -> None:
        """Fold the peak since the last sample in (call after every step); starts the next one."""
        hwm, rss, file = _status_kib("VmHWM", "VmRSS", "RssFile")
        if hwm is None:
            self._peak_process = max(self._peak_process, peak_rss())
            self._peak_private = max(self._peak_private, self._peak_process)
            return
        self._peak_process = max(self._peak_process, hwm * 1024)
        self._peak_private = max(self._peak_private, (max(hwm, rss or 0) - (file or 0)) * 1024)
        if self.resettable:
            reset_peak_rss()

    def peak_process_bytes(self) -> int:
        """Whole-process peak RSS (host memory; on a Jetson that includes unified GPU memory)."""
        self.sample()
        return self._peak_process

    def peak_training_bytes(self) -> int:
        """Peak memory above the base point."""
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base_bytes)
        self.sample()
        return max(0, self._peak_private - self.base_bytes)

    def report(self) -> dict:
        return {"peak_memory_bytes": self.peak_training_bytes(), "base_memory_bytes": self.base_process_bytes,
                "peak_process_bytes": self.peak_process_bytes()}
