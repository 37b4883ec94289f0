"""The roofline-with-residency cost model: per-layer and per-stage time, pipeline throughput and TPOT.

Plain Python on :class:`~cachefit.partition.records.LayerRecord`s and a
:class:`~cachefit.perf.hardware.Hardware` preset; no TVM.

The model, in full (every figure is for one micro-batch through one device):

* **Layer time** = ``max(compute, memory) + launch_overhead`` (a roofline per layer, so a stage
  mixing compute-bound and memory-bound layers is not averaged into one regime); with a
  hardware ``memory_overlap`` below 1 the smaller of the two is partly added
  (``max + (1 - overlap) * min``: a single CPU core does not hide its cache misses behind compute).

  - compute = ``flops / (peak_flops[dtype] * compute_efficiency)``;
  - memory = weight traffic + activation traffic, each at the bandwidth of where it lives:

    ========================  =====================  ===========================================
    stage                     weights read at        activations read/written at
    ========================  =====================  ===========================================
    resident (footprint<=C)   on-chip bandwidth      on-chip bandwidth
    spilling (footprint>C)    off-chip bandwidth     on-chip if the layer's own working set
                                                     (activations + buffers) <= C, else off-chip
    ========================  =====================  ===========================================

    Weight traffic is ``weight_bytes``; activation traffic is ``bytes_moved - weight_bytes``
    (or ``in_bytes + out_bytes`` when the record carries no ``bytes_moved``). A spilling stage gets
    no partial credit for the part of its weights that would fit: cycling through a weight set
    larger than an LRU cache hits almost never.

* **Stage time** = sum of its layers' times + tensor-parallel all-reduces (baselines only) +
  the incoming transfer ``link_latency + in_bytes / link_bw`` (stage 0 receives nothing). With
  ``overlap_transfers=True`` the transfer hides behind compute: ``max(compute part, transfer)``.
* **Pipeline**: with ``M`` micro-batches in flight (default: one per stage) a micro-batch comes back
  every ``round_trip = max(sum of stage times, M * bottleneck)``; throughput =
  ``M * tokens_per_microbatch / round_trip`` (= ``tokens_per_microbatch / bottleneck`` when
  ``M`` >= the number of stages) and the time per output token (TPOT) of one sequence is the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from ..errors import CachefitError, PlanError
from ..partition.records import LayerRecord
from .hardware import Hardware

_DTYPE_FOR_BITS = {32: "float32", 16: "bfloat16", 8: "bfloat16", 4: "bfloat16"}


@dataclass(frozen=True)
class LayerCost:
    """Where one layer's time goes, in seconds, for one micro-batch.

    ``overlap`` (the hardware's ``memory_overlap``): 1.0 gives the roofline
    ``max(compute, memory)``, 0.0 the sum; in between ``max + (1 - overlap) * min``.
    """

    name: str
    compute_s: float
    weight_s: float
    activation_s: float
    overhead_s: float = 0.0
    overlap: float = 1.0

    @property
    def memory_s(self) -> float:
        return self.weight_s + self.activation_s

    @property
    def time_s(self) -> float:
        hi, lo = max(self.compute_s, self.memory_s), min(self.compute_s, self.memory_s)
        return hi + (1.0 - self.overlap) * lo + self.overhead_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class Footprint:
    """A stage's bytes on one device: weights + peak working set + boundary tensors."""

    weight_bytes: int
    working_set_bytes: int
    boundary_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.working_set_bytes + self.boundary_bytes


def stage_footprint(layers: Sequence[LayerRecord]) -> Footprint:
    """The group footprint of the partitioner (:func:`cachefit.partition.group_footprint`, exact
    mode): weights with a shared parameter counted once, the peak (not the sum) of the layers'
    activation + buffer working sets, plus the group's incoming and outgoing boundary tensors."""
    from ..partition.footprint import group_footprint

    if not layers:
        raise PlanError("a stage with no layers has no footprint; every stage needs at least one layer")
    fp = group_footprint(list(layers), "exact")
    return Footprint(int(fp.weight_bytes), int(fp.activation_bytes + fp.buffer_bytes),
                     int(fp.in_bytes + fp.out_bytes))


def activation_traffic(layer: LayerRecord) -> int:
    """Bytes of activations a layer reads and writes (its traffic besides the weights)."""
    if layer.bytes_moved > 0:
        return max(layer.bytes_moved - layer.weight_bytes, 0)
    return layer.in_bytes + layer.out_bytes


@dataclass(frozen=True)
class CostModel:
    """Roofline-with-residency timings on one device preset (implements ``StageCostModel``).

    hardware:            the device (its ``capacity_bytes`` decides residency).
    dtype:               compute dtype for the peak FLOP/s (``bfloat16``, ``float32``, ``int8``...);
                         None picks it from each layer's ``weight_bits`` (32 -> float32, else bfloat16,
                         as weight-only quantized kernels compute in 16 bits).
    compute_efficiency:  the fraction of peak FLOP/s the kernels reach (1.0 = datasheet peak).
    bandwidth_efficiency: the fraction of the nominal bandwidths reached.
    overlap_transfers:   hide a stage's incoming transfer behind its compute.
    overlap_allreduce:   hide tensor-parallel all-reduces behind compute (baselines): a stage takes
                         ``max(layers, all-reduces)`` instead of their sum, the best case of
                         communication/computation overlap.
    """

    hardware: Hardware
    dtype: str | None = None
    compute_efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    overlap_transfers: bool = False
    overlap_allreduce: bool = False

    def __post_init__(self) -> None:
        for label, value in (("compute_efficiency", self.compute_efficiency),
                             ("bandwidth_efficiency", self.bandwidth_efficiency)):
            if not 0.0 < value <= 1.0:
                raise CachefitError(f"{label}={value} is out of range: give a fraction in (0, 1], e.g. 0.7")

    # --- the StageCostModel protocol -------------------------------------------------------------
    def layer_time(self, layer: LayerRecord, resident: bool) -> float:
        """Seconds for one micro-batch through ``layer`` in a resident (or spilling) stage."""
        return self.layer_cost(layer, resident).time_s

    def transfer_time(self, nbytes: int) -> float:
        """Seconds to receive ``nbytes`` over the link: latency + bytes / bandwidth (0 for 0 bytes)."""
        if nbytes <= 0:
            return 0.0
        hw = self.hardware
        if hw.link_bw <= 0:
            raise CachefitError(
                f"hardware {hw.name!r} has no link bandwidth, so a {nbytes}-byte stage transfer cannot be "
                "timed; give link_bw in its description"
            )
        return hw.link_latency + nbytes / (hw.link_bw * self.bandwidth_efficiency)

    # --- details ---------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.hardware.capacity_bytes

    def compute_dtype(self, layer: LayerRecord) -> str:
        return self.dtype or _DTYPE_FOR_BITS.get(layer.weight_bits, "bfloat16")

    def peak_flops(self, layer: LayerRecord) -> float:
        return self.hardware.flops_for(self.compute_dtype(layer)) * self.compute_efficiency

    def layer_cost(self, layer: LayerRecord, resident: bool) -> LayerCost:
        hw = self.hardware
        on_bw = hw.onchip_bw * self.bandwidth_efficiency
        off_bw = hw.offchip_bw * self.bandwidth_efficiency
        compute = layer.flops / self.peak_flops(layer) if layer.flops else 0.0
        weight_bw = on_bw if resident else off_bw
        acts_on_chip = resident or layer.working_set_bytes <= self.capacity_bytes
        act_bw = on_bw if acts_on_chip else off_bw
        return LayerCost(
            name=layer.name,
            compute_s=compute,
            weight_s=layer.weight_bytes / weight_bw,
            activation_s=activation_traffic(layer) / act_bw,
            overhead_s=hw.launch_overhead,
            overlap=hw.memory_overlap,
        )

    def allreduce_time(self, nbytes: int, ranks: int) -> float:
        """Ring all-reduce of ``nbytes`` over ``ranks`` devices: 2(r-1) steps, each sending
        ``nbytes / r`` over one link: ``2 (r-1) latency + 2 (r-1)/r * nbytes / link_bw``."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        hw = self.hardware
        if hw.link_bw <= 0:
            raise CachefitError(f"hardware {hw.name!r} has no link bandwidth: an all-reduce cannot be timed")
        steps = 2 * (ranks - 1)
        return steps * hw.link_latency + steps / ranks * nbytes / (hw.link_bw * self.bandwidth_efficiency)


@dataclass
class StageEstimate:
    """One pipeline stage as the model sees it (per device; ``tp`` devices when tensor parallel)."""

    index: int
    first_layer: int
    last_layer: int
    footprint: Footprint
    capacity_bytes: int
    resident: bool
    layer_costs: list[LayerCost]
    transfer_s: float
    comm_s: float = 0.0
    tp: int = 1
    overlap_transfers: bool = False
    overlap_comm: bool = False

    @property
    def compute_s(self) -> float:
        return sum(c.compute_s for c in self.layer_costs)

    @property
    def memory_s(self) -> float:
        return sum(c.memory_s for c in self.layer_costs)

    @property
    def layers_s(self) -> float:
        return sum(c.time_s for c in self.layer_costs)

    @property
    def time_s(self) -> float:
        work = max(self.layers_s, self.comm_s) if self.overlap_comm else self.layers_s + self.comm_s
        if self.overlap_transfers:
            return max(work, self.transfer_s)
        return work + self.transfer_s

    @property
    def resident_fraction(self) -> float:
        """The part of the footprint that fits on chip (1.0 when resident)."""
        total = self.footprint.total_bytes
        return 1.0 if total <= self.capacity_bytes else self.capacity_bytes / total

    @property
    def bound(self) -> str:
        parts = {"compute": sum(c.compute_s for c in self.layer_costs if c.bound == "compute"),
                 "memory": sum(c.memory_s for c in self.layer_costs if c.bound == "memory"),
                 "communication": self.comm_s + (0.0 if self.overlap_transfers else self.transfer_s)}
        return max(parts, key=parts.get)

    def to_dict(self) -> dict:
        return {
            "stage": self.index,
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "tp": self.tp,
            "weight_bytes": self.footprint.weight_bytes,
            "working_set_bytes": self.footprint.working_set_bytes,
            "boundary_bytes": self.footprint.boundary_bytes,
            "footprint_bytes": self.footprint.total_bytes,
            "capacity_bytes": self.capacity_bytes,
            "resident": self.resident,
            "resident_fraction": self.resident_fraction,
            "compute_s": self.compute_s,
            "memory_s": self.memory_s,
            "comm_s": self.comm_s,
            "transfer_s": self.transfer_s,
            "time_s": self.time_s,
            "bound": self.bound,
        }


@dataclass
class PipelineEstimate:
    """A whole plan's predicted performance."""

    name: str
    hardware: str
    stages: list[StageEstimate]
    tokens_per_microbatch: float
    microbatches_in_flight: int
    devices: int
    assumptions: dict = field(default_factory=dict)

    @property
    def stage_times(self) -> list[float]:
        return [s.time_s for s in self.stages]

    @property
    def bottleneck_s(self) -> float:
        return max(self.stage_times)

    @property
    def bottleneck_stage(self) -> int:
        times = self.stage_times
        return times.index(max(times))

    @property
    def latency_s(self) -> float:
        """One micro-batch through an empty pipeline: the sum of the stage times."""
        return sum(self.stage_times)

    @property
    def round_trip_s(self) -> float:
        """How often a given micro-batch comes back with ``M`` micro-batches in flight."""
        return max(self.latency_s, self.microbatches_in_flight * self.bottleneck_s)

    @property
    def tokens_per_s(self) -> float:
        return self.microbatches_in_flight * self.tokens_per_microbatch / self.round_trip_s

    @property
    def tpot_s(self) -> float:
        """Time per output token of one sequence: one full round trip per decoding step."""
        return self.round_trip_s

    @property
    def resident_stages(self) -> int:
        return sum(1 for s in self.stages if s.resident)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hardware": self.hardware,
            "devices": self.devices,
            "tokens_per_microbatch": self.tokens_per_microbatch,
            "microbatches_in_flight": self.microbatches_in_flight,
            "bottleneck_stage": self.bottleneck_stage,
            "bottleneck_s": self.bottleneck_s,
            "latency_s": self.latency_s,
            "tpot_s": self.tpot_s,
            "tokens_per_s": self.tokens_per_s,
            "resident_stages": self.resident_stages,
            "assumptions": dict(self.assumptions),
            "stages": [s.to_dict() for s in self.stages],
        }


