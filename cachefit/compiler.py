"""``cachefit compile``: ONNX -> layered Relax -> plan -> stages -> per-device libraries + manifest.

Data flows one way: frontend -> passes -> partition -> codegen -> artifact directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .analysis import ModelAnalysis, analyze_onnx
from .errors import CachefitError
from .planning import PlanReport, plan_model

if TYPE_CHECKING:  # pragma: no cover
    from .fit import FitReport

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    artifact_dir: Path
    report: PlanReport
    fit: "FitReport | None" = None  # what --fit/--quantize/--prune/--micro-batch did (cachefit.fit)

    @property
    def analysis(self) -> ModelAnalysis:
        return self.report.analysis


def compile_model(
    model,
    *,
    target: str = "llvm",
    arch: str = "sm_90a",
    out_dir: str | Path = "build",
    input_shapes=None,
    batch: int | None = None,
    cache: str | int | None = None,
    hardware: str | None = None,
    strategy: str = "balanced",
    devices: int | None = None,
    footprint: str = "exact",
    layout: str | None = None,
    allow_spill: bool = False,
    layers: int | None = None,
    layer_boundaries: Sequence[str] | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    analysis: ModelAnalysis | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    prune: float = 0.0,
    fit: str | None = None,
    max_prune: float = 0.5,
    micro_batch: int | str | None = None,
    quantize_calibration=None,
    quantize_int8_weights: Sequence[str] | None = None,
    prune_heads: float = 0.0,
    max_prune_heads: float | None = None,
    mcpu: str | None = None,
    tuning_records: str | Path | None = None,
) -> CompileResult:
    """Compile an ONNX model into one library per device (see docs/artifact-format.md).

    The plan is made as by ``cachefit plan`` (``--cache``/``--hardware`` capacity, ``strategy``,
    ``devices``); each stage is compiled on its own for ``target`` (``llvm`` or ``cuda``/``arch``).

    Making layers fit (:func:`cachefit.fit.fit_model`, recorded in the manifest's ``plan.fit``):
    ``quantize`` (``int8``/``int4``, ``group_size`` rows per scale) and ``prune`` (fraction of MLP
    hidden units) apply to every layer; ``fit="auto"`` escalates on each layer still over capacity
    (INT8, INT4, MLP pruning up to ``max_prune``, then attention-head pruning by whole heads up to
    ``max_prune_heads`` (None: ``max_prune``), a smaller micro-batch), ``fit="none"`` only reports;
    ``micro_batch`` (``"auto"`` or N) compiles the stages for a smaller batch that the runtime
    splits the inputs into (``plan.micro_batch``). All left out: the model as it is.
    ``quantize_calibration`` (N random batches or a list of input feeds; default data-free),
    ``quantize_int8_weights`` (name patterns kept at INT8 under int4) and ``prune_heads`` (fraction
    of attention heads) are passed to :func:`cachefit.fit.fit_model`.

    ``mcpu``: the LLVM CPU of llvm stages (default: this host's; recorded in the manifest, the
    runtimes refuse the artifact on a host without its instruction-set extensions).
    ``tuning_records``: tile records of ``cachefit.codegen.cpu_tuning.tune_relax`` (a work directory
    or its ``cachefit_tuning.json``) or a meta-schedule database, applied to the kernels they cover.
    """
    from tvm import relax  # noqa: F401  (TVM is needed from here on)

    from .codegen import build_artifact, make_target
    from .passes import run_pass
    from .passes.split_stages import SplitStages

    if target not in ("llvm", "cuda"):
        raise CachefitError(f"unknown --target {target!r}: use llvm (CPU devices) or cuda (GPUs)")
    if mcpu and target != "llvm":
        raise CachefitError(f"--mcpu {mcpu!r} names the CPU of llvm stages; --target {target} compiles GPU stages: "
                            "leave --mcpu out (use --arch for the GPU)")
    if mcpu:
        make_target("llvm", mcpu=mcpu)  # an unknown CPU name fails here, before any work
    fit_kwargs = dict(fit=fit, quantize=quantize, group_size=group_size, prune=prune, max_prune=max_prune,
                      max_prune_heads=max_prune_heads, micro_batch=micro_batch, prune_heads=prune_heads,
                      quantize_int8_weights=quantize_int8_weights, quantize_calibration=quantize_calibration)
    check_fit_kwargs(**fit_kwargs)
    if tuning_records is not None and not Path(tuning_records).exists():
        raise CachefitError(f"--tuning-records {str(tuning_records)!r} does not exist: pass the work directory of "
                            "cachefit.codegen.cpu_tuning.tune_relax (or its cachefit_tuning.json), or a "
                            "meta-schedule database directory; leave it out to compile with the default schedules")
    if analysis is None:
        analysis = analyze_onnx(model, input_shapes=input_shapes, batch=batch, layers=layers,
                                layer_boundaries=layer_boundaries)
    if analysis.shape_only:
        raise CachefitError(
            f"{analysis.name} is shape-only (its external weight files were never written): it can be planned "
            "and estimated, not compiled. Export it with real weights to compile."
        )
    analysis, fit_report = fit_analysis(analysis, cache=cache, hardware=hardware, footprint=footprint, layers=layers,
                                        layer_boundaries=layer_boundaries, allow_spill=allow_spill,
                                        progress=progress, refuse_unfit=True, **fit_kwargs)
    report = plan_model(model, cache=cache, hardware=hardware, strategy=strategy, devices=devices,
                        footprint=footprint, layout=layout, allow_spill=allow_spill, analysis=analysis)
    if progress:
        progress(f"plan: {report.plan.devices_used} stage(s), groups {report.plan.groups}")
    split = run_pass(SplitStages(report.plan.groups, target=make_target(target, arch)), analysis.mod)
    names = analysis.imported.original_names
    plan_dict = report.to_dict()
    if fit_report is not None:
        plan_dict["fit"] = fit_report.to_dict()
        if fit_report.micro_batch != fit_report.batch:
            plan_dict["micro_batch"] = {"batch": fit_report.batch, "micro_batch": fit_report.micro_batch}
    out = build_artifact(
        split,
        analysis.params,
        plan_dict,
        target,
        out_dir,
        arch=arch,
        model_name=analysis.name,
        model_sha256=analysis.imported.source.sha256,
        input_names=[names.get(n, n) for n in analysis.imported.input_names],
        output_names=[names.get(n, n) for n in analysis.imported.output_names],
        threads=threads,
        progress=progress,
        mcpu=mcpu,
        tuning_records=str(tuning_records) if tuning_records is not None else None,
    )
    return CompileResult(artifact_dir=Path(out), report=report, fit=fit_report)


#: the keyword arguments of the fit options, as compile_model / fit_and_plan / fit_analysis name them
FIT_KWARGS = ("fit", "quantize", "group_size", "prune", "max_prune", "max_prune_heads", "micro_batch", "prune_heads",
              "quantize_int8_weights", "quantize_calibration")


def wants_fit(*, fit: str | None = None, quantize: str | None = None, prune: float = 0.0, prune_heads: float = 0.0,
              micro_batch: int | str | None = None, **_other) -> bool:
    """Whether the fit options change the model at all (else :func:`cachefit.fit.fit_model` is not run)."""
    return bool(fit is not None or (quantize or "none") != "none" or prune or prune_heads or micro_batch is not None)


def check_fit_kwargs(*, fit=None, quantize=None, group_size=None, prune=0.0, max_prune=0.5, max_prune_heads=None,
                     prune_heads=0.0, quantize_int8_weights=None, **_other) -> None:
    """Refuse bad fit option values before any model is read (:func:`cachefit.fit.check_fit_options`)."""
    from .fit import check_fit_options

    check_fit_options(mode=fit or "none", quantize=quantize, group_size=group_size, prune=prune, max_prune=max_prune,
                      max_prune_heads=max_prune_heads, prune_heads=prune_heads, int8_weights=quantize_int8_weights)


def fit_analysis(analysis, *, cache=None, hardware=None, fit=None, quantize=None, group_size=None, prune=0.0,
                 max_prune=0.5, max_prune_heads=None, micro_batch=None, prune_heads=0.0,
                 quantize_int8_weights=None, quantize_calibration=None, footprint="exact", layers=None,
                 layer_boundaries=None, allow_spill=False, progress=None, refuse_unfit=False):
    """The fit options shared by ``cachefit plan`` and ``cachefit compile`` (:func:`cachefit.fit.fit_model`)
    on an analysed model: ``(rewritten analysis, FitReport)``, or ``(analysis, None)`` when no option
    changes the model. ``refuse_unfit`` (compile): a PlanError when ``fit="auto"`` leaves a layer over
    the capacity and spilling is not allowed."""
    from .errors import PlanError
    from .fit import fit_model
    from .planning import resolve_capacity

    check_fit_kwargs(fit=fit, quantize=quantize, group_size=group_size, prune=prune, max_prune=max_prune,
                     max_prune_heads=max_prune_heads, prune_heads=prune_heads,
                     quantize_int8_weights=quantize_int8_weights)
    if not wants_fit(fit=fit, quantize=quantize, prune=prune, prune_heads=prune_heads, micro_batch=micro_batch):
        return analysis, None
    cap, _hw = resolve_capacity(cache, hardware)
    new, fit_report = fit_model(analysis, cap, mode=fit or "none", quantize=quantize, group_size=group_size,
                                prune=prune, max_prune=max_prune, max_prune_heads=max_prune_heads,
                                micro_batch=micro_batch, footprint=footprint, layers=layers,
                                layer_boundaries=layer_boundaries, progress=progress,
                                calibration=quantize_calibration, int8_weights=quantize_int8_weights,
                                prune_heads=prune_heads)
    if progress:
        progress(fit_report.format_table())
    if refuse_unfit and fit == "auto" and not fit_report.fits and not allow_spill:
        raise PlanError("--fit auto could not make every layer fit:\n" + fit_report.format_table()
                        + "\nAn intra-layer split is not implemented: use more capacity (--cache/--hardware), "
                        "a larger --max-prune or --max-prune-heads, or --allow-spill")
    return new, fit_report


def fit_and_plan(model, *, input_shapes=None, batch: int | None = None, dtype: str | None = None,
                 cache: str | int | None = None, hardware=None, strategy: str = "greedy", devices: int | None = None,
                 footprint: str = "exact", layout: str | None = None, allow_spill: bool = False,
                 layers: int | None = None, layer_boundaries: Sequence[str] | None = None,
                 analysis: ModelAnalysis | None = None, progress: Callable[[str], None] | None = None,
                 **fit_kwargs) -> PlanReport:
    """``cachefit plan``: :func:`cachefit.planning.plan_model` after the fit options of ``cachefit
    compile`` that change a footprint (:data:`FIT_KWARGS`: ``fit``, ``quantize``, ``group_size``,
    ``prune``, ``max_prune``, ``max_prune_heads``, ``micro_batch``, ``prune_heads``,
    ``quantize_int8_weights``), applied as compile applies them (:func:`fit_analysis`), so that the
    plan's per-layer bytes are the ones compile plans with. A layer that ``fit="auto"`` leaves over
    the capacity is reported (the planner then refuses it unless ``allow_spill``).

    ``quantize_calibration`` is refused: GPTQ calibration changes the rounded weight values, never a
    byte of a footprint, so the plan would be the plan without it (after running the float model on
    the calibration batches for nothing)."""
    unknown = sorted(set(fit_kwargs) - set(FIT_KWARGS))
    if unknown:
        raise TypeError(f"fit_and_plan() got unexpected keyword arguments {unknown}")
    if fit_kwargs.get("quantize_calibration") is not None:
        raise CachefitError(f"--calibrate {fit_kwargs['quantize_calibration']}: GPTQ calibration changes the "
                            "rounded weight values, not a byte of any footprint, so the plan is the same without it: "
                            "leave --calibrate out of cachefit plan (cachefit compile takes it)")
    check_fit_kwargs(**fit_kwargs)
    fit_report = None
    if wants_fit(**fit_kwargs):
        if analysis is None:
            analysis = analyze_onnx(model, input_shapes=input_shapes, batch=batch, dtype=dtype, layers=layers,
                                    layer_boundaries=layer_boundaries)
        analysis, fit_report = fit_analysis(analysis, cache=cache, hardware=hardware, footprint=footprint,
                                            layers=layers, layer_boundaries=layer_boundaries,
                                            allow_spill=allow_spill, progress=progress, **fit_kwargs)
    report = plan_model(model, input_shapes=input_shapes, batch=batch, dtype=dtype, cache=cache, hardware=hardware,
                        strategy=strategy, devices=devices, footprint=footprint, layout=layout,
                        allow_spill=allow_spill, layers=layers, layer_boundaries=layer_boundaries, analysis=analysis)
    report.fit = fit_report
    return report


def reference_outputs(model_path: str | Path, inputs: dict, input_shapes=None) -> dict:
    """Run the original ONNX file in onnxruntime (the ground truth for ``cachefit demo`` and tests)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path))
    if m.ir_version > 10:
        m.ir_version = 10
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    res = sess.run(names, inputs)
    return dict(zip(names, res))
