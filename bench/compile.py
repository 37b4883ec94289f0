"""Compile-time benchmark: per-stage and total compile time of the small dense model, llvm and cuda.

    python bench/compile.py                       # dense-tiny, 4 stages, llvm and cuda, reuse off and on
    python bench/compile.py --stages 2 --targets llvm --model moe-tiny
    python bench/compile.py --json out.json

The model is exported, imported and analysed once (reported as "import + plan analysis"); then
``cachefit.compiler.compile_model`` splits it into ``--stages`` stages and builds one library per
stage for each target. Per-stage times are the manifest's ``compile_seconds`` (wall: extract,
compile, export, and for cuda the nvcc fatbin build); "total wall" is the whole build, weights files
and manifest included; "total CPU" is user + system time of this process and its children (gcc,
nvcc), which does not grow when other jobs share the cores. CUDA needs nvcc (no GPU): without it that target is reported as
skipped. ``--reuse`` compares compiling every stage (off) with compiling structurally identical
stages once (on, the default of ``build_artifact``): dense-tiny's four blocks are identical, so with
reuse one library per target is compiled and copied.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefit import models  # noqa: E402
from cachefit.analysis import analyze_onnx  # noqa: E402
from cachefit.codegen.cuda import CudaToolchainError, find_nvcc  # noqa: E402
from cachefit.codegen import build_artifact  # noqa: E402
from cachefit.passes.split_stages import SplitStages  # noqa: E402
from cachefit.planning import plan_model  # noqa: E402


def bench(model: str, stages: int, targets: list[str], arch: str, work: Path, reuse: bool) -> dict:
    path = models.export(model, work / f"{model}.onnx")
    t0 = time.perf_counter()
    analysis = analyze_onnx(path)
    import_s = time.perf_counter() - t0
    report = plan_model(path, cache="1GB", strategy="balanced", devices=stages, analysis=analysis)
    result = {"model": model, "stages": stages, "import_analysis_seconds": import_s, "targets": {},
              "reuse_identical_stages": reuse, "groups": [list(g) for g in report.plan.groups],
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    for target in targets:
        if target == "cuda":
            try:
                find_nvcc()
            except CudaToolchainError as exc:
                result["targets"][target] = {"skipped": str(exc)}
                continue
        out = work / f"build-{target}"
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        # what cachefit.compiler.compile_model does after planning, with the reuse switch exposed
        split = SplitStages(report.plan.groups, target=target)(analysis.mod)
        build_artifact(split, analysis.params, report.to_dict(), target, out, arch=arch, model_name=model,
                       reuse_identical_stages=reuse)
        total = time.perf_counter() - t0
        cpu = _cpu_seconds() - c0
        manifest = json.loads((out / "manifest.json").read_text())
        result["targets"][target] = {
            "total_seconds": total,
            "cpu_seconds": cpu,
            "stage_seconds": [s["compile_seconds"] for s in manifest["stages"]],
            "reused_from": [s.get("reused_from") for s in manifest["stages"]],
            "layers": [[s["layers"]["first"], s["layers"]["last"]] for s in manifest["stages"]],
            "library_bytes": [s["library"]["bytes"] for s in manifest["stages"]],
        }
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (gcc, nvcc): user + system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def table(result: dict) -> str:
    lines = [f"{result['model']}, {result['stages']} stages {result['groups']}, {result['cpu_count']} cores, "
             f"identical stages {'compiled once' if result['reuse_identical_stages'] else 'each compiled'}; "
             f"import + plan analysis {result['import_analysis_seconds']:.1f} s", "",
             "| target | " + " | ".join(f"stage {i} (s)" for i in range(result["stages"]))
             + " | total wall (s) | total CPU (s) |",
             "|---|" + "---|" * (result["stages"] + 2)]
    grand = grand_cpu = 0.0
    for target, r in result["targets"].items():
        if "skipped" in r:
            lines.append(f"| {target} | skipped: {r['skipped']} |")
            continue
        grand += r["total_seconds"]
        grand_cpu += r["cpu_seconds"]
        lines.append(f"| {target} | " + " | ".join(
            f"{s:.1f}" + (f" (= stage {src})" if src is not None else "") for s, src in zip(r["stage_seconds"], r["reused_from"]))
                     + f" | {r['total_seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    lines += ["", f"all targets: {grand:.1f} s wall, {grand_cpu:.1f} s CPU "
              f"(+ {result['import_analysis_seconds']:.1f} s import); load average before: {result['loadavg']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dense-tiny")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--targets", default="llvm,cuda")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--reuse", choices=["both", "on", "off"], default="both",
                    help="Compile structurally identical stages once (on), each time (off), or report both.")
    ap.add_argument("--json", default=None, help="Also write the numbers to this file.")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.reuse]
    results = []
    for reuse in modes:
        with tempfile.TemporaryDirectory(prefix="cachefit-bench-compile-") as tmp:
            results.append(bench(args.model, args.stages, targets, args.arch, Path(tmp), reuse))
        print(table(results[-1]))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