def check_groups(groups: Sequence[tuple[int, int]], n_layers: int) -> list[tuple[int, int]]:
    """Validate contiguous, in-order groups covering ``0..n_layers-1`` exactly once."""
    out = [(int(a), int(b)) for a, b in groups]
    expect = 0
    for i, (a, b) in enumerate(out):
        if a != expect or b < a:
            raise PlanError(
                f"stage {i} covers layers {a}..{b}, but the next uncovered layer is {expect}: stages must "
                "be contiguous, in order and non-empty"
            )
        expect = b + 1
    if expect != n_layers:
        raise PlanError(f"the stages cover layers 0..{expect - 1} of a {n_layers}-layer model; cover them all")
    return out


def estimate_stage(layers: Sequence[LayerRecord], model: CostModel, *, index: int = 0, first_layer: int = 0,
                   incoming: bool | None = None, comm_s: float = 0.0, tp: int = 1,
                   footprint: Footprint | None = None) -> StageEstimate:
    """One stage: residency from its footprint, each layer's roofline, the incoming transfer.

    ``incoming`` defaults to ``index > 0`` (the first stage reads the model inputs locally).
    """
    fp = footprint or stage_footprint(layers)
    resident = fp.total_bytes <= model.capacity_bytes
    costs = [model.layer_cost(layer, resident) for layer in layers]
    receives = index > 0 if incoming is None else incoming
    transfer = model.transfer_time(layers[0].in_bytes) if receives else 0.0
    return StageEstimate(
        index=index, first_layer=first_layer, last_layer=first_layer + len(layers) - 1, footprint=fp,
        capacity_bytes=model.capacity_bytes, resident=resident, layer_costs=costs, transfer_s=transfer,
        comm_s=comm_s, tp=tp, overlap_transfers=model.overlap_transfers, overlap_comm=model.overlap_allreduce,
    )


