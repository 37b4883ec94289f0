"""Device presets: on-chip capacity and bandwidths, peak compute, links. Plain Python."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CachefitError

logger = logging.getLogger(__name__)

TB = 1e12
GB = 1e9


KERNEL_CLASSES = ("elementwise", "transcendental", "norm", "softmax", "move")
"""Classes of non-matmul kernels with a calibrated per-element cost (see :class:`KernelTable`)."""


@dataclass(frozen=True)
class KernelTable:
    """Measured speed of one device's kernels, by kernel class and shape (``cachefit calibrate``).

    matmul_m / matmul_n / matmul_k: the grid of matmul shapes ``[M, K] x [K, N]`` timed (ascending).
    matmul_flops_per_s: FLOP/s of every grid shape, ``m``-major: ``[(i * len(n) + j) * len(k) + l]`` is
                        ``(m[i], n[j], k[l])``. A shape between grid points gets the rate interpolated
                        linearly in log space (``log rate`` over ``log m, log n, log k``); outside the
                        grid the rate of the nearest edge.
    per_element:        kernel class -> seconds per output element of a kernel of that class on its
                        own (``elementwise``: a binary op; ``transcendental``: erf / exp / tanh;
                        ``norm``: layer norm; ``softmax``; ``move``: a transpose).
    fused_per_element:  kernel class -> seconds per element of one more op of that class fused into
                        a kernel (a matmul epilogue, an element-wise chain).
    per_kernel_s:       the fixed cost of one more kernel call inside a VM function.
    call_s:             the fixed cost of one VM function call (once per stage run; for information).
    """

    matmul_m: tuple
    matmul_n: tuple
    matmul_k: tuple
    matmul_flops_per_s: tuple
    per_element: dict = field(default_factory=dict)
    fused_per_element: dict = field(default_factory=dict)
    per_kernel_s: float = 0.0
    call_s: float = 0.0

    def __post_init__(self) -> None:
        dims = (self.matmul_m, self.matmul_n, self.matmul_k)
        if any(len(d) == 0 for d in dims):
            raise CachefitError("a kernel table needs at least one matmul shape per dimension (m, n, k)")
        for label, d in zip("mnk", dims):
            if any(v <= 0 for v in d) or list(d) != sorted(set(d)):
                raise CachefitError(
                    f"kernel table: matmul_{label} = {list(d)} must be positive and strictly ascending"
                )
        want = len(self.matmul_m) * len(self.matmul_n) * len(self.matmul_k)
        if len(self.matmul_flops_per_s) != want:
            raise CachefitError(
                f"kernel table: {len(self.matmul_flops_per_s)} matmul rates for a {len(self.matmul_m)} x "
                f"{len(self.matmul_n)} x {len(self.matmul_k)} grid of shapes ({want} expected); re-run "
                "`cachefit calibrate`"
            )
        if any(r <= 0 for r in self.matmul_flops_per_s):
            raise CachefitError("kernel table: every matmul rate must be positive; re-run `cachefit calibrate`")

    def matmul_rate(self, m: float, n: float, k: float) -> float:
        """FLOP/s of an ``[m, k] x [k, n]`` matmul: log-space (multi)linear interpolation on the grid."""
        import math

        axes = []
        for value, grid in ((m, self.matmul_m), (n, self.matmul_n), (k, self.matmul_k)):
            axes.append(_bracket(math.log(max(float(value), 1e-9)), [math.log(g) for g in grid]))
        nn, nk = len(self.matmul_n), len(self.matmul_k)
        log_rate = 0.0
        for i, wi in axes[0]:
            for j, wj in axes[1]:
                for l, wl in axes[2]:
                    w = wi * wj * wl
                    if w:
                        log_rate += w * math.log(self.matmul_flops_per_s[(i * nn + j) * nk + l])
        return math.exp(log_rate)

    def matmul_seconds(self, m: float, n: float, k: float, batch: float = 1.0) -> float:
        """Seconds of ``batch`` independent ``[m, k] x [k, n]`` matmuls (one kernel call not included)."""
        if m <= 0 or n <= 0 or k <= 0 or batch <= 0:
            return 0.0
        return batch * 2.0 * m * n * k / self.matmul_rate(m, n, k)

    def element_seconds(self, kind: str, elements: float, *, fused: bool = False) -> float:
        """Seconds for ``elements`` output elements of a ``kind`` kernel (or fused op)."""
        table = self.fused_per_element if fused else self.per_element
        if kind not in table:
            kind = "elementwise"
        return elements * table.get(kind, 0.0)

    def to_dict(self) -> dict:
        return {
            "matmul_m": [int(v) for v in self.matmul_m],
            "matmul_n": [int(v) for v in self.matmul_n],
            "matmul_k": [int(v) for v in self.matmul_k],
            "matmul_flops_per_s": [float(v) for v in self.matmul_flops_per_s],
            "per_element": {str(k): float(v) for k, v in self.per_element.items()},
            "fused_per_element": {str(k): float(v) for k, v in self.fused_per_element.items()},
            "per_kernel_s": float(self.per_kernel_s),
            "call_s": float(self.call_s),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "KernelTable":
        try:
            return cls(
                matmul_m=tuple(int(v) for v in d["matmul_m"]),
                matmul_n=tuple(int(v) for v in d["matmul_n"]),
                matmul_k=tuple(int(v) for v in d["matmul_k"]),
                matmul_flops_per_s=tuple(float(v) for v in d["matmul_flops_per_s"]),
                per_element={str(k): float(v) for k, v in dict(d.get("per_element", {})).items()},
                fused_per_element={str(k): float(v) for k, v in dict(d.get("fused_per_element", {})).items()},
                per_kernel_s=float(d.get("per_kernel_s", 0.0)),
                call_s=float(d.get("call_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CachefitError(
                f"malformed kernel table in the hardware description: {exc!r}; expected matmul_m, matmul_n, "
                "matmul_k, matmul_flops_per_s, per_element (re-run `cachefit calibrate` to write a new one)"
            ) from None


def _bracket(x: float, grid: list) -> list:
    """[(index, weight)] of the linear interpolation of ``x`` on the ascending ``grid`` (clamped)."""
    if x <= grid[0] or len(grid) == 1:
        return [(0, 1.0)]
    if x >= grid[-1]:
        return [(len(grid) - 1, 1.0)]
    for i in range(len(grid) - 1):
        lo, hi = grid[i], grid[i + 1]
        if lo <= x <= hi:
            t = (x - lo) / (hi - lo)
            return [(i, 1.0 - t), (i + 1, t)]
    return [(len(grid) - 1, 1.0)]  # unreachable for an ascending grid


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU core group) as the planner and the cost model see it.

    onchip_bytes:       physical on-chip capacity (L2 for GPUs, per-core L2 for a CPU).
    usable_fraction:    the part of it a resident working set may use before bandwidth falls to
                        off-chip level (GPU L2 microbenchmarks: about 0.66-0.8 on H100).
    onchip_bw / offchip_bw: bytes/s when the working set is resident / spills.
    peak_flops:         dtype name -> FLOP/s (dense).
    link_bw, link_latency: device-to-device transfer (bytes/s, seconds). For NVLink presets
                        ``link_bw`` is the datasheet figure (900 GB/s on H100 SXM counts both
                        directions; one direction is half of it): the cost model uses it as the
                        bandwidth of one transfer, so pass a lower figure for a conservative estimate.
    offchip_bytes:      off-chip memory capacity (HBM, or RAM for a CPU); 0 when unknown.
    launch_overhead:    fixed seconds added per layer (kernel launches, VM dispatch); 0 for
                        the GPU presets, measured by ``cachefit calibrate`` for the CPU.
    source:             where the figures come from (``preset``, ``defaults``, ``calibrated ...``).
    memory_overlap:     how far memory traffic hides behind compute in one layer: 1.0 is the
                        roofline ``max(compute, memory)`` (GPUs, many warps in flight); 0.0 adds
                        them (``compute + memory``). Measured by ``cachefit calibrate`` for the CPU.
    kernels:            measured kernel speeds by class and shape (:class:`KernelTable`), from
                        ``cachefit calibrate``; None for the datasheet presets. With it (and the
                        kernels of each layer) the cost model sums per-kernel times instead of
                        dividing a layer's FLOPs by ``peak_flops``.
    """

    name: str
    onchip_bytes: int
    onchip_bw: float
    offchip_bw: float
    peak_flops: dict = field(default_factory=dict)
    link_bw: float = 0.0
    link_latency: float = 0.0
    usable_fraction: float = 1.0
    offchip_bytes: int = 0
    launch_overhead: float = 0.0
    source: str = "preset"
    memory_overlap: float = 1.0
    kernels: KernelTable | None = None

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
        if not 0.0 < fraction <= 1.0:
            raise CachefitError(
                f"usable fraction {fraction} of {self.name}'s on-chip memory is out of range: "
                "give a number in (0, 1], e.g. 0.7"
            )
        return replace(self, usable_fraction=fraction)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "onchip_bytes": int(self.onchip_bytes),
            "onchip_bw": float(self.onchip_bw),
            "offchip_bw": float(self.offchip_bw),
            "peak_flops": {str(k): float(v) for k, v in self.peak_flops.items()},
            "link_bw": float(self.link_bw),
            "link_latency": float(self.link_latency),
            "usable_fraction": float(self.usable_fraction),
            "offchip_bytes": int(self.offchip_bytes),
            "launch_overhead": float(self.launch_overhead),
            "source": self.source,
            "memory_overlap": float(self.memory_overlap),
            **({"kernels": self.kernels.to_dict()} if self.kernels is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        try:
            return cls(
                name=str(d["name"]),
                onchip_bytes=int(d["onchip_bytes"]),
                onchip_bw=float(d["onchip_bw"]),
                offchip_bw=float(d["offchip_bw"]),
                peak_flops={str(k): float(v) for k, v in dict(d.get("peak_flops", {})).items()},
                link_bw=float(d.get("link_bw", 0.0)),
                link_latency=float(d.get("link_latency", 0.0)),
                usable_fraction=float(d.get("usable_fraction", 1.0)),
                offchip_bytes=int(d.get("offchip_bytes", 0)),
                launch_overhead=float(d.get("launch_overhead", 0.0)),
                source=str(d.get("source", "file")),
                memory_overlap=float(d.get("memory_overlap", 1.0)),
                kernels=KernelTable.from_dict(d["kernels"]) if d.get("kernels") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CachefitError(
                f"malformed hardware description: {exc!r}; expected the keys name, onchip_bytes, "
                "onchip_bw, offchip_bw (see `cachefit calibrate` for an example file)"
            ) from None


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
        offchip_bytes=80 * GB,
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
        offchip_bytes=141 * GB,
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
        offchip_bytes=80 * GB,
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


def _cpu_model_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), to tell calibration files of other machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_preset() -> Hardware:
    """This machine's CPU, one core as one device: per-core L2 as the on-chip capacity.

    Bandwidths and FLOPS here are rough defaults; ``cachefit calibrate`` measures them and
    ``get_hardware("cpu")`` prefers the measured file (see :func:`cpu_preset_path`).
    """
    return Hardware(
        name="cpu",
        onchip_bytes=_cpu_l2_bytes(),
        onchip_bw=100 * GB,
        offchip_bw=10 * GB,
        peak_flops={"float32": 50e9, "float16": 50e9, "bfloat16": 50e9},
        link_bw=10 * GB,
        link_latency=5e-6,
        offchip_bytes=_ram_bytes(),
        source="defaults (run `cachefit calibrate` to measure this CPU)",
    )


CPU_PRESET_ENV = "CACHEFIT_CPU_PRESET"


def cpu_preset_path() -> Path:
    """Where ``cachefit calibrate`` stores this CPU's measured preset and ``get_hardware`` reads it.

    ``$CACHEFIT_CPU_PRESET`` if set, else ``$XDG_CACHE_HOME/cachefit/cpu.json`` (``~/.cache``).
    """
    env = os.environ.get(CPU_PRESET_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cachefit" / "cpu.json"


def save_hardware(hw: Hardware, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``hw`` as JSON (plus ``extra`` measurements, ignored when read back)."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = hw.to_dict()
    doc["cpu_model"] = _cpu_model_name() if hw.name == "cpu" else None
    if extra:
        doc["measurements"] = extra
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def load_hardware(path: str | os.PathLike) -> Hardware:
    """Read a hardware description written by :func:`save_hardware` (or by hand)."""
    p = Path(path).expanduser()
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise CachefitError(f"cannot read hardware file {str(p)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CachefitError(f"hardware file {str(p)!r} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise CachefitError(f"hardware file {str(p)!r} must hold a JSON object")
    return Hardware.from_dict(doc)


def calibrated_cpu() -> Hardware | None:
    """The measured CPU preset if a calibration file for *this* processor exists, else None."""
    path = cpu_preset_path()
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        hw = Hardware.from_dict(doc)
    except (OSError, json.JSONDecodeError, CachefitError) as exc:
        logger.warning("ignoring unreadable CPU calibration %s: %s", path, exc)
        return None
    model = doc.get("cpu_model")
    if model and model != _cpu_model_name():
        logger.warning(
            "ignoring CPU calibration %s: it was measured on %r, this machine is %r", path, model, _cpu_model_name()
        )
        return None
    return hw


def get_hardware(name: str) -> Hardware:
    """A preset by name (``h100``, ``h200``, ``a100``, ``cpu``) or a hardware JSON file's path.

    ``cpu`` is the calibrated preset of this machine when ``cachefit calibrate`` has stored one,
    else :func:`cpu_preset`'s defaults.
    """
    key = name.strip().lower()
    if key == "cpu":
        return calibrated_cpu() or cpu_preset()
    if key in PRESETS:
        return PRESETS[key]
    if key.endswith(".json") or os.sep in name:
        return load_hardware(name)
    raise CachefitError(
        f"unknown hardware preset {name!r}; known: {', '.join(sorted([*PRESETS, 'cpu']))}, "
        "or the path of a hardware .json file"
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
