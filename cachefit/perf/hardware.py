"""Device presets: on-chip capacity and bandwidths, peak compute, links. Plain Python."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CachefitError

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU core group) as the planner and the cost model see it.

    onchip_bytes:       physical on-chip capacity (L2 for GPUs, per-core L2 for a CPU).
    usable_fraction:    the part of it a resident working set may use before bandwidth falls to
                        off-chip level (GPU L2 microbenchmarks: about 0.66-0.8 on H100).
    onchip_bw / offchip_bw: bytes/s when the working set is resident / spills.
    peak_flops:         dtype name -> FLOP/s (dense).
    link_bw, link_latency: device-to-device transfer (bytes/s, seconds).
    """

    name: str
    onchip_bytes: int
    onchip_bw: float
    offchip_bw: float
    peak_flops: dict = field(default_factory=dict)
    link_bw: float = 0.0
    link_latency: float = 0.0
    usable_fraction: float = 1.0

    @property
    def capacity_bytes(self) -> int:
        """The capacity C used for planning: the usable part of on-chip memory."""
        return int(self.onchip_bytes * self.usable_fraction)

    def flops_for(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        aliases = {"float16": "bfloat16", "bfloat16": "float16", "float32": "tf32"}
        if aliases.get(dtype) in self.peak_flops:
            return self.peak_flops[aliases[dtype]]
        return max(self.peak_flops.values()) if self.peak_flops else 1.0

    def with_usable_fraction(self, fraction: float) -> "Hardware":
        return replace(self, usable_fraction=fraction)


MB = 1_000_000

# Public datasheet figures; L2 bandwidths from published microbenchmarks (see docs/paper-check.md).
PRESETS: dict[str, Hardware] = {
    "h100": Hardware(
        name="h100",
        onchip_bytes=50 * MB,
        onchip_bw=7.0 * TB,
        offchip_bw=3.35 * TB,
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12,
                    "int8": 1979e12, "float8": 1979e12},
        link_bw=900 * GB,
        link_latency=2e-6,
    ),
    "h200": Hardware(
        name="h200",
        onchip_bytes=50 * MB,
        onchip_bw=7.0 * TB,
        offchip_bw=4.8 * TB,
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12,
                    "int8": 1979e12, "float8": 1979e12},
        link_bw=900 * GB,
        link_latency=2e-6,
    ),
    "a100": Hardware(
        name="a100",
        onchip_bytes=40 * MB,
        onchip_bw=5.0 * TB,
        offchip_bw=2.0 * TB,
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12,
                    "int8": 624e12},
        link_bw=600 * GB,
        link_latency=2e-6,
    ),
}


def _cpu_l2_bytes() -> int:
    """Per-core L2 of this machine, read from sysfs (falls back to 1 MiB)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            level = (idx / "level").read_text().strip()
            ctype = (idx / "type").read_text().strip()
            if level == "2" and ctype in ("Unified", "Data"):
                return parse_size((idx / "size").read_text().strip())
    except OSError:
        pass
    return 1 << 20


def cpu_preset() -> Hardware:
    """This machine's CPU, one core as one device: per-core L2 as the on-chip capacity.

    Bandwidths and FLOPS here are rough defaults; ``cachefit calibrate`` measures them.
    """
    return Hardware(
        name="cpu",
        onchip_bytes=_cpu_l2_bytes(),
        onchip_bw=100 * GB,
        offchip_bw=10 * GB,
        peak_flops={"float32": 50e9, "float16": 50e9, "bfloat16": 50e9},
        link_bw=10 * GB,
        link_latency=5e-6,
    )


def get_hardware(name: str) -> Hardware:
    key = name.strip().lower()
    if key == "cpu":
        return cpu_preset()
    if key in PRESETS:
        return PRESETS[key]
    raise CachefitError(
        f"unknown hardware preset {name!r}; known: {', '.join(sorted([*PRESETS, 'cpu']))}"
    )


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Parse a byte size with an optional unit: ``50MB``, ``48K``, ``1.5 GiB``, ``4096``.

    SI units (KB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers of 1024;
    sysfs-style ``48K`` is read as KiB.
    """
    import re

    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", s)
    if not m:
        raise CachefitError(f"malformed size {text!r}: expected a number with an optional unit, e.g. 50MB or 48KiB")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("k", "m", "g") and s.endswith(m.group(2)) and m.group(2).isupper():
        # sysfs writes 2048K meaning KiB
        unit = unit + "ib"
    if unit not in _UNITS:
        raise CachefitError(
            f"malformed size {text!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB)"
        )
    return int(round(value * _UNITS[unit]))


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
