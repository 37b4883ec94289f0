"""Stage times for the ``min-time`` partitioner: a roofline default cost model and the stage-time oracle.

The cost model interface is :class:`cachefit.partition.records.StageCostModel`
(``layer_time(layer, resident)``, ``transfer_time(nbytes)``); ``cachefit.perf`` provides the
full model, :class:`RooflineCostModel` is the simple default.
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
    transfers are not modelled and take no time).
    """

    onchip_bw: float
    offchip_bw: float
    peak_flops: float
    link_bw: float = 0.0
    link_latency: float = 0.0
    launch_overhead: float = 0.0

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
    """Time of a resident stage ``[a, b)``: ``sum(on-chip layer times) + transfer_time(in_bytes[a])``.

    The first stage's input transfer counts too (the model input reaches stage 0 over a link
    as well), so every stage has the same form. ``core`` = sum of on-chip times (prefix sums of
    non-negative floats are nondecreasing, so ``core`` is monotone under inclusion exactly, not
    only up to rounding), ``x`` = input transfer time, ``y`` = 0.
    """

    def __init__(self, layers: Sequence[LayerRecord], model: StageCostModel):
        self.n = len(layers)
        self.onchip = [float(model.layer_time(l, True)) for l in layers]
        self.offchip = [float(model.layer_time(l, False)) for l in layers]
        self.x = [float(model.transfer_time(l.in_bytes)) for l in layers]
        self.y = [0.0] * self.n
        for name, values in (("layer_time", self.onchip), ("layer_time", self.offchip),
                             ("transfer_time", self.x)):
            if any(not (v >= 0.0) or v == float("inf") for v in values):
                raise PlanError(
                    f"the cost model's {name} returned a negative, infinite or NaN time; "
                    "a stage time must be a finite number of seconds >= 0"
                )
        self.prefix = list(accumulate(self.onchip, initial=0.0))
        # Left extension adds onchip[a-1] + x[a-1] and drops x[a]; right extension adds >= 0.
        self.monotone = all(self.onchip[a - 1] + self.x[a - 1] >= self.x[a] for a in range(1, self.n))

    def core(self, a: int, b: int) -> float:
        return self.prefix[b] - self.prefix[a]

    def cost(self, a: int, b: int) -> float:
        return self.prefix[b] - self.prefix[a] + self.x[a]

    def spill_time(self, layer: int) -> float:
        """Time of a spilling single-layer stage: its off-chip time plus its input transfer."""
        return self.offchip[layer] + self.x[layer]
