"""Stage times for the ``min-time`` partitioner: a roofline default cost model and the stage-time oracle.

The cost model interface is :class:`cachefit.partition.records.StageCostModel`
(``layer_time(layer, resident)``, ``transfer_time(nbytes)``, optionally ``overlap_transfers``);
``cachefit.perf`` provides the full model, :class:`RooflineCostModel` is the simple default.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from ..errors import PlanError
from .footprint import GroupCost
from .records import LayerRecord, StageCostModel


@dataclass(frozen=True)
class RooflineCostModel:
    """Roofline time of a layer: ``max(flops / peak_flops, traffic / bandwidth) + launch_overhead``.

    ``traffic`` is ``layer.bytes_moved`` when recorded, else weights + activations; the
    bandwidth is ``onchip_bw`` when the stage is resident on chip, ``offchip_bw`` when it
    spills. A transfer of ``n > 0`` bytes takes ``link_latency + n / link_bw`` (``link_bw <= 0``:
    transfers are not modelled and take no time). ``overlap_transfers``: a stage's input transfer
    hides behind its compute (stage time ``max(layers, transfer)``, see :class:`StageTime`).
    """

    onchip_bw: float
    offchip_bw: float
    peak_flops: float
    link_bw: float = 0.0
    link_latency: float = 0.0
    launch_overhead: float = 0.0
    overlap_transfers: bool = False

    def layer_time(self, layer: LayerRecord, resident: bool) -> float:
        traffic = layer.bytes_moved or (layer.weight_bytes + layer.activation_bytes)
        bw = self.onchip_bw if resident else self.offchip_bw
        compute = layer.flops / self.peak_flops if self.peak_flops > 0 else 0.0
        memory = traffic / bw if bw > 0 else 0.0
        return max(compute, memory) + self.launch_overhead

    def transfer_time(self, nbytes: int) -> float:
        if nbytes <= 0 or self.link_bw <= 0:
            return 0.0
        return self.link_latency + nbytes / self.link_bw

    @classmethod
    def from_hardware(cls, hw, dtype: str = "float32") -> "RooflineCostModel":
        """From a :class:`cachefit.perf.hardware.Hardware` (peak FLOP/s of ``dtype``)."""
        return cls(
            onchip_bw=float(hw.onchip_bw),
            offchip_bw=float(hw.offchip_bw),
            peak_flops=float(hw.flops_for(dtype)),
            link_bw=float(hw.link_bw),
            link_latency=float(hw.link_latency),
            launch_overhead=float(getattr(hw, "launch_overhead", 0.0)),
        )


def default_cost_model() -> RooflineCostModel:
    """The roofline of the ``h100`` preset (float32), used when ``min-time`` gets no model."""
    from ..perf.hardware import PRESETS

    return RooflineCostModel.from_hardware(PRESETS["h100"])


class StageTime(GroupCost):
    """Time of a resident stage ``[a, b)``: its on-chip layer times and its input transfer.

    ``sum(on-chip layer times) + transfer_time(in_bytes[a])``, or, when the cost model hides
    transfers behind compute (its optional ``overlap_transfers`` attribute is true, see
    :class:`~.records.StageCostModel`), ``max(sum(on-chip layer times), transfer_time(in_bytes[a]))``.

    The first stage's input transfer counts too (the first stage receives the model input from
    the host every micro-batch, as ``cachefit estimate`` counts it), so every stage has the same
    form. ``core`` = sum of on-chip times (prefix sums of non-negative floats are nondecreasing,
    so ``core`` is monotone under inclusion exactly, not only up to rounding); without overlap
    ``x`` = input transfer time, ``y`` = 0; with overlap ``x = y = 0`` and the transfer is a gate
    (``gx``, :class:`~.footprint.GroupCost`), which the searches handle one bound at a time.
    """

    def __init__(self, layers: Sequence[LayerRecord], model: StageCostModel):
        self.n = len(layers)
        self.overlap = bool(getattr(model, "overlap_transfers", False))
        self.onchip = [float(model.layer_time(l, True)) for l in layers]
        self.offchip = [float(model.layer_time(l, False)) for l in layers]
        self.transfers = [float(model.transfer_time(l.in_bytes)) for l in layers]
        for name, values in (("layer_time", self.onchip), ("layer_time", self.offchip),
                             ("transfer_time", self.transfers)):
            if any(not (v >= 0.0) or v == float("inf") for v in values):
                raise PlanError(
                    f"the cost model's {name} returned a negative, infinite or NaN time; "
                    "a stage time must be a finite number of seconds >= 0"
                )
        zeros = [0.0] * self.n
        self.y = zeros
        self.prefix = pre = list(accumulate(self.onchip, initial=0.0))
        if self.overlap:
            self.x = zeros
            self.gx = g = self.transfers
            # Left extension of [a, b) by a-1: the core grows (to at least pre[a+1] - pre[a-1]),
            # the gate changes from g[a] to g[a-1]; right extension only grows the core.
            self.monotone = all(max(pre[a + 1] - pre[a - 1], g[a - 1]) >= g[a] for a in range(1, self.n))
        else:
            self.x = x = self.transfers
            # Left extension adds onchip[a-1] + x[a-1] and drops x[a]; right extension adds >= 0.
            self.monotone = all(self.onchip[a - 1] + x[a - 1] >= x[a] for a in range(1, self.n))

    @property
    def plain_monotone(self) -> bool:
        return True if self.overlap else self.monotone

    def core(self, a: int, b: int) -> float:
        return self.prefix[b] - self.prefix[a]

    def cost(self, a: int, b: int) -> float:
        c = self.prefix[b] - self.prefix[a]
        if self.overlap:
            t = self.transfers[a]
            return c if c >= t else t
        return c + self.transfers[a]

    def transfer(self, a: int) -> float:
        """The input transfer time of a stage starting at layer ``a``."""
        return self.transfers[a]

    def spill_time(self, layer: int) -> float:
        """Time of a spilling single-layer stage: its off-chip time and its input transfer
        (their sum, or their maximum with overlapped transfers)."""
        if self.overlap:
            return max(self.offchip[layer], self.transfers[layer])
        return self.offchip[layer] + self.transfers[layer]
