"""``cachefit estimate``: cachefit's plan and the baselines, predicted by the same cost model.

:func:`estimate_layers` works on plain layer records (tests, the paper check, the analytic
records); :func:`estimate_model` starts from an ONNX file through ``cachefit.analysis``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import CachefitError, PlanError
from ..partition.footprint import GroupCost
from ..partition.records import LayerRecord
from .baselines import Baseline, estimate_tensor_pipeline, parse_baselines
from .costmodel import CostModel, PipelineEstimate, estimate_pipeline, rebatch, requantize
from .hardware import Hardware, format_bytes, get_hardware

logger = logging.getLogger(__name__)


@dataclass
class EstimateReport:
    """cachefit's plan against the baselines, all predicted by one cost model."""

    model: str
    hardware: Hardware
    devices: int
    plan: PipelineEstimate
    plan_strategy: str
    baselines: list[PipelineEstimate]
    layer_names: list[str]
    samples_per_batch: int
    tokens_per_sample: float
    micro_batches: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, dict[str, float]]:
        """Per baseline: cachefit's tokens/s over the baseline's, cachefit's TPOT over the baseline's."""
        return {
            b.name: {"throughput": self.plan.tokens_per_s / b.tokens_per_s, "tpot": self.plan.tpot_s / b.tpot_s}
            for b in self.baselines
        }

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "hardware": self.hardware.to_dict(),
            "devices": self.devices,
            "samples_per_batch": self.samples_per_batch,
            "tokens_per_sample": self.tokens_per_sample,
            "micro_batches": dict(self.micro_batches),
            "plan": {**self.plan.to_dict(), "strategy": self.plan_strategy},
            "baselines": [b.to_dict() for b in self.baselines],
            "ratios": self.ratios(),
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        hw = self.hardware
        lines = [
            f"cachefit estimate: {self.model} on {self.devices} x {hw.name} "
            f"(on-chip {format_bytes(hw.onchip_bytes)}, usable {hw.usable_fraction:.0%} = "
            f"{format_bytes(hw.capacity_bytes)}; on-chip {_fmt_rate(hw.onchip_bw)}, off-chip "
            f"{_fmt_rate(hw.offchip_bw)}, link {_fmt_rate(hw.link_bw)})",
            f"plan ({self.plan_strategy}), {len(self.plan.stages)} stages, micro-batch "
            f"{self.micro_batches.get(self.plan.name, self.samples_per_batch)} "
            f"({_fmt_count(self.plan.tokens_per_microbatch)} tokens):",
        ]
        lines += _stage_table(self.plan, self.layer_names)
        lines.append("")
        head = ["plan", "devices", "micro-batch", "stages resident", "bottleneck", "tokens/s", "TPOT",
                "cachefit tokens/s ratio", "cachefit TPOT ratio"]
        rows = []
        ratios = self.ratios()
        for est in [self.plan, *self.baselines]:
            r = ratios.get(est.name)
            rows.append([
                est.name, str(est.devices), str(self.micro_batches.get(est.name, "")),
                f"{est.resident_stages}/{len(est.stages)}", _fmt_time(est.bottleneck_s),
                _fmt_count(est.tokens_per_s), _fmt_time(est.tpot_s),
                f"{r['throughput']:.2f}x" if r else "-", f"{r['tpot']:.2f}x" if r else "-",
            ])
        lines += _columns(head, rows)
        for est in self.baselines:
            s = est.stages[est.bottleneck_stage]
            lines.append(
                f"{est.name}: bottleneck stage {s.index} (layers {s.first_layer}..{s.last_layer}, {s.tp}-way TP): "
                f"compute {_fmt_time(s.compute_s)}, memory {_fmt_time(s.memory_s)}, all-reduce {_fmt_time(s.comm_s)}, "
                f"transfer {_fmt_time(s.transfer_s)}, footprint {format_bytes(s.footprint.total_bytes)} per device "
                f"({'resident' if s.resident else 'spills'})"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _stage_table(est: PipelineEstimate, names: Sequence[str]) -> list[str]:
    head = ["stage", "layers", "weights", "act+buf", "boundary", "footprint", "residency", "compute", "memory",
            "transfer", "time", "bound"]
    rows = []
    for s in est.stages:
        label = names[s.first_layer] if s.first_layer == s.last_layer else f"{names[s.first_layer]} .. {names[s.last_layer]}"
        residency = "resident" if s.resident else f"spills ({s.resident_fraction:.0%} fits)"
        rows.append([
            f"{s.index}{'*' if s.index == est.bottleneck_stage else ''}", label,
            format_bytes(s.footprint.weight_bytes), format_bytes(s.footprint.working_set_bytes),
            format_bytes(s.footprint.boundary_bytes), format_bytes(s.footprint.total_bytes), residency,
            _fmt_time(s.compute_s), _fmt_time(s.memory_s), _fmt_time(s.transfer_s), _fmt_time(s.time_s), s.bound,
        ])
    return _columns(head, rows)


def _columns(head, rows) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def _fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.2f} us"


