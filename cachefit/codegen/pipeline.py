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
from .cpu_schedule import CPUSpec, ScheduleCPU

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


def cpu_passes(target: tvm.target.Target, spec: CPUSpec, tuning_records: str | None = None) -> list:
    """The phases of the CPU pipeline up to scheduled TIR (before dataflow lowering)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    lanes = spec.lanes("float32")
    records, ms_passes = _records(tuning_records)
    return (
        # library dispatch (sampling, sort/scan): TVM's own
        cpu.library_dispatch_passes(target)
        # inference-only decompositions: batch norm becomes one multiply-add that fuses into convs
        + [FoldBatchNormScale(), relax.transform.DecomposeOpsForInference(), SumOfStackToAdd()]
        # legalize, conv2d as im2col + GEMM
        + [
            relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": make_conv2d_legalizer(lanes)}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
        ]
        # weight prologues into their matmul, then the usual fusion of epilogues
        + [
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


def cpu_pipeline(target: tvm.target.Target, threads: int | None = None, tuning_records: str | None = None):
    """The full Relax pipeline for an llvm target (a pass for ``tvm.compile(relax_pipeline=...)``)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # pylint: disable=import-outside-toplevel

    spec = CPUSpec.for_target(target, threads)
    passes = cpu_passes(target, spec, tuning_records)

    @tvm.transform.module_pass(opt_level=0, name="CachefitCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                passes + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            )
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
) -> relax.Executable:
    """Compile a Relax module for ``target`` with cachefit's schedules; returns the VM executable.

    threads:        cores the compiled stage will run on (llvm only). ``1`` emits no parallel loops;
                    ``None`` means every core of this machine. Set ``TVM_NUM_THREADS`` to the same
                    number when running the module.
    tuning_records: a work directory of :func:`cachefit.codegen.cpu_tuning.tune_relax`
                    (``cachefit_tuning.json``: tuned matmul / conv tiles) or of meta-schedule
                    (``database_workload.json`` + ``database_tuning_record.json``); records apply
                    to the kernels they cover, every other kernel keeps the default schedule.
    """
    target = _as_target(target)
    kind = target.kind.name
    if threads is not None and int(threads) < 1:
        raise CachefitError(f"threads={threads} is not a thread count: pass 1 or more (or None for all cores)")
    if kind == "llvm":
        target = host_llvm_target(target)
        pipeline = cpu_pipeline(target, threads, tuning_records)
    elif kind == "cuda":
        pipeline = cuda_pipeline(target, tuning_records)
    else:
        raise CachefitError(
            f"target kind {kind!r} is not supported by cachefit's compile pipeline: use 'llvm' or 'cuda'"
        )
    log.debug("compiling for %s (threads=%s, records=%s)", target, threads, tuning_records)
    return tvm.compile(mod, target, relax_pipeline=pipeline)


def default_threads() -> int:
    """``TVM_NUM_THREADS`` when set, else the number of cores."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1
