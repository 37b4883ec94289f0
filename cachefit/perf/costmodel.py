"""The roofline-with-residency cost model: per-layer and per-stage time, pipeline throughput and TPOT.

Plain Python on :class:`~cachefit.partition.records.LayerRecord`s and a
:class:`~cachefit.perf.hardware.Hardware` preset; no TVM.

The model, in full (every figure is for one micro-batch through one device):

* **Layer time** = ``max(compute, memory) + launch_overhead`` (a roofline per layer, so a stage
  mixing compute-bound and memory-bound layers is not averaged into one regime); with a
  hardware ``memory_overlap`` below 1 the smaller of the two is partly added
  (``max + (1 - overlap) * min``: a single CPU core does not hide its cache misses behind compute).

  - compute = ``flops / (peak_flops[dtype] * compute_efficiency)``; or, when the hardware carries a
    calibrated :class:`~cachefit.perf.hardware.KernelTable` and the model is given the layer's
    kernels (:class:`KernelProfile`, from :func:`cachefit.perf.flops.module_kernels`), the sum of
    its kernels' times: a matmul ``[M, K] x [K, N]`` at the FLOP/s measured for that shape
    (interpolated in log space between calibrated shapes), every other kernel at its class's
    measured seconds per element, ops fused into a kernel (epilogues) at the fused per-element
    cost, plus a fixed cost per kernel call; all divided by ``compute_efficiency``. The kernels
    were timed with their operands on chip, so this compute time already holds the on-chip
    traffic: in this mode the memory part below counts only the off-chip traffic (0 for a
    resident layer), and the layer takes ``max(memory, compute + (1 - overlap) * memory)``: the
    kernels stall for the share of the off-chip stream they cannot hide (see ``LayerCost``);
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
  the incoming transfer ``link_latency + in_bytes / link_bw`` of its first layer. Every stage
  pays it, stage 0 included: a pipeline's first stage receives the model input from the host
  every micro-batch (timed on the same link figures; the presets carry no separate host link).
  With ``overlap_transfers=True`` the transfer hides behind compute: ``max(compute part, transfer)``.
  The ``min-time`` partitioner times stages the same way (:class:`cachefit.partition.cost.StageTime`
  reads ``overlap_transfers`` through the ``StageCostModel`` protocol).
* **Pipeline**: with ``M`` micro-batches in flight (default: one per stage) a micro-batch comes back
  every ``round_trip = max(sum of stage times, M * bottleneck)``; throughput =
  ``M * tokens_per_microbatch / round_trip`` (= ``tokens_per_microbatch / bottleneck`` when
  ``M`` >= the number of stages) and the time per output token (TPOT) of one sequence is the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from ..errors import CachefitError, PlanError
from ..partition.records import LayerRecord
from .hardware import KERNEL_CLASSES, Hardware, KernelTable

_DTYPE_FOR_BITS = {32: "float32", 16: "bfloat16", 8: "bfloat16", 4: "bfloat16"}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of a layer as the compiled code runs it (after operator fusion), plain data.

    kind:      ``matmul`` or a non-matmul class of :data:`~cachefit.perf.hardware.KERNEL_CLASSES`
               (``elementwise``, ``transcendental``, ``norm``, ``softmax``, ``move``).
    m, n, k, batch: a matmul's ``batch`` independent ``[m, k] x [k, n]`` products (0 otherwise).
    elements:  output elements of a non-matmul kernel (input elements for a reduction).
    fused:     ``(class, elements)`` of the element-wise ops fused into this kernel (a matmul's bias,
               activation and residual epilogue; the rest of an element-wise chain).
    rows_in_m: whether the model's batch is in ``m`` (a matmul with a 2-D weight: the tokens are
               rows) or in ``batch`` (batched matmuls of activations, attention); decides how the
               kernel grows at another micro-batch.
    """

    kind: str
    elements: float = 0.0
    m: float = 0.0
    n: float = 0.0
    k: float = 0.0
    batch: float = 1.0
    fused: tuple = ()
    rows_in_m: bool = True

    def __post_init__(self) -> None:
        if self.kind != "matmul" and self.kind not in KERNEL_CLASSES:
            raise CachefitError(
                f"unknown kernel class {self.kind!r}: use matmul or one of {', '.join(KERNEL_CLASSES)}"
            )

    def scaled(self, factor: float) -> "KernelSpec":
        """The same kernel for ``factor`` times the micro-batch (element counts and the batch
        dimension grow; a weight matmul gets ``factor`` times the rows)."""
        if factor == 1.0:
            return self
        fused = tuple((c, e * factor) for c, e in self.fused)
        if self.kind == "matmul":
            if self.rows_in_m:
                return replace(self, m=self.m * factor, fused=fused)
            return replace(self, batch=self.batch * factor, fused=fused)
        return replace(self, elements=self.elements * factor, fused=fused)

    def seconds(self, table: KernelTable) -> float:
        """This kernel's time on a calibrated device: the kernel itself, its fused ops, one call."""
        if self.kind == "matmul":
            t = table.matmul_seconds(self.m, self.n, self.k, self.batch)
        else:
            t = table.element_seconds(self.kind, self.elements)
        t += sum(table.element_seconds(c, e, fused=True) for c, e in self.fused)
        return t + table.per_kernel_s

    def to_dict(self) -> dict:
        return {"kind": self.kind, "elements": self.elements, "m": self.m, "n": self.n, "k": self.k,
                "batch": self.batch, "fused": [list(f) for f in self.fused], "rows_in_m": self.rows_in_m}

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        return cls(kind=str(d["kind"]), elements=float(d.get("elements", 0)), m=float(d.get("m", 0)),
                   n=float(d.get("n", 0)), k=float(d.get("k", 0)), batch=float(d.get("batch", 1)),
                   fused=tuple((str(c), float(e)) for c, e in d.get("fused", ())),
                   rows_in_m=bool(d.get("rows_in_m", True)))


