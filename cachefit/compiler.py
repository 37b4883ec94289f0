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
from .fit import check_fit_kwargs, fit_analysis
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
