"""Winograd F(2x2, 3x3) / F(4x4, 3x3) against the direct NCHWc kernel, layer by layer.

Each layer (3x3, stride 1, padding 1, batch 1, float32) is compiled alone three ways by
cachefit's rules (``cachefit.codegen.cpu_conv``): the direct register-tiled kernel, Winograd with
m = 2 and m = 4; the weights are packed beforehand (as ``prepack`` stores them). The three run
interleaved in rounds on the same input; the table gives each one's minimum time per call, the
speedups over the direct kernel measured in the same run, and the maximum relative error of each
Winograd output against the direct one.

    python bench/winograd.py [--threads 1] [--rounds 8] [--layers 64x64x56 128x128x28 ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

DEFAULT_LAYERS = ["64x64x56", "128x128x28", "256x256x14", "512x512x14", "512x512x28",
                  "64x64x224", "128x128x112", "64x256x13", "32x128x27", "16x64x55", "512x512x7"]


def _build(func, target, spec, schedule=True):
    import tvm

    from cachefit.codegen import cpu_conv as cc

    if schedule:
        sch = cc.NCHWcConvRule(spec).apply(func, target, False)
        func = sch.mod["main"]
    with target:
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]


def _min_call(fn, args, calls: int = 10) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(ci: int, co: int, hw: int, threads: int, rounds: int) -> dict:
    import tvm

    from cachefit.codegen import cpu_conv as cc
    from cachefit.codegen.cpu_schedule import CPUSpec
    from cachefit.codegen.pipeline import host_llvm_target

    target = host_llvm_target(tvm.target.Target({"kind": "llvm"}))
    spec = CPUSpec.for_target(target, threads)
    cib, cob = -(-ci // 16), -(-co // 16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cib, hw, hw, 16)).astype("float32")
    w = (rng.standard_normal((co, ci, 3, 3)) / np.sqrt(9 * ci)).astype("float32")
    dev = tvm.cpu()

    def packed(pack_func, shape):
        out = tvm.runtime.tensor(np.zeros(shape, "float32"), dev)
        _build(pack_func, target, spec, schedule=False)(tvm.runtime.tensor(w, dev), out)
        return out

    xt = tvm.runtime.tensor(x, dev)
    _, _, owp = cc.choose_tile(hw, cob)
    kernels = {"direct": (_build(cc.conv2d_nchwc_func(1, cib, 16, hw, hw, cob, 16, 3, 3, (1, 1), (1, 1, 1, 1),
                                                      (1, 1), owp), target, spec),
                          packed(cc.pack_weight_func(co, ci, 3, 3, 16, 16), (cob, cib, 3, 3, 16, 16)))}
    for m in (2, 4):
        ocr = cc.choose_tile(-(-hw // m), cob)[1]
        a2 = (m + 2) ** 2
        kernels[f"m{m}"] = (_build(cc.conv2d_winograd_func(1, cib, 16, hw, hw, cob, 16, (1, 1, 1, 1), ocr, m),
                                   target, spec),
                            packed(cc.winograd_weight_func(co, ci, 16, 16, ocr, m), (a2, cob // ocr, cib, 16, ocr * 16)))
    outs = {k: tvm.runtime.tensor(np.zeros((1, cob, hw, hw, 16), "float32"), dev) for k in kernels}
    for k, (fn, wt) in kernels.items():
        fn(xt, wt, outs[k])
    ref = outs["direct"].numpy()
    err = {k: float(np.abs(outs[k].numpy() - ref).max() / np.abs(ref).max()) for k in ("m2", "m4")}
    best = {k: float("inf") for k in kernels}
    for _ in range(rounds):
        for k, (fn, wt) in kernels.items():
            best[k] = min(best[k], _min_call(fn, (xt, wt, outs[k])))
    flops = 2 * co * ci * 9 * hw * hw
    return {"layer": f"{ci}->{co} @{hw}x{hw}", "ms": {k: v * 1e3 for k, v in best.items()},
            "gflops_direct": flops / best["direct"] / 1e9, "err": err,
            "eligible": cc.winograd_eligible(3, 3, (1, 1), (1, 1), cib, 16, 16, hw, hw),
            "chosen": cc.winograd_tile(hw, hw)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--layers", nargs="*", default=DEFAULT_LAYERS, help="CIxCOxSIZE")
    args = ap.parse_args(argv)
    print(f"threads={args.threads}, rounds={args.rounds}; ms = minimum per call; speedup = direct / Winograd, same run")
    print("| layer | direct ms (GFLOP/s) | F(2x2) ms | F(4x4) ms | F(2x2) speedup | F(4x4) speedup "
          "| max rel err F(2x2) / F(4x4) | compile takes |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for spec in args.layers:
        ci, co, hw = (int(v) for v in spec.split("x"))
        r = measure(ci, co, hw, args.threads, args.rounds)
        ms = r["ms"]
        took = f"F({r['chosen']}x{r['chosen']})" if r["eligible"] else "direct"
        print(f"| {r['layer']} | {ms['direct']:.3f} ({r['gflops_direct']:.0f}) | {ms['m2']:.3f} | {ms['m4']:.3f} "
              f"| {ms['direct'] / ms['m2']:.2f}x | {ms['direct'] / ms['m4']:.2f}x "
              f"| {r['err']['m2']:.1e} / {r['err']['m4']:.1e} | {took} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
