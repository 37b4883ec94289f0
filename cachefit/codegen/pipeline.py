"""The one compile entry point of cachefit: a Relax module to a VM executable, with fast kernels.

``compile_relax`` replaces ``tvm.compile(mod, target)``: TVM 0.27's default CPU pipeline schedules no
kernel (a 512^3 matmul at ~2 GFLOP/s), and its CUDA pipeline is only legal with dlight's GPU rules.

- ``llvm`` targets: batch norm decomposed for inference, conv2d lowered to im2col + GEMM
  (:mod:`cachefit.codegen.cpu_legalize`), weight prologues (transpose, dequantize) fused into their
  matmul, the usual operator fusion, then cachefit's CPU schedules
  (:mod:`cachefit.codegen.cpu_schedule`) tiled for this machine's caches and SIMD width, parallel
  when the stage owns several threads. Tuning records (``tuning_records``: cachefit's tile records
  or a meta-schedule database) apply to the kernels they cover; the rest keeps the default rules,
  so a compile never needs tuning.
- ``cuda`` targets: TVM's CUDA pipeline with dlight's GPU rules (Matmul, GEMV, Reduction,
  GeneralReduction, Fallback) under ``with target``; tuning records are applied first when given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import tvm
from tvm import relax

from ..errors import CachefitError
from .cpu_fastmath import VectorMath
from .cpu_legalize import (
    FoldBatchNormScale,
    FuseWeightPrologue,
    IsolateParamMath,
    SumOfStackToAdd,
    make_conv2d_legalizer,
)
from .concat_views import ConcatIntoStorage, legalize_concat
from .cpu_schedule import CPUSpec, ScheduleCPU
from .prepack import CompiledModule, LiftWeightPacks, PackMatmulWeights, packed_layouts

log = logging.getLogger(__name__)


def host_llvm_target(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with ``mcpu`` set to this host's CPU when it names none.

    Without ``mcpu`` LLVM emits baseline x86-64 code (SSE2: a quarter of the AVX-512 width).
    An explicit ``mcpu`` (cross compilation for another CPU) is kept as given.
    """
    if target.kind.name != "llvm" or target.attrs.get("mcpu"):
        return target
    from tvm.target.codegen import llvm_get_system_cpu  # pylint: disable=import-outside-toplevel

    cpu = str(llvm_get_system_cpu())
    if not cpu or cpu == "generic":
        return target
    config = {"kind": "llvm", "mcpu": cpu}
    for key in ("mtriple", "mattr", "num-cores", "opt-level"):
        if target.attrs.get(key) is not None:
            config[key] = target.attrs[key]
    try:
        return tvm.target.Target(config)
    except Exception:  # pylint: disable=broad-except
        log.debug("cannot add mcpu=%s to %s; keeping the target as given", cpu, target)
        return target


def _as_target(target) -> tvm.target.Target:
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target in ("llvm", "cuda"):
        return tvm.target.Target({"kind": target})
    if isinstance(target, dict):
        return tvm.target.Target(target)
    raise CachefitError(
        f"unsupported compile target {target!r}: pass a tvm.target.Target, "
        "e.g. Target({'kind': 'llvm'}) or Target({'kind': 'cuda', 'arch': 'sm_90a'})"
    )


def _records(tuning_records: str | None) -> tuple[dict, list]:
    """(cachefit tile records, meta-schedule passes) for a ``--tuning-records`` path."""
    if tuning_records is None:
        return {}, []
    path = Path(tuning_records)
    if path.is_dir() and (path / "database_workload.json").exists() and (path / "database_tuning_record.json").exists():
        return {}, [relax.transform.MetaScheduleApplyDatabase(str(path))]
    from .cpu_tuning import load_records  # pylint: disable=import-outside-toplevel

    return load_records(path), []


def _conv_layout_passes(lanes: int, winograd: bool = False) -> list:
    """``BlockConvLayout`` (cachefit.codegen.cpu_conv) when present and the target has 8+ lanes
    (``winograd``: 3x3 stride-1 convolutions as Winograd F(2x2, 3x3), whose weight transform
    must run at compile time: with prepack only)."""
    try:
        from .cpu_conv import BlockConvLayout  # pylint: disable=import-outside-toplevel
    except ImportError:  # pragma: no cover - the conv module is optional
        return []
    return [BlockConvLayout(lanes, winograd=winograd)] if lanes >= 8 else []