def estimate_pipeline(layers: Sequence[LayerRecord], groups: Iterable[tuple[int, int]], model: CostModel, *,
                      tokens_per_microbatch: float, microbatches_in_flight: int | None = None,
                      name: str = "plan") -> PipelineEstimate:
    """Predict a pipeline plan: ``groups`` are inclusive ``(first, last)`` layer indices per device."""
    layers = list(layers)
    groups = check_groups(list(groups), len(layers))
    if tokens_per_microbatch <= 0:
        raise CachefitError(f"tokens per micro-batch must be positive, got {tokens_per_microbatch}")
    stages = [
        estimate_stage(layers[a:b + 1], model, index=i, first_layer=a)
        for i, (a, b) in enumerate(groups)
    ]
    m = microbatches_in_flight or len(stages)
    return PipelineEstimate(
        name=name, hardware=model.hardware.name, stages=stages, tokens_per_microbatch=float(tokens_per_microbatch),
        microbatches_in_flight=m, devices=len(stages), assumptions=model_assumptions(model),
    )


def model_assumptions(model: CostModel) -> dict:
    hw = model.hardware
    return {
        "capacity_bytes": hw.capacity_bytes,
        "usable_fraction": hw.usable_fraction,
        "onchip_bw": hw.onchip_bw,
        "offchip_bw": hw.offchip_bw,
        "link_bw": hw.link_bw,
        "link_latency": hw.link_latency,
        "dtype": model.dtype or "from weight_bits",
        "compute_efficiency": model.compute_efficiency,
        "bandwidth_efficiency": model.bandwidth_efficiency,
        "overlap_transfers": model.overlap_transfers,
        "overlap_allreduce": model.overlap_allreduce,
    }


