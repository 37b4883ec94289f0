"""CPU kernels: cachefit's compiled models against onnxruntime, and the top kernels against numpy.

Usage::

    python bench/kernels.py                         # every model, 1 and 2 threads, kernel table
    python bench/kernels.py --models mlp-tiny resnet50 --threads 1
    python bench/kernels.py --no-kernels --json out.json

Each (model, thread count) runs in its own subprocess with ``TVM_NUM_THREADS`` and onnxruntime's
``intra_op_num_threads`` both set to the thread count; cachefit's module is compiled with
``compile_relax(..., threads=N, prepack=True)`` and called the way a cachefit stage is (weights as
run-time parameters, pre-packed at compile time as ``build_artifact`` stores them). The two runtimes are timed interleaved, in the same process, on the same input;
the table reports the minimum and the median of the per-call times and the throughput ratio
``onnxruntime time / cachefit time`` (>= 1.0: cachefit is at least as fast).

The kernel table times every distinct compiled PrimFunc of a model alone (single thread) and,
for the matmul-like ones, numpy's matmul of the same shape on one core in a subprocess where
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are unset (the BLAS kernel in use is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ["mlp-tiny", "dense-tiny", "dense-50mb", "gpt2-tiny", "llama-tiny", "resnet50", "vgg19", "squeezenet"]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_model(name: str):
    """The ONNX model of a bench name (cachefit.models presets when available)."""
    from cachefit.codegen import cpu_refmodels as ref

    if name in ("mlp-tiny", "dense-tiny", "dense-50mb"):
        try:
            from cachefit import models as cm

            if name == "dense-50mb":
                return cm.build("dense", layers=4, hidden=512, ffn=2048, seq=16, batch=2)
            return cm.build(name)
        except ImportError:
            if name == "mlp-tiny":
                return ref.mlp(batch=8, width=512, layers=6)
            if name == "dense-tiny":
                return ref.transformer_block(seq=16, d_model=160, heads=4, ffn=640, layers=4)
            return ref.dense_reference()
    if name == "mlp-8x256":
        return ref.mlp()
    if name == "gpt2-tiny":
        return ref.transformer_block(style="gpt2")
    if name == "llama-tiny":
        return ref.transformer_block(style="llama")
    if name == "convnet":
        return ref.small_convnet()
    return ref.light_model(name)


def import_model(model):
    import tvm.relax.frontend.onnx as rx_onnx
    from tvm import relax

    mod = rx_onnx.from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() if hasattr(p, "numpy") else np.asarray(p) for p in params.get("main", [])]


def model_inputs(model, seed: int = 1) -> dict:
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, 100, shape).astype(dtype)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def weight_bytes(model) -> int:
    return sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)


# ---------------------------------------------------------------------------------------------
# One (model, threads) measurement: runs in a worker process
# ---------------------------------------------------------------------------------------------


def _timed(fn, budget_s: float, max_calls: int = 400) -> list[float]:
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    n = int(max(5, min(max_calls, budget_s / max(one, 1e-6))))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_model(name: str, threads: int, budget_s: float, tuning_records: str | None = None) -> dict:
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from cachefit.codegen.pipeline import compile_relax

    model = build_model(name)
    feeds = model_inputs(model)
    mod, params = import_model(model)
    t0 = time.perf_counter()
    compiled = compile_relax(mod, tvm.target.Target({"kind": "llvm"}), threads=threads, prepack=True,
                            tuning_records=tuning_records)
    packed = compiled.pack(params)  # the weights as a stage stores them: pre-packed at compile time
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    fn = vm["main"]
    args = [tvm.runtime.tensor(v) for v in feeds.values()] + packed

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    ref = sess.run(None, feeds)[0]
    out = fn(*args)
    out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    rel_err = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-30))

    # interleave: rounds of (cachefit, onnxruntime) so that both see the same machine load
    t_tvm, t_ort = [], []
    for _ in range(4):
        t_tvm += _timed(lambda: fn(*args), budget_s / 8)
        t_ort += _timed(lambda: sess.run(None, feeds), budget_s / 8)
    return {
        "model": name, "threads": threads, "weight_bytes": weight_bytes(model),
        "compile_s": round(compile_s, 2), "max_rel_err": rel_err,
        "cachefit_ms_min": min(t_tvm) * 1e3, "cachefit_ms_median": float(np.median(t_tvm)) * 1e3,
        "ort_ms_min": min(t_ort) * 1e3, "ort_ms_median": float(np.median(t_ort)) * 1e3,
        "ratio_min": min(t_ort) / min(t_tvm), "ratio_median": float(np.median(t_ort) / np.median(t_tvm)),
    }


# ---------------------------------------------------------------------------------------------
# Per-kernel table
# ---------------------------------------------------------------------------------------------


def _gemm_shape(func):
    """(batch, M, N, K) of the multiply-accumulate block of a scheduled PrimFunc, before tiling."""
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit(node):
        if type(node).__name__ == "SBlock" and node.init is not None:
            iters = [(iv.iter_type, int(iv.dom.extent)) for iv in node.iter_vars]
            found.append((node.name_hint, iters))

    tvm_ffi.structural_walk(func.body, visit, order="post")
    for name, iters in found:
        if name.endswith("_rf") or "rf" in name.split("_"):
            continue
        spatial = [e for t, e in iters if t == tirx.IterVar.DataPar]
        reduce = [e for t, e in iters if t == tirx.IterVar.CommReduce]
        if reduce and len(spatial) >= 1:
            return name, spatial, reduce
    return None


def kernel_table(name: str, top: int = 8) -> dict:
    """Time each distinct PrimFunc of the model's single-thread build (one thread), with FLOP rates."""
    import tvm
    from tvm import relax

    from cachefit.codegen.cpu_schedule import CPUSpec, ScheduleCPU
    from cachefit.codegen.pipeline import cpu_passes, host_llvm_target

    model = build_model(name)
    mod, _ = import_model(model)
    target = host_llvm_target(tvm.target.Target({"kind": "llvm"}))
    spec = CPUSpec.for_target(target, 1)
    with target:
        passes = cpu_passes(target, spec, prepack=True)
        assert isinstance(passes[-1], ScheduleCPU)
        unscheduled = tvm.transform.Sequential(passes[:-1])(mod)
        lowered = passes[-1](unscheduled)
    calls: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            gname = expr.args[0].name_hint
            calls[gname] = calls.get(gname, 0) + 1

    relax.analysis.post_order_visit(lowered["main"].body, visit)
    rows = []
    rng = np.random.default_rng(0)
    for gname, count in calls.items():
        func = lowered[gname]
        single = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        lib = tvm.compile(single, target)
        args = []
        for p in func.params:
            shape = [int(s) for s in p.shape]  # a PrimFunc parameter is its buffer in TVM 0.27
            dt = str(p.dtype)
            arr = rng.standard_normal(shape).astype(dt) if "float" in dt else np.zeros(shape, dt)
            args.append(tvm.runtime.tensor(arr))
        secs = _min_time(lib, args)
        g = _gemm_shape(unscheduled[gname])
        flops = None
        shape_txt = ""
        gemm = None
        if g is not None:
            bname, spatial, reduce = g
            flops = 2 * int(np.prod(spatial)) * int(np.prod(reduce))
            shape_txt = f"{bname}: S{spatial} R{reduce}"
            if len(spatial) >= 2:
                gemm = (int(np.prod(spatial[:-2])) if len(spatial) > 2 else 1, spatial[-2], spatial[-1], int(np.prod(reduce)))
        rows.append({"kernel": gname, "calls": count, "ms": secs * 1e3, "total_ms": secs * 1e3 * count,
                     "gflops": (flops / secs / 1e9) if flops else None, "shape": shape_txt, "gemm": gemm})
    rows.sort(key=lambda r: -r["total_ms"])
    rows = rows[:top]
    gemms = [r["gemm"] for r in rows if r["gemm"]]
    np_rates = numpy_matmul_rates(gemms) if gemms else {"rates": [], "blas": None}
    for r, rate in zip([r for r in rows if r["gemm"]], np_rates["rates"]):
        r["numpy_gflops"] = rate
    return {"model": name, "kernels": rows, "blas": np_rates["blas"]}


