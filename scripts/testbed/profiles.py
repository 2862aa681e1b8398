"""Board profiles: memory budget, CPU allowance and link per emulated board (scaling table in
docs/testbed.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TestbedError

MiB = 1 << 20
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": MiB, "mib": MiB, "g": 1 << 30,
               "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIME_UNITS = {"ms": 1.0, "us": 0.001, "s": 1000.0}


@dataclass(frozen=True)
class BoardSpec:
    memory: int            # bytes
    rate_bps: int          # bits per second, each direction
    delay_ms: float        # one-way latency of the board's link, each direction
    loss_pct: float = 0.0  # per direction
    emulates: str = ""     # what real board this stands for (a comment in cluster.yaml)
    cpus: float | None = None  # CPU allowance (a cgroup quota, in CPUs); None: unlimited


# paper7: a mixed Jetson / Raspberry Pi / x86 lab scaled to a 24 GiB, 2-core machine.
# budget = 1600 MiB (what every board pays before training: the worker's process base, 0.7-1.0
# GiB with the CUDA build of torch, torchrun's agent, ~0.3 GiB, and the plan's 15 % headroom)
# + 32 MiB per real GiB;
# link rates are a quarter of the real link (GbE -> 250mbit, Wi-Fi 5 ~200 Mbit/s -> 50mbit,
# weak Wi-Fi ~100 Mbit/s -> 25mbit); delays are the real one-way latencies, unscaled;
# CPU allowance = 0.05 CPU per real core (34 cores -> 1.7 CPUs, leaving the rest of the 2 cores to
# the link emulator and the control side), so a board's speed is its own quota, not contention.
PAPER7 = [
    ("Jetson AGX Orin 32GB, GbE", 32, 8, "250mbit", 0.5),
    ("Jetson Xavier NX 8GB, GbE", 8, 6, "250mbit", 1.0),
    ("Jetson Nano 4GB, GbE", 4, 4, "250mbit", 1.0),
    ("x86 NUC 16GB, GbE", 16, 4, "250mbit", 0.2),
    ("Raspberry Pi 4 8GB, Wi-Fi 5", 8, 4, "50mbit", 2.0),
    ("Raspberry Pi 4 4GB, Wi-Fi 5", 4, 4, "50mbit", 2.0),
    ("Raspberry Pi 4 2GB, Wi-Fi 5 (far)", 2, 4, "25mbit", 3.0),
]
BASE_MIB, MIB_PER_GIB = 1600, 32
CPU_PER_CORE = 0.05
MIN_CPUS = 0.01            # the kernel's smallest quota: 1 ms per 100 ms period


def paper7_memory(real_gib: int) -> int:
    return (BASE_MIB + MIB_PER_GIB * real_gib) * MiB


def boards_for(profile: str, n: int | None, memory: str, rate: str, delay: str,
               loss: float, cpus: str | None = None) -> list[BoardSpec]:
    if profile == "uniform":
        if not n:
            raise TestbedError("--boards N is required with --profile uniform", 2)
        spec = BoardSpec(parse_size(memory), parse_rate(rate), parse_delay(delay), loss,
                         cpus=parse_cpus(cpus) if cpus is not None else None)
        return [spec] * n
    if profile == "paper7":
        if n not in (None, len(PAPER7)):
            raise TestbedError(f"--profile paper7 has {len(PAPER7)} boards; drop --boards or use "
                               f"--boards {len(PAPER7)}", 2)
        if cpus is not None:
            raise TestbedError("--profile paper7 sets each board's CPUs; drop --cpus", 2)
        return [BoardSpec(paper7_memory(gib), parse_rate(r), d, loss, what, round(cores * CPU_PER_CORE, 2))
                for what, gib, cores, r, d in PAPER7]
    raise TestbedError(f"unknown profile {profile!r} (uniform, paper7)", 2)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise TestbedError(f"bad memory size {text!r} (e.g. 1200MiB, 2GiB)", 2)
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not MIN_CPUS <= value < float("inf"):
        raise TestbedError(f"bad CPU allowance {text!r} (CPUs, at least {MIN_CPUS}: e.g. 0.5, 2)", 2)
    return value


def parse_rate(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _RATE_UNITS:
        raise TestbedError(f"bad rate {text!r} (e.g. 100mbit, 1gbit, 512kbit)", 2)
    return int(float(m.group(1)) * _RATE_UNITS[unit])


def parse_delay(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|us|s)?\s*", str(text))
    if not m:
        raise TestbedError(f"bad delay {text!r} (e.g. 5ms, 0.2ms)", 2)
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "ms"]


def format_rate(bps: int) -> str:
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps >= scale and bps % scale == 0:
            return f"{bps // scale}{unit}"
    return f"{bps}bit"