def rebatch(layer: LayerRecord, batch: int) -> LayerRecord:
    """The same layer at another (micro-)batch size: FLOPs, activation, buffer and boundary bytes and
    activation traffic scale linearly with the batch; weights do not."""
    if batch <= 0:
        raise CachefitError(f"micro-batch must be a positive number of samples, got {batch}")
    if batch == layer.batch:
        return layer
    f = batch / layer.batch
    traffic = activation_traffic(layer)
    moved = layer.weight_bytes + round(traffic * f) if layer.bytes_moved > 0 else 0
    return replace(
        layer,
        flops=round(layer.flops * f),
        activation_bytes=round(layer.activation_bytes * f),
        buffer_bytes=round(layer.buffer_bytes * f),
        in_bytes=round(layer.in_bytes * f),
        out_bytes=round(layer.out_bytes * f),
        bytes_moved=moved,
        batch=batch,
    )


def requantize(layer: LayerRecord, bits: int) -> LayerRecord:
    """The same layer with its weights stored at ``bits`` per element (weight-only quantization:
    scales and zero points not counted, compute dtype unchanged). Weight bytes, itemised params
    and the weight part of the traffic scale by ``bits / weight_bits``."""
    if bits not in (4, 8, 16, 32):
        raise CachefitError(f"weight bits must be 4, 8, 16 or 32, got {bits}")
    if bits == layer.weight_bits:
        return layer
    f = bits / layer.weight_bits
    weights = round(layer.weight_bytes * f)
    moved = weights + activation_traffic(layer) if layer.bytes_moved > 0 else 0
    return replace(
        layer,
        weight_bytes=weights,
        params={k: round(v * f) for k, v in layer.params.items()},
        bytes_moved=moved,
        weight_bits=bits,
    )
