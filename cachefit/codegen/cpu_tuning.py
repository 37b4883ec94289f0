"""Optional meta-schedule tuning of the kernels cachefit compiles, and records ``compile`` reuses.

The default schedules (:mod:`cachefit.codegen.cpu_schedule`) need no tuning. When a few more
percent matter, :func:`tune_relax` runs TVM's meta-schedule search on exactly the PrimFuncs that
:func:`cachefit.codegen.pipeline.compile_relax` would schedule (same legalization and fusion, so the
workloads match), and writes a JSON database to ``work_dir``. Passing that directory as
``tuning_records`` to ``compile_relax`` (the CLI's ``--tuning-records``, as in tvmc) applies the
records to the functions they cover; every other function keeps the default rules.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tvm

from ..errors import CachefitError
from .cpu_schedule import CPUSpec, ScheduleCPU

log = logging.getLogger(__name__)


def schedulable_module(mod: tvm.IRModule, target: tvm.target.Target, threads: int | None = None) -> tvm.IRModule:
    """The module as the CPU pipeline has it right before scheduling (fused, unscheduled PrimFuncs)."""
    from .pipeline import cpu_passes, host_llvm_target  # pylint: disable=import-outside-toplevel

    target = host_llvm_target(target)
    spec = CPUSpec.for_target(target, threads)
    passes = [p for p in cpu_passes(target, spec) if not isinstance(p, ScheduleCPU)]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def tune_relax(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    work_dir: str | Path,
    *,
    max_trials: int = 64,
    threads: int | None = None,
    op_names: list[str] | None = None,
) -> Path:
    """Tune the kernels of ``mod`` for ``target`` with meta-schedule; returns the records directory.

    max_trials: measured candidates over all kernels (meta-schedule's ``max_trials_global``).
    op_names:   tune only the kernels whose name contains one of these strings (all by default).
    """
    import importlib.util  # pylint: disable=import-outside-toplevel

    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    from .pipeline import host_llvm_target  # pylint: disable=import-outside-toplevel

    if importlib.util.find_spec("psutil") is None:
        raise CachefitError(
            "meta-schedule tuning needs the psutil package: pip install psutil "
            "(compiling without --tuning-records needs nothing extra)"
        )
    # the XGBoost cost model when it is installed, random search otherwise
    cost_model = "xgb" if importlib.util.find_spec("xgboost") is not None else "random"

    if target.kind.name != "llvm":
        raise CachefitError(
            f"tune_relax tunes CPU kernels; target kind {target.kind.name!r} is not 'llvm' "
            "(GPU kernels use dlight's default schedules)"
        )
    if max_trials < 1:
        raise CachefitError(f"max_trials={max_trials}: tuning needs at least one trial")
    target = host_llvm_target(target)
    if target.attrs.get("num-cores") is None:
        # meta-schedule requires the core count in the target
        import os  # pylint: disable=import-outside-toplevel

        cfg = {"kind": "llvm", "num-cores": int(threads or os.cpu_count() or 1)}
        for key in ("mcpu", "mtriple", "mattr"):
            if target.attrs.get(key) is not None:
                cfg[key] = target.attrs[key]
        target = tvm.target.Target(cfg)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ready = schedulable_module(mod, target, threads)
    log.info("tuning %s for %s into %s (%d trials)", [g.name_hint for g in ready.get_global_vars()][:8],
             target, work, max_trials)
    ms.relax_integration.tune_relax(
        mod=ready, params={}, target=target, work_dir=str(work), max_trials_global=int(max_trials),
        op_names=op_names, cost_model=cost_model,
    )
    return work