@dataclass(frozen=True)
class KernelProfile:
    """The kernels of one layer, for the micro-batch ``batch`` they were counted at."""

    batch: int
    kernels: tuple

    def seconds(self, table: KernelTable, batch: int | None = None) -> float:
        """The layer's compute time on ``table``'s device: the sum of its kernels' times, at
        ``batch`` (default: the profile's own) samples per micro-batch."""
        factor = 1.0 if batch is None else batch / self.batch
        return sum(k.scaled(factor).seconds(table) for k in self.kernels)


@dataclass(frozen=True)
class LayerCost:
    """Where one layer's time goes, in seconds, for one micro-batch.

    ``overlap`` (the hardware's ``memory_overlap``): 1.0 gives the roofline
    ``max(compute, memory)``, 0.0 the sum; in between ``max + (1 - overlap) * min``.

    ``kernel_timed`` (the per-kernel model): ``compute_s`` is the sum of measured kernel times,
    which already hold the on-chip traffic, and ``memory_s`` only the off-chip traffic. The
    kernels run at their measured speed and stall for the ``1 - overlap`` share of the off-chip
    stream they cannot hide, and a layer is never faster than that stream:
    ``max(memory, compute + (1 - overlap) * memory)`` (the same as above while compute-bound).
    """

    name: str
    compute_s: float
    weight_s: float
    activation_s: float
    overhead_s: float = 0.0
    overlap: float = 1.0
    kernel_timed: bool = False

    @property
    def memory_s(self) -> float:
        return self.weight_s + self.activation_s

    @property
    def time_s(self) -> float:
        if self.kernel_timed:
            mem = self.memory_s
            return max(mem, self.compute_s + (1.0 - self.overlap) * mem) + self.overhead_s
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
    overlap_transfers:   hide a stage's incoming transfer behind its compute: the stage takes
                         ``max(layers, transfer)``; part of the ``StageCostModel`` protocol, so
                         ``min-time`` plans optimise the same stage time.
    overlap_allreduce:   hide tensor-parallel all-reduces behind compute (baselines): a stage takes
                         ``max(layers, all-reduces)`` instead of their sum, the best case of
                         communication/computation overlap.
    kernels:             layer name -> :class:`KernelProfile` (see
                         :func:`cachefit.perf.flops.module_kernels`). Used only with a hardware
                         that carries a calibrated ``KernelTable`` (``cachefit calibrate``): a
                         layer found here is timed as the sum of its kernels, every other layer
                         (and every layer on a datasheet preset) as ``flops / peak``.
    """

    hardware: Hardware
    dtype: str | None = None
    compute_efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    overlap_transfers: bool = False
    overlap_allreduce: bool = False
    kernels: Mapping[str, KernelProfile] | None = None

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

    def kernel_profile(self, layer: LayerRecord) -> KernelProfile | None:
        """The layer's kernels when they and a calibrated kernel table are both known, else None."""
        if self.hardware.kernels is None or not self.kernels:
            return None
        return self.kernels.get(layer.name)

    def compute_time(self, layer: LayerRecord) -> float:
        """Seconds of computation of one micro-batch through ``layer`` (operands on chip)."""
        profile = self.kernel_profile(layer)
        if profile is not None:
            return profile.seconds(self.hardware.kernels, layer.batch) / self.compute_efficiency
        return layer.flops / self.peak_flops(layer) if layer.flops else 0.0

    def layer_cost(self, layer: LayerRecord, resident: bool) -> LayerCost:
        hw = self.hardware
        on_bw = hw.onchip_bw * self.bandwidth_efficiency
        off_bw = hw.offchip_bw * self.bandwidth_efficiency
        profile = self.kernel_profile(layer)
        compute = self.compute_time(layer)
        acts_on_chip = resident or layer.working_set_bytes <= self.capacity_bytes
        if profile is not None:
            # measured kernel times already include the traffic of operands on chip: only what
            # comes from off chip is memory time on top of them
            weight_s = 0.0 if resident else layer.weight_bytes / off_bw
            activation_s = 0.0 if acts_on_chip else activation_traffic(layer) / off_bw
        else:
            weight_s = layer.weight_bytes / (on_bw if resident else off_bw)
            activation_s = activation_traffic(layer) / (on_bw if acts_on_chip else off_bw)
        return LayerCost(
            name=layer.name,
            compute_s=compute,
            weight_s=weight_s,
            activation_s=activation_s,
            overhead_s=hw.launch_overhead,
            overlap=hw.memory_overlap,
            kernel_timed=profile is not None,
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

    ``incoming`` (default True) counts the transfer of the first layer's ``in_bytes`` into the
    stage, for every stage including the first: a pipeline's first stage receives the model
    input from the host every micro-batch, as the ``min-time`` partitioner also counts it
    (:class:`cachefit.partition.cost.StageTime`), so a plan's estimate and the partitioner's
    stage times agree. Pass ``incoming=False`` for a stage whose input is already on the device.
    """
    fp = footprint or stage_footprint(layers)
    resident = fp.total_bytes <= model.capacity_bytes
    costs = [model.layer_cost(layer, resident) for layer in layers]
    receives = True if incoming is None else incoming
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
        "compute": ("per-kernel (calibrated kernel table)" if hw.kernels is not None and model.kernels
                    else "flops / peak"),
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