def _fmt_rate(bps: float) -> str:
    return format_bytes(bps) + "/s"


def _fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _micro(samples: int, stages: int, in_flight: int | None, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch samples, micro-batches in flight) for a plan of ``stages`` stages."""
    if in_flight is not None:
        if in_flight < 1:
            raise CachefitError(f"--in-flight must be at least 1 sample, got {in_flight}")
        if in_flight >= stages:
            return in_flight // stages, stages
        return 1, in_flight
    return (micro_batch or samples), stages


def _rebatch_all(layers: Sequence[LayerRecord], m: int) -> list[LayerRecord]:
    return [rebatch(layer, m) for layer in layers]


def plan_groups(layers: Sequence[LayerRecord], model: CostModel, devices: int,
                strategy: str = "min-time") -> tuple[list[tuple[int, int]], str, list[str]]:
    """cachefit's stages for ``devices`` devices: ``make_plan`` (``min-time`` with this cost model,
    spilling allowed). Where the partitioner refuses (more oversized layers than devices), a
    time-balanced split by the same model stands in, and a note says so.

    Both time a stage exactly as :func:`~cachefit.perf.costmodel.estimate_stage` does: its layers
    at the stage's residency plus the transfer of its input, the first stage included (it receives
    the model input from the host), or the larger of the two with ``overlap_transfers``; so the
    optimum they reach is the bottleneck the estimate reports for their stages."""
    from ..partition.plan import make_plan

    notes: list[str] = []
    try:
        plan = make_plan(layers, model.capacity_bytes, strategy=strategy, devices=devices, allow_spill=True,
                         cost_model=model)
        return list(plan.groups), f"make_plan {strategy}", notes + list(plan.notes)
    except PlanError as exc:
        first = str(exc).splitlines()[0]
        notes.append(f"the partitioner refused this request ({first}); stages chosen by the cost model's "
                     "time-balanced split instead, spilling where they must")
        return balanced_time_groups(layers, model, devices), "time-balanced split (fallback)", notes


class _ResidentOrSpillingStageTime(GroupCost):
    """Adapter: the cost model's stage time as a partitioner group cost, any stage allowed.

    ``cost(a, b)`` = the layers' times at the stage's residency (resident when its exact
    footprint, :class:`~cachefit.partition.FootprintCost`, the same as :func:`stage_footprint`,
    fits ``model.capacity_bytes``; spilling otherwise) + the transfer of layer ``a``'s input (every
    stage, the first included), as :func:`estimate_stage` counts it; with ``overlap_transfers``
    the larger of the two instead. ``core`` is the sum of layer times, ``x`` the transfer (with
    overlap: ``x = 0`` and the transfer a gate ``gx``). ``core`` is monotone under inclusion, as
    the partitioner's exact searches require, when residency is (the footprint is monotone: a
    part of a resident stage is resident) and no layer is faster spilling than resident:
    ``core_monotone``.
    """

    def __init__(self, layers: Sequence[LayerRecord], model: CostModel):
        from itertools import accumulate

        from ..partition.footprint import FootprintCost

        self.n = len(layers)
        self.footprint = FootprintCost(layers)
        self.capacity = model.capacity_bytes
        on = [float(model.layer_time(x, True)) for x in layers]
        off = [float(model.layer_time(x, False)) for x in layers]
        self.on = list(accumulate(on, initial=0.0))
        self.off = list(accumulate(off, initial=0.0))
        transfers = [float(model.transfer_time(x.in_bytes)) for x in layers]
        self.y = [0.0] * self.n
        self.core_monotone = self.footprint.monotone and all(f >= o for f, o in zip(off, on))
        self.overlap = bool(model.overlap_transfers)
        if self.overlap:
            self.x = [0.0] * self.n
            self.gx = g = transfers
            # Left extension: the core grows to at least two layers' on-chip times, the gate
            # changes from g[a] to g[a-1] (see cachefit.partition.cost.StageTime).
            self.monotone = self.core_monotone and all(
                max(on[a] + on[a - 1], g[a - 1]) >= g[a] for a in range(1, self.n))
        else:
            self.x = transfers
            # Left extension adds a layer's time and that layer's transfer, and drops x[a].
            self.monotone = self.core_monotone and all(
                on[a - 1] + self.x[a - 1] >= self.x[a] for a in range(1, self.n))

    @property
    def plain_monotone(self) -> bool:
        return self.core_monotone if self.overlap else self.monotone

    def core(self, a: int, b: int) -> float:
        times = self.on if self.footprint.cost(a, b) <= self.capacity else self.off
        return times[b] - times[a]

    def cost(self, a: int, b: int) -> float:
        c = self.core(a, b)
        if self.overlap:
            return max(c, self.gx[a])
        return c + self.x[a]


def balanced_time_groups(layers: Sequence[LayerRecord], model: CostModel, k: int) -> list[tuple[int, int]]:
    """At most ``k`` contiguous stages minimising the largest predicted stage time, any stage
    allowed to spill (residency per stage from its footprint); the fewest stages reaching it.

    The partitioner's exact bottleneck search (:func:`cachefit.partition.search.min_bottleneck`)
    on :class:`_ResidentOrSpillingStageTime`; where that cost is outside the search's contract
    (a non-monotone footprint, or a layer faster spilling than resident) its reference dynamic
    programme, O(n^2 k), up to 400 layers, and an even split beyond."""
    from ..partition.search import Segment, min_bottleneck, reference_balanced

    n = len(layers)
    k = max(1, min(k, n))
    cost = _ResidentOrSpillingStageTime(layers, model)
    if cost.core_monotone:
        res = min_bottleneck(cost, [], [Segment(0, n)], k, 0.0, cost.cost(0, n), integer=False)
        groups = res.groups
    elif n <= 400:
        groups = reference_balanced(cost.cost, n, k, math.inf, fewest=True)[0]
    else:
        from .baselines import even_groups

        return even_groups(n, k)
    return [(a, b - 1) for a, b in groups]


def estimate_layers(
    layers: Sequence[LayerRecord],
    *,
    hardware: Hardware | str,
    devices: int,
    tokens_per_batch: float,
    compare: str | Sequence[Baseline] = (),
    micro_batch: int | None = None,
    in_flight: int | None = None,
    usable_fraction: float | None = None,
    compute_dtype: str | None = None,
    compute_efficiency: float = 1.0,
    bandwidth_efficiency: float = 1.0,
    overlap_transfers: bool = False,
    overlap_allreduce: bool = False,
    strategy: str = "min-time",
    groups: Sequence[tuple[int, int]] | None = None,
    weight_bits: int | None = None,
    model_name: str = "model",
    kernels=None,
) -> EstimateReport:
    """Predict cachefit's plan on ``devices`` devices and each baseline in ``compare``.

    layers:           records at the model's batch (``layers[0].batch`` samples).
    tokens_per_batch: tokens in that batch (batch x sequence length).
    micro_batch:      samples per micro-batch for every plan (default: the model's batch), one
                      micro-batch in flight per stage.
    in_flight:        instead: the samples in flight in total, the same for every plan, each plan
                      splitting them into one micro-batch per stage (a fair comparison at a fixed
                      number of concurrent sequences).
    compute_dtype:    the dtype of the peak FLOP/s (default: from each layer's weight bits).
    groups:           cachefit's stages (default: ``make_plan`` with ``strategy`` and this model).
    weight_bits:      evaluate every plan as if the weights were stored at 8 or 4 bits (weight-only
                      quantization; compute dtype unchanged).
    kernels:          layer name -> :class:`~cachefit.perf.costmodel.KernelProfile` (from
                      :func:`cachefit.perf.flops.module_kernels`): on a hardware with a calibrated
                      kernel table, those layers are timed as the sum of their kernels.
    """
    layers = list(layers)
    if weight_bits is not None:
        layers = [requantize(layer, weight_bits) for layer in layers]
    if not layers:
        raise CachefitError("the model has no layers to estimate")
    if devices < 1:
        raise CachefitError(f"--devices must be at least 1, got {devices}")
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    if usable_fraction is not None:
        hw = hw.with_usable_fraction(usable_fraction)
    model = CostModel(hw, dtype=compute_dtype, compute_efficiency=compute_efficiency,
                      bandwidth_efficiency=bandwidth_efficiency, overlap_transfers=overlap_transfers,
                      overlap_allreduce=overlap_allreduce, kernels=kernels)
    samples = layers[0].batch
    per_sample = tokens_per_batch / samples
    baselines = parse_baselines(compare) if isinstance(compare, str) else list(compare)
    notes: list[str] = []
    micro: dict[str, int] = {}

    # cachefit's plan (re-planned once when the micro-batch depends on the stage count)
    m, inflight = _micro(samples, devices, in_flight, micro_batch)
    recs = _rebatch_all(layers, m)
    if groups is not None:
        plan_g, source = list(groups), "given stages"
    else:
        plan_g, source, plan_notes = plan_groups(recs, model, devices, strategy)
        if in_flight is not None and len(plan_g) != devices:
            m, inflight = _micro(samples, len(plan_g), in_flight, micro_batch)
            recs = _rebatch_all(layers, m)
            plan_g, source, plan_notes = plan_groups(recs, model, len(plan_g), strategy)
        notes += plan_notes
    m, inflight = _micro(samples, len(plan_g), in_flight, micro_batch)
    recs = _rebatch_all(layers, m)
    plan = estimate_pipeline(recs, plan_g, model, tokens_per_microbatch=m * per_sample,
                             microbatches_in_flight=inflight, name="cachefit")
    micro["cachefit"] = m
    if len(plan_g) < devices:
        notes.append(f"cachefit's plan uses {len(plan_g)} of the {devices} devices")

    estimates = []
    for base in baselines:
        if base.pp > len(layers):
            raise CachefitError(
                f"baseline {base.name} needs at least {base.pp} layers for {base.pp} pipeline stages; the model "
                f"has {len(layers)}: choose a smaller pp"
            )
        if base.devices != devices:
            notes.append(f"baseline {base.name} uses {base.devices} devices, cachefit's plan {devices}")
        bm, binflight = _micro(samples, base.pp, in_flight, micro_batch)
        estimates.append(estimate_tensor_pipeline(
            _rebatch_all(layers, bm), model, tp=base.tp, pp=base.pp, tokens_per_microbatch=bm * per_sample,
            microbatches_in_flight=binflight))
        micro[base.name] = bm
    if hw.offchip_bytes:
        for est in [plan, *estimates]:
            over = [st for st in est.stages if st.footprint.total_bytes > hw.offchip_bytes]
            if over:
                worst = max(over, key=lambda st: st.footprint.total_bytes)
                notes.append(
                    f"{est.name}: {len(over)} stage(s) need more than the {format_bytes(hw.offchip_bytes)} of "
                    f"off-chip memory of one {hw.name} (stage {worst.index}: {format_bytes(worst.footprint.total_bytes)} "
                    "per device); that plan cannot run at this micro-batch: use a smaller --micro-batch"
                )
    if plan.resident_stages < len(plan.stages):
        notes.append(
            f"{len(plan.stages) - plan.resident_stages} of {len(plan.stages)} stages spill off chip: their weights "
            "stream from off-chip memory every micro-batch"
        )
    return EstimateReport(model=model_name, hardware=hw, devices=devices, plan=plan, plan_strategy=source,
                          baselines=estimates, layer_names=[x.name for x in layers], samples_per_batch=samples,
                          tokens_per_sample=per_sample, micro_batches=micro, notes=notes)


def estimate_model(source, *, input_shapes=None, batch: int | None = None, dtype: str | None = None,
                   layers: int | None = None, records: str = "ir", sparse_moe: bool = True,
                   fused_attention: bool = False, **kwargs) -> EstimateReport:
    """:func:`estimate_layers` on an ONNX model (path or ModelProto).

    records: ``ir`` analyses the model with ``cachefit.analysis`` (import, layer discovery, footprints
             from the Relax IR); ``analytic`` counts a cachefit reference model (``cachefit models
             export``) by hand from the shapes in its metadata (:mod:`cachefit.perf.analytic`), which is
             where ``sparse_moe`` (count only the ``top_k`` experts a token is routed to; the ONNX graph
             runs every expert with zero gates) and ``fused_attention`` apply.
    dtype:   the planning dtype (bytes per weight and activation, e.g. ``bfloat16`` for an fp32 file).
    """
    if isinstance(kwargs.get("compare"), str):  # refuse a bad --compare before the analysis
        kwargs["compare"] = parse_baselines(kwargs["compare"])
    if records == "analytic":
        recs, tokens, name = analytic_records(source, batch=batch, dtype=dtype, sparse_moe=sparse_moe,
                                              fused_attention=fused_attention)
        return estimate_layers(recs, tokens_per_batch=tokens, model_name=name, **kwargs)
    if records != "ir":
        raise CachefitError(f"unknown record source {records!r}: use ir or analytic")
    from ..analysis import analyze_onnx

    analysis = analyze_onnx(source, input_shapes=input_shapes, batch=batch, dtype=dtype, layers=layers)
    name = getattr(analysis, "name", None) or "model"
    hw = kwargs.get("hardware")
    if isinstance(hw, str):  # resolve once (``cpu`` reads the calibration file); estimate_layers takes it as is
        hw = kwargs["hardware"] = get_hardware(hw)
    if hw is not None and hw.kernels is not None and "kernels" not in kwargs:
        from .flops import module_kernels  # a calibrated CPU: time each layer by its kernels

        kwargs["kernels"] = module_kernels(analysis.mod)
    return estimate_layers(analysis.layers, tokens_per_batch=analysis.tokens_per_batch, model_name=str(name),
                           **kwargs)


def analytic_records(source, *, batch: int | None = None, dtype: str | None = None, sparse_moe: bool = True,
                     fused_attention: bool = False) -> tuple[list[LayerRecord], int, str]:
    """(records, tokens per batch, name) of a cachefit reference model, from its metadata alone."""
    import os

    import onnx

    from ..models.presets import model_params
    from .analytic import transformer_records

    if isinstance(source, onnx.ModelProto):
        model, name = source, source.graph.name or "model"
    else:
        path = os.fspath(source)
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError, OSError, ...
            raise CachefitError(f"cannot read ONNX model {path!r}: {exc}") from None
        name = os.path.basename(path)
    p = model_params(model)
    if p.get("family") not in ("dense", "moe"):
        raise CachefitError(
            f"{name}: --records analytic needs a transformer written by `cachefit models export` (its metadata "
            "names the shapes); this model has none. Use --records ir"
        )
    if batch is not None:
        p["batch"] = int(batch)
    if dtype is not None:
        from .analytic import _BYTES

        p["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
        if p["dtype"] not in _BYTES:
            raise CachefitError(f"unknown planning dtype {dtype!r}: use one of {', '.join(_BYTES)}")
    return transformer_records(p, sparse_moe=sparse_moe, fused_attention=fused_attention), \
        int(p["batch"]) * int(p["seq"]), name
