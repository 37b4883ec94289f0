"""``cachefit plan``: per-layer footprints and a partition, as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

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
    progress: Callable[[str], None] | None = None,
    **fit_kwargs,
) -> PlanReport:
    """Analyse a model (unless ``analysis`` is given) and partition it: the library form of
    ``cachefit plan``.

    ``fit_kwargs`` are the fit options of ``cachefit plan`` / ``cachefit compile``
    (:data:`cachefit.fit.FIT_KWARGS`: ``fit``, ``quantize``, ``group_size``, ``prune``, ``max_prune``,
    ``max_prune_heads``, ``micro_batch``, ``prune_heads``, ``quantize_int8_weights``). They first make
    oversized layers fit through :func:`cachefit.fit.fit_analysis`, the step ``cachefit compile`` runs
    (``fit="auto"`` escalates INT8, INT4, MLP pruning up to ``max_prune``, head pruning up to
    ``max_prune_heads``, a smaller micro-batch per layer over capacity; ``"none"`` only reports), so
    the per-layer bytes are the ones compile plans with; the plan is then made on the rewritten
    layers and ``report.fit`` says what was applied. Bad values are refused (a CachefitError naming
    the flag) before the model is read. ``quantize_calibration`` is refused: GPTQ calibration
    changes the rounded weight values, never a byte of a footprint. An ``analysis`` that already went
    through :func:`~cachefit.fit.fit_analysis` (as ``compile_model`` does) is planned as given when
    no fit option is passed. ``progress`` gets the fit report's table.
    """
    from .fit import FIT_KWARGS, check_fit_kwargs, fit_analysis, wants_fit

    unknown = sorted(set(fit_kwargs) - set(FIT_KWARGS))
    if unknown:
        raise TypeError(f"plan_model() got unexpected keyword arguments {unknown}")
    if fit_kwargs.get("quantize_calibration") is not None:
        raise CachefitError(f"--calibrate {fit_kwargs['quantize_calibration']}: GPTQ calibration changes the "
                            "rounded weight values, not a byte of any footprint, so the plan is the same without it: "
                            "leave --calibrate out of cachefit plan (cachefit compile takes it)")
    check_fit_kwargs(**fit_kwargs)
    cap, hw = resolve_capacity(cache, hardware)  # a bad --cache / --hardware fails before the model is read
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
    if wants_fit(**fit_kwargs):
        analysis, fit_report = fit_analysis(analysis, cache=cache, hardware=hardware, footprint=footprint,
                                            layers=layers, layer_boundaries=layer_boundaries,
                                            allow_spill=allow_spill, progress=progress, **fit_kwargs)
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
