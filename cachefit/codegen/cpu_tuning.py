"""Optional tuning of the CPU matmul / conv tiles, and the records ``compile`` reuses.

The default schedules (:mod:`cachefit.codegen.cpu_schedule`) need no tuning: tile sizes come from
the SIMD width and the caches. :func:`tune_relax` measures, for every matmul-like kernel of a
module, a handful of alternative register tiles and packing / streaming choices on this machine,
and writes the winners (when they beat the default by a margin) to ``cachefit_tuning.json`` in a
work directory. ``compile_relax(..., tuning_records=work_dir)`` (the CLI's ``--tuning-records``,
as in tvmc) applies them; kernels without a record keep the default.

Records are keyed by the structural hash of the unscheduled kernel (:func:`workload_key`), so they
apply to the same layer shape in any model compiled through the same pipeline.

Why not meta-schedule's JSON database: in the TVM 0.27 wheel, serialising a TIR module to JSON
(``tvm.ir.save_json``, which ``JSONDatabase`` and meta-schedule's builder both use) crashes with a
segmentation fault, so its tuning cannot run here. ``compile_relax`` still accepts a meta-schedule
work directory (``database_workload.json`` + ``database_tuning_record.json``) written elsewhere.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx

from ..errors import CachefitError
from .cpu_schedule import CPUSpec, GemmRule, ScheduleCPU, gemm_form, workload_key

log = logging.getLogger(__name__)

RECORDS_FILE = "cachefit_tuning.json"
FORMAT = "cachefit-cpu-tuning"
VERSION = 1


def schedulable_module(mod: tvm.IRModule, target: tvm.target.Target, threads: int | None = None,
                       prepack: bool = True) -> tvm.IRModule:
    """The module as the CPU pipeline has it right before scheduling (fused, unscheduled PrimFuncs).

    prepack: as ``compile_relax(prepack=True)`` (what ``build_artifact`` compiles): matmul weights
    read from pre-packed panels; records are keyed by the kernel, so tune the way you compile.
    """
    from .pipeline import cpu_passes, host_llvm_target  # pylint: disable=import-outside-toplevel

    target = host_llvm_target(target)
    spec = CPUSpec.for_target(target, threads)
    passes = [p for p in cpu_passes(target, spec, prepack=prepack) if not isinstance(p, ScheduleCPU)]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def load_records(path: str | Path) -> dict:
    """Workload key -> tile configuration, from a work directory or a records file."""
    p = Path(path)
    if p.is_dir():
        p = p / RECORDS_FILE
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CachefitError(
            f"tuning records {str(path)!r} not found: expected {RECORDS_FILE} (written by "
            "cachefit.codegen.cpu_tuning.tune_relax) or a meta-schedule database; omit "
            "--tuning-records to compile with the default schedules"
        ) from None
    except (OSError, ValueError) as err:
        raise CachefitError(f"tuning records {str(p)!r} are unreadable ({err}); re-run the tuning") from err
    if data.get("format") != FORMAT or int(data.get("version", 0)) > VERSION:
        raise CachefitError(
            f"{str(p)!r} is not a cachefit tuning file of version <= {VERSION} "
            f"(format {data.get('format')!r}, version {data.get('version')!r}); re-run the tuning"
        )
    return {k: dict(v["config"]) for k, v in data.get("records", {}).items()}


def _candidates(form, spec: CPUSpec) -> list[dict]:
    """Tile configurations worth measuring for one matmul form: tiles that divide it, most
    accumulators first."""
    if form.kind == "nn":
        lanes = spec.lanes(form.dtype)
        width = form.packed or form.extents[form.j]  # a tile lies inside one pre-packed panel
        while lanes > 1 and (form.extents[form.j] % lanes or width % lanes):
            lanes //= 2
        nv = width // max(lanes, 1)
    else:
        nv = form.extents[form.j]
    tiles = [(mr, nr) for mr, nr in itertools.product((1, 2, 3, 4, 5, 6, 7, 8, 12, 14, 16), (1, 2, 3, 4, 6, 7))
             if 4 <= mr * nr <= spec.max_acc and form.m % mr == 0 and nv % nr == 0]
    tiles.sort(key=lambda t: -t[0] * t[1])
    out = [{"mr": mr, "nr": nr} for mr, nr in tiles]
    if form.kind == "nn" and not form.packed:
        out = [dict(c, pack=p) for c in out for p in (True, False)]
        if form.m <= 16:
            out += [dict(c, stream=True) for c in out if not c["pack"]]
    return out


def _time_func(func: tirx.PrimFunc, target, repeat: int = 15) -> float:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    rng = np.random.default_rng(0)
    args = []
    for p in func.params:
        shape = [int(s) for s in p.shape]
        dt = str(p.dtype)
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(dt) if "float" in dt else np.zeros(shape, dt)))
    probe = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=2)
    est = max(min(probe(*args).results), 1e-7)
    number = max(1, int(3e-4 / est))
    return min(lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args).results)


def tune_relax(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    work_dir: str | Path,
    *,
    threads: int | None = 1,
    max_trials: int = 24,
    min_gain: float = 0.03,
    op_names: list[str] | None = None,
    prepack: bool = True,
) -> Path:
    """Measure tile alternatives for every matmul-like kernel of ``mod``; write the winners.

    max_trials: candidates measured per kernel (the default configuration is always measured).
    min_gain:   a candidate is recorded only when it is this much faster than the default.
    op_names:   tune only the kernels whose name contains one of these strings.
    prepack:    tune the kernels of ``compile_relax(prepack=True)`` (``build_artifact``, ``cachefit
                compile``); False for modules compiled without it.
    Returns the records directory (existing records for other kernels are kept).
    """
    from .pipeline import host_llvm_target  # pylint: disable=import-outside-toplevel

    if target.kind.name != "llvm":
        raise CachefitError(
            f"tune_relax tunes CPU kernels; target kind {target.kind.name!r} is not 'llvm' "
            "(GPU kernels use dlight's default schedules)"
        )
    if max_trials < 1:
        raise CachefitError(f"max_trials={max_trials}: tuning needs at least one trial per kernel")
    target = host_llvm_target(target)
    spec = CPUSpec.for_target(target, threads)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / RECORDS_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    records = dict(data.get("records", {})) if data.get("format") == FORMAT else {}
    ready = schedulable_module(mod, target, threads, prepack=prepack)
    for gv, func in ready.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if op_names and not any(name in gv.name_hint for name in op_names):
            continue
        key = workload_key(func)
        from tvm import s_tir  # pylint: disable=import-outside-toplevel

        base = GemmRule(spec)
        default = base.apply(func, target, False)
        if default is None:
            continue
        sch = s_tir.Schedule(func)
        main = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]
        form = gemm_form(sch, main[0]) if len(main) == 1 else None
        if form is None:
            continue
        t0 = time.perf_counter()
        best_t = default_t = _time_func(default.mod["main"], target)
        best_cfg = None
        for cfg in _candidates(form, spec)[: max_trials]:
            rule = GemmRule(spec, {key: cfg})
            try:
                cand = rule.apply(func, target, False)
                if cand is None:
                    continue
                t = _time_func(cand.mod["main"], target)
            except Exception as err:  # pylint: disable=broad-except
                log.debug("candidate %s of %s failed: %s", cfg, gv.name_hint, err)
                continue
            if t < best_t:
                best_t, best_cfg = t, cfg
        log.info("%s: default %.3f ms, best %.3f ms %s (%.1f s)", gv.name_hint, default_t * 1e3,
                 best_t * 1e3, best_cfg, time.perf_counter() - t0)
        if best_cfg is not None and best_t < default_t * (1 - min_gain):
            records[key] = {"name": gv.name_hint, "config": best_cfg,
                            "default_ms": round(default_t * 1e3, 4), "best_ms": round(best_t * 1e3, 4)}
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "target": str(target),
                                "threads": spec.threads, "records": records}, indent=1))
    return work
