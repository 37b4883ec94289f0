"""``cachefit compile``: ONNX -> layered Relax -> plan -> stages -> per-device libraries + manifest.

Data flows one way: frontend -> passes -> partition -> codegen -> artifact directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .analysis import ModelAnalysis, analyze_onnx
from .errors import CachefitError
from .planning import PlanReport, plan_model

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    artifact_dir: Path
    report: PlanReport

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
) -> CompileResult:
    """Compile an ONNX model into one library per device (see docs/artifact-format.md).

    The plan is made as by ``cachefit plan`` (``--cache``/``--hardware`` capacity, ``strategy``,
    ``devices``); each stage is compiled on its own for ``target`` (``llvm`` or ``cuda``/``arch``).
    """
    from tvm import relax  # noqa: F401  (TVM is needed from here on)

    from .codegen import build_artifact
    from .passes import run_pass
    from .passes.split_stages import SplitStages

    if target not in ("llvm", "cuda"):
        raise CachefitError(f"unknown --target {target!r}: use llvm (CPU devices) or cuda (GPUs)")
    if analysis is None:
        analysis = analyze_onnx(model, input_shapes=input_shapes, batch=batch, layers=layers,
                                layer_boundaries=layer_boundaries)
    if analysis.shape_only:
        raise CachefitError(
            f"{analysis.name} is shape-only (its external weight files were never written): it can be planned "
            "and estimated, not compiled. Export it with real weights to compile."
        )
    report = plan_model(model, cache=cache, hardware=hardware, strategy=strategy, devices=devices,
                        footprint=footprint, layout=layout, allow_spill=allow_spill, analysis=analysis)
    if progress:
        progress(f"plan: {report.plan.devices_used} stage(s), groups {report.plan.groups}")
    split = run_pass(SplitStages(report.plan.groups, target=target), analysis.mod)
    names = analysis.imported.original_names
    out = build_artifact(
        split,
        analysis.params,
        report.to_dict(),
        target,
        out_dir,
        arch=arch,
        model_name=analysis.name,
        model_sha256=analysis.imported.source.sha256,
        input_names=[names.get(n, n) for n in analysis.imported.input_names],
        output_names=[names.get(n, n) for n in analysis.imported.output_names],
        threads=threads,
        progress=progress,
    )
    return CompileResult(artifact_dir=Path(out), report=report)


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
