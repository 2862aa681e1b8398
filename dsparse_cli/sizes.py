"""Memory sizes ('2GiB') and link rates ('100mbit') as people write them and as every message and
table shows them."""

from __future__ import annotations

import re

_UNITS = {
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_size(value: str) -> int:
    """'2GiB', '1500MiB', '512M', '2GB', '4096B' -> bytes. K/M/G are binary, KB/MB/GB decimal.
    A number without a unit is refused: `2048` meant 2048 bytes to nobody. Every ValueError's
    message starts with the value, so a caller can put the key's name before it."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).lower() if m and not isinstance(value, bool) else None
    if unit is None or unit and unit not in _UNITS:
        raise ValueError(f"{value} is not a memory size (write a number and a unit: B, KiB, MiB, GiB, KB, MB or GB)")
    if not unit:
        raise ValueError(f"{value} has no unit (write {_suggest(float(m.group(1)))})")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{value} is not more than zero (write the size to allow, e.g. 2GiB)")
    return size


def _suggest(n: float) -> str:
    """What a size without a unit probably meant: 2048 -> '2048MiB or 2GiB', 2 -> '2GiB'."""
    if n < 64:
        return f"{n:g}GiB"
    return f"{n:g}MiB or {n / 1024:g}GiB" if n % 1024 == 0 else f"{n:g}MiB"


_RATES = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,   # tc's names: decimal bits
          "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9,
          "kib/s": 1024, "mib/s": 1024**2, "gib/s": 1024**3}


def parse_rate(value) -> float:
    """'100mbit', '1gbit', '54Mbps', '12.5MB/s' -> bytes per second (a link's rate, one way)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z/]+)\s*", str(value))
    unit = m.group(2).lower() if m and not isinstance(value, bool) else None
    if unit not in _RATES:
        raise ValueError(f"{value} is not a link rate (write a number and a unit: kbit, mbit, gbit, or MB/s)")
    rate = float(m.group(1)) * _RATES[unit]
    if rate <= 0:
        raise ValueError(f"{value} is not more than zero (write the link's rate, e.g. 100mbit)")
    return rate


def format_rate(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "-"
    bits = bytes_per_s * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def format_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