def cpu_front_passes(target: tvm.target.Target, spec: CPUSpec, prepack: bool = False) -> list:
    """The CPU pipeline up to legalised, unfused Relax (with ``prepack``: weight packs lifted)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    lanes = spec.lanes("float32")
    return (
        # library dispatch (sampling, sort/scan): TVM's own
        cpu.library_dispatch_passes(target)
        # inference-only decompositions: batch norm becomes one multiply-add that fuses into convs
        + [FoldBatchNormScale(prepack), relax.transform.DecomposeOpsForInference(), SumOfStackToAdd()]
        # chains of convolutions in channel-blocked NCHWc, their weights packed (cpu_conv)
        + _conv_layout_passes(lanes, winograd=prepack)
        # matmul weights as column panels (packs that run at compile time), with prepack only
        + ([PackMatmulWeights(lanes)] if prepack else [])
        # legalize, conv2d as im2col + GEMM
        + [
            relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": make_conv2d_legalizer(lanes),
                                                                "relax.concat": legalize_concat}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
        ]
        # marked weight packs (cachefit.weight_pack) to compile time, before anything fuses them;
        # without prepack they stay in the graph and run on every call
        + ([relax.transform.DeadCodeElimination(), LiftWeightPacks()] if prepack else [])
    )


def cpu_back_passes(target: tvm.target.Target, spec: CPUSpec, tuning_records: str | None = None) -> list:
    """The CPU pipeline from legalised Relax to scheduled TIR (before dataflow lowering)."""
    records, ms_passes = _records(tuning_records)
    return (
        # weight prologues into their matmul, then the usual fusion of epilogues
        [
            FuseWeightPrologue(),
            relax.transform.DeadCodeElimination(),
            relax.transform.FuseTIR(),
            relax.transform.AnnotateTIROpPattern(),
            IsolateParamMath(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        # vectorisable exp / erf / tanh / sigmoid (libm calls are scalar)
        + [VectorMath()]
        # schedules: meta-schedule records first when given, cachefit's rules (with their tuned
        # tiles) for the rest
        + ms_passes
        + [ScheduleCPU(target, spec, records)]
    )


def cpu_finalize_passes(target: tvm.target.Target) -> list:
    """TVM's finalize passes (memory planning to VM code) with the copies of concatenations
    whose producers can write into the output removed after the plan (:mod:`.concat_views`)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    out = []
    for p in cpu.finalize_passes(target):
        out.append(p)
        if p.info.name == "StaticPlanBlockMemory":
            out.append(ConcatIntoStorage())
    return out


def cpu_passes(target: tvm.target.Target, spec: CPUSpec, tuning_records: str | None = None,
               prepack: bool = False) -> list:
    """The phases of the CPU pipeline up to scheduled TIR (before dataflow lowering)."""
    return cpu_front_passes(target, spec, prepack) + cpu_back_passes(target, spec, tuning_records)


def cpu_pipeline(target: tvm.target.Target, threads: int | None = None, tuning_records: str | None = None,
                 prepack: bool = False, layouts: dict | None = None):
    """The full Relax pipeline for an llvm target (a pass for ``tvm.compile(relax_pipeline=...)``).

    prepack: lift weight packs to compile time (:mod:`cachefit.codegen.prepack`); the lifted
             functions' weight parameters are written into ``layouts`` (function name -> list of
             :class:`~cachefit.codegen.prepack.PackedParam`) when given.
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    spec = CPUSpec.for_target(target, threads)
    front = cpu_front_passes(target, spec, prepack)
    back = cpu_back_passes(target, spec, tuning_records)

    @tvm.transform.module_pass(opt_level=0, name="CachefitCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(front)(mod)
            if layouts is not None:
                layouts.update(packed_layouts(mod))
            seq = tvm.transform.Sequential(back + cpu.dataflow_lower_passes(target) + cpu_finalize_passes(target))
            return seq(mod)

    return _pipeline


def cuda_pipeline(target: tvm.target.Target, tuning_records: str | None = None):
    """TVM's CUDA pipeline with dlight's default GPU schedules (thread bindings for every kernel)."""
    from tvm.relax.backend.cuda import pipeline as cuda  # pylint: disable=import-outside-toplevel
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    schedule = _records(tuning_records)[1] + [
        dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )
    ]

    @tvm.transform.module_pass(opt_level=0, name="CachefitCUDAPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target) + legalize + schedule
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def compile_relax(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    threads: int | None = None,
    tuning_records: str | None = None,
    prepack: bool = False,
):
    """Compile a Relax module for ``target`` with cachefit's schedules; returns the VM executable
    (with ``prepack``: a :class:`~cachefit.codegen.prepack.CompiledModule`).

    threads:        cores the compiled stage will run on (llvm only). ``1`` emits no parallel loops;
                    ``None`` means every core of this machine. Set ``TVM_NUM_THREADS`` to the same
                    number when running the module.
    tuning_records: a work directory of :func:`cachefit.codegen.cpu_tuning.tune_relax`
                    (``cachefit_tuning.json``: tuned matmul / conv tiles) or of meta-schedule
                    (``database_workload.json`` + ``database_tuning_record.json``); records apply
                    to the kernels they cover, every other kernel keeps the default schedule.
    prepack:        weights are known at compile time: matmul weights are packed into column
                    panels and every marked weight pack (``cachefit.weight_pack``) runs once, at
                    compile time; returns a ``CompiledModule`` whose ``pack(weights)`` computes
                    the weights the compiled functions take (``.params(func)`` describes them).
                    Without it, the compiled functions take the original weights (marked packs
                    then run on every call). CUDA targets take the original weights either way.
    """
    target = _as_target(target)
    kind = target.kind.name
    if threads is not None and int(threads) < 1:
        raise CachefitError(f"threads={threads} is not a thread count: pass 1 or more (or None for all cores)")
    if kind == "llvm":
        target = host_llvm_target(target)
        layouts: dict = {}
        pipeline = cpu_pipeline(target, threads, tuning_records, prepack=prepack, layouts=layouts)
        log.debug("compiling for %s (threads=%s, records=%s, prepack=%s)", target, threads, tuning_records, prepack)
        ex = tvm.compile(mod, target, relax_pipeline=pipeline)
        return CompiledModule(ex, layouts) if prepack else ex
    elif kind == "cuda":
        pipeline = cuda_pipeline(target, tuning_records)
    else:
        raise CachefitError(
            f"target kind {kind!r} is not supported by cachefit's compile pipeline: use 'llvm' or 'cuda'"
        )
    log.debug("compiling for %s (records=%s)", target, tuning_records)
    ex = tvm.compile(mod, target, relax_pipeline=pipeline)
    return CompiledModule(ex, {}) if prepack else ex


def default_threads() -> int:
    """``TVM_NUM_THREADS`` when set, else the number of cores."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1