def _min_time(lib, args) -> float:
    """Minimum per-call time: short repeats (about 0.3 ms each) so that a shared, loaded machine
    still gives some undisturbed ones; the minimum over 60 repeats."""
    import tvm

    probe = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=3)
    est = max(min(probe(*args).results), 1e-7)
    number = max(1, int(3e-4 / est))
    timer = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=60)
    return min(timer(*args).results)


_NUMPY_SNIPPET = r"""
import json, sys, time, numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
shapes = json.loads(sys.argv[1])
rates = []
with threadpool_limits(1):
    for b, m, n, k in shapes:
        a = np.random.rand(b, m, k).astype(np.float32) if b > 1 else np.random.rand(m, k).astype(np.float32)
        w = np.random.rand(k, n).astype(np.float32)
        a @ w
        best = 1e9
        for _ in range(60):
            reps = max(1, int(1e7 / (2 * b * m * n * k + 1)))
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ w
            best = min(best, (time.perf_counter() - t0) / reps)
        rates.append(2 * b * m * n * k / best / 1e9)
info = [d for d in threadpool_info() if d.get("user_api") == "blas"]
print(json.dumps({"rates": rates, "blas": info[0] if info else None}))
"""


def numpy_matmul_rates(shapes) -> dict:
    """numpy matmul GFLOP/s for (batch, M, N, K) shapes on one core, in a clean subprocess."""
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    env["OPENBLAS_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _NUMPY_SNIPPET, json.dumps(shapes)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _worker(args) -> None:
    if args.kernel_table:
        print("RESULT " + json.dumps(kernel_table(args.model, args.top)))
    else:
        print("RESULT " + json.dumps(measure_model(args.model, args.threads, args.budget, args.tuning_records)))


def _spawn(model: str, threads: int, budget: float, kernels: bool = False, top: int = 8,
           tuning_records: str | None = None) -> dict:
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--threads", str(threads),
           "--budget", str(budget), "--top", str(top)]
    if kernels:
        cmd.append("--kernel-table")
    if tuning_records:
        cmd += ["--tuning-records", tuning_records]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"model": model, "threads": threads, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def _fmt_model_table(results: list[dict]) -> str:
    lines = [
        "| model | weights MB | threads | cachefit ms (min / median) | onnxruntime ms (min / median) "
        "| ratio ort/cachefit (min / median) | max rel err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['threads']} | error: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['weight_bytes'] / 1e6:.1f} | {r['threads']} "
            f"| {r['cachefit_ms_min']:.3f} / {r['cachefit_ms_median']:.3f} "
            f"| {r['ort_ms_min']:.3f} / {r['ort_ms_median']:.3f} "
            f"| **{r['ratio_min']:.2f}x** / {r['ratio_median']:.2f}x | {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def _fmt_kernel_table(tab: dict) -> str:
    if "error" in tab:
        return f"{tab['model']}: error {tab['error']}"
    lines = [
        f"{tab['model']} (one thread; numpy BLAS: "
        f"{(tab.get('blas') or {}).get('internal_api', '?')} {(tab.get('blas') or {}).get('architecture', '?')})",
        "",
        "| kernel | calls | ms/call | total ms | GFLOP/s | numpy matmul GFLOP/s | shape |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in tab["kernels"]:
        gf = f"{r['gflops']:.1f}" if r.get("gflops") else ""
        npg = f"{r['numpy_gflops']:.1f}" if r.get("numpy_gflops") else ""
        lines.append(f"| {r['kernel']} | {r['calls']} | {r['ms']:.3f} | {r['total_ms']:.3f} | {gf} | {npg} | {r['shape']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per runtime")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    ap.add_argument("--kernel-models", nargs="*", default=None, help="models for the kernel table")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tuning-records", default=None,
                    help="compile the models with these tile records (cachefit.codegen.cpu_tuning)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kernel-table", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        _worker(args)
        return 0
    results = []
    for model in args.models:
        for th in args.threads:
            r = _spawn(model, th, args.budget, tuning_records=args.tuning_records)
            results.append(r)
            print(_fmt_model_table([r]).splitlines()[-1], flush=True)
    print()
    print(_fmt_model_table(results))
    tables = []
    if not args.no_kernels:
        for model in args.kernel_models or args.models:
            tab = _spawn(model, 1, args.budget, kernels=True, top=args.top)
            tables.append(tab)
            print()
            print(_fmt_kernel_table(tab), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"models": results, "kernels": tables}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
