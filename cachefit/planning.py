"""``cachefit plan``: per-layer footprints and a partition, as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from typing import TYPE_CHECKING

from .errors import CachefitError, PlanError
from .partition import Plan, make_plan
from .perf.hardware import Hardware, format_bytes, get_hardware, parse_size

if TYPE_CHECKING:  # the analysis imports TVM: load it only once the arguments are checked
    from .analysis import ModelAnalysis


@dataclass
class PlanReport:
    analysis: "ModelAnalysis"
    plan: Plan
    capacity_bytes: int
    hardware: Hardware | None
    fit: object = None  # cachefit.fit.FitReport when --fit/--quantize/--prune/--micro-batch were given

    def to_dict(self) -> dict:
        layers = []
        for i, r in enumerate(self.analysis.layers):
            layers.append({
                "index": i,
                "name": r.name,
                "weight_bytes": r.weight_bytes,
                "activation_bytes": r.activation_bytes,
                "buffer_bytes": r.buffer_bytes,
                "total_bytes": r.total_bytes,
                "in_bytes": r.in_bytes,
                "out_bytes": r.out_bytes,
                "flops": r.flops,
                "bytes_moved": r.bytes_moved,
                "fits": r.total_bytes <= self.capacity_bytes,
            })
        d = {
            "model": self.analysis.name,
            "model_sha256": self.analysis.imported.source.sha256,
            "shape_only": self.analysis.shape_only,
            "hardware": self.hardware.name if self.hardware else None,
            "capacity_bytes": self.capacity_bytes,
            "plan_dtype": self.analysis.dtype,
            "batch": self.analysis.layers[0].batch if self.analysis.layers else None,
            "layers": layers,
            "partitions": [
                {"device": s.device, "first_layer": s.first_layer, "last_layer": s.last_layer,
                 "total_bytes": s.total_bytes}
                for s in self.plan.stages
            ],
        }
        d.update(self.plan.to_dict())
        d["capacity_bytes"] = self.capacity_bytes
        if self.fit is not None:
            d["fit"] = self.fit.to_dict()
        return d

    def format_table(self) -> str:
        rows = [["#", "layer", "weights", "activations", "buffers", "total", "fits"]]
        for i, r in enumerate(self.analysis.layers):
            rows.append([str(i), r.name, format_bytes(r.weight_bytes), format_bytes(r.activation_bytes),
                         format_bytes(r.buffer_bytes), format_bytes(r.total_bytes),
                         "yes" if r.total_bytes <= self.capacity_bytes else "NO"])
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [
            f"model {self.analysis.name}{' (shape-only)' if self.analysis.shape_only else ''}: "
            f"{len(self.analysis.layers)} layers, capacity {format_bytes(self.capacity_bytes)}"
            + (f" per device ({self.hardware.name})" if self.hardware else " per device")
            + (f", planned as {self.analysis.dtype}" if self.analysis.dtype else ""),
            "",
        ]
        for k, row in enumerate(rows):
            lines.append("  ".join(cell.rjust(w) if c not in (1,) else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.fit is not None:
            lines += ["", self.fit.format_table()]
        lines += ["", self.plan.format_table()]
        return "\n".join(lines)


def resolve_capacity(cache: str | int | None, hardware: "str | Hardware | None") -> tuple[int, Hardware | None]:
    """--cache SIZE wins over --hardware NAME (a preset, a hardware file or a ``Hardware``); the default is the
    h100 preset."""
    if isinstance(hardware, Hardware):
        hw = hardware
    else:
        hw = get_hardware(hardware) if hardware else (None if cache is not None else get_hardware("h100"))
    if cache is not None:
        cap = cache if isinstance(cache, int) else parse_size(cache)
        if cap <= 0:
            raise CachefitError(f"--cache must be positive, got {cache!r}")
        return cap, hw
    return hw.capacity_bytes, hw  # type: ignore[union-attr]


def plan_model(
    model,
    *,
    input_shapes=None,
    batch: int | None = None,
    dtype: str | None = None,
    cache: str | int | None = None,
    hardware: "str | Hardware | None" = None,
    strategy: str = "greedy",
    devices: int | None = None,
    footprint: str = "exact",
    layout: str | None = None,
    allow_spill: bool = False,
    layers: int | None = None,
    layer_boundaries: Sequence[str] | None = None,
    analysis: "ModelAnalysis | None" = None,
    fit: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    prune: float = 0.0,
    max_prune: float = 0.5,
    micro_batch: int | str | None = None,
) -> PlanReport:
    """Analyse a model (unless ``analysis`` is given) and partition it.

    ``fit``/``quantize``/``prune``/``micro_batch`` first make oversized layers fit
    (:func:`cachefit.fit.fit_model`: ``fit="auto"`` escalates INT8, INT4, pruning up to
    ``max_prune``, a smaller micro-batch per layer over capacity; ``"none"`` only reports); the
    plan is then made on the rewritten layers and the report says what was applied."""
    cap, hw = resolve_capacity(cache, hardware)
    if layout is not None and strategy != "layout":
        if strategy not in ("greedy", "balanced"):
            raise PlanError(
                f"--layout {layout} fixes the stages, --strategy {strategy} would choose them: give one of the two "
                "(--strategy layout is implied by --layout)"
            )
        strategy = "layout"  # an explicit layout replaces the default search
    if analysis is None:
        from .analysis import analyze_onnx

        analysis = analyze_onnx(model, input_shapes=input_shapes, batch=batch, dtype=dtype, layers=layers,
                                layer_boundaries=layer_boundaries)
    fit_report = None
    if fit is not None or (quantize or "none") != "none" or prune or micro_batch is not None:
        from .fit import fit_model

        analysis, fit_report = fit_model(analysis, cap, mode=fit or "none", quantize=quantize, group_size=group_size,
                                         prune=prune, max_prune=max_prune, micro_batch=micro_batch,
                                         footprint=footprint, layers=layers, layer_boundaries=layer_boundaries)
    cost_model = None
    if strategy == "min-time":
        from .perf.costmodel import CostModel

        base = hw or get_hardware("h100")
        kernels = None
        if base.kernels is not None:  # a calibrated CPU: time each layer by its kernels
            from .perf.flops import module_kernels

            kernels = module_kernels(analysis.mod)
        cost_model = CostModel(hardware=base if base.capacity_bytes == cap else _with_capacity(base, cap),
                               kernels=kernels)
    plan = make_plan(analysis.layers, cap, strategy=strategy, devices=devices, footprint=footprint,
                     layout=layout, allow_spill=allow_spill, cost_model=cost_model)
    return PlanReport(analysis=analysis, plan=plan, capacity_bytes=cap, hardware=hw, fit=fit_report)


def _with_capacity(hw: Hardware, cap: int) -> Hardware:
    from dataclasses import replace

    return replace(hw, onchip_bytes=cap, usable_fraction=1.0)
