"""Cost-model benchmarks.

    python bench/costmodel.py paper            # the numbers of docs/paper-check.md (seconds)
    python bench/costmodel.py cpu [--stages 1,2,3,4] [--repeat 20] [--model dense-tiny] [--diagnose]
                                               # calibration: predicted vs measured per-stage time
                                               # of the compiled dense reference model on this CPU

``paper`` works from shapes alone (cachefit.perf.analytic, cross-checked against the Relax IR
analysis of the exported shape-only ONNX files). ``cpu`` compiles the model into k stages,
calibrates this CPU with TVM kernels (``cachefit calibrate``'s measurements: generic shapes, not the
model), times every stage on one core and compares with the per-kernel cost model (each layer's
kernels from its Relax IR, timed with the calibrated kernel table) and with the older
``flops / peak`` model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefit.models.presets import active_params, num_params, resolve  # noqa: E402
from cachefit.perf.analytic import preset_records, transformer_records  # noqa: E402
from cachefit.perf.estimate import estimate_layers  # noqa: E402
from cachefit.perf.hardware import format_bytes, get_hardware  # noqa: E402

PAPER = ("paper-dense", "paper-moe")
TARGETS = {"paper-dense": 1.20, "paper-moe": 1.31}


def _table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ms(t: float) -> str:
    return f"{t * 1e3:.3f}"


def _estimate(name: str, *, micro: int | None = None, in_flight: int | None = None, eff: float = 1.0,
              link: float = 900e9, overlap: bool = False, usable: float | None = None, bits: int | None = None,
              compare: str = "tp8pp2,pp16", fused: bool = False):
    hw = dataclasses.replace(get_hardware("h100"), link_bw=link)
    p = resolve(name)
    recs = preset_records(name, fused_attention=fused)
    return estimate_layers(recs, hardware=hw, devices=16, tokens_per_batch=p["batch"] * p["seq"], compare=compare,
                           micro_batch=micro, in_flight=in_flight, compute_efficiency=eff, usable_fraction=usable,
                           weight_bits=bits, overlap_allreduce=overlap, model_name=name)


def paper() -> str:
    out = []
    h100 = get_hardware("h100")
    # 1. the models from their shapes
    rows = []
    for name in ("paper-dense", "paper-moe", "paper-dense-30b"):
        p = resolve(name)
        recs = preset_records(name, fused_attention=True)
        w = sum(r.weight_bytes for r in recs)
        layer = recs[0]
        tokens = p["batch"] * p["seq"]
        need = []
        for bits in (16, 8, 4):
            for frac in (1.0, 0.7):
                cap = h100.onchip_bytes * frac
                need.append(math.ceil(w * bits / 16 / cap))
        rows.append([
            name, f"{num_params(name) / 1e9:.2f} B", f"{active_params(name) / 1e9:.2f} B", p["dtype"],
            f"{w / 1e9:.1f} GB", f"{layer.weight_bytes / 1e9:.2f} GB ({layer.weight_bytes / h100.onchip_bytes:.0f}x L2)",
            f"{layer.flops / tokens / 1e9:.2f}", f"{p['batch']} x {p['seq']}",
            " / ".join(str(n) for n in need),
        ])
    out.append("### Models from shapes\n")
    out.append(_table(["model", "params", "active/token", "dtype", "weights", "one layer", "GFLOP/token/layer",
                       "batch x seq", "H100s for weights alone on chip (16-bit @100%/70% L2, INT8, INT4)"], rows))

    # 2. at the presets
    out.append("\n### At the presets (micro-batch = the model's batch, one micro-batch in flight per stage)\n")
    rows = []
    for name in PAPER:
        rep = _estimate(name)
        for est in [rep.plan, *rep.baselines]:
            s = est.stages[est.bottleneck_stage]
            r = rep.ratios().get(est.name)
            rows.append([name, est.name, f"{est.resident_stages}/{len(est.stages)}", _ms(s.compute_s), _ms(s.memory_s),
                         _ms(s.comm_s), _ms(s.transfer_s), _ms(est.bottleneck_s), f"{est.tokens_per_s / 1e3:.0f}k",
                         _ms(est.tpot_s), f"{r['throughput']:.2f}x" if r else "-"])
    out.append(_table(["model", "plan", "resident stages", "compute ms", "memory ms", "all-reduce ms", "transfer ms",
                       "bottleneck ms", "tokens/s", "TPOT ms", "cachefit tokens/s ratio"], rows))

    # 3. sweeps
    out.append("\n### cachefit (= pp16) over tp8pp2, tokens/s ratio\n")
    micros = (64, 256, 1024, 4096, 16384, 65536)
    for name in PAPER:
        rows = []
        for link in (900e9, 450e9):
            for eff in (1.0, 0.7, 0.5):
                fixed = [f"{_estimate(name, micro=m, eff=eff, link=link).ratios()['tp8pp2']['throughput']:.2f}"
                         for m in micros]
                inflight = [f"{_estimate(name, in_flight=n, eff=eff, link=link).ratios()['tp8pp2']['throughput']:.2f}"
                            for n in (1024, 16384)]
                over = f"{_estimate(name, micro=4096, eff=eff, link=link, overlap=True).ratios()['tp8pp2']['throughput']:.2f}"
                rows.append([f"{link / 1e9:.0f}", f"{eff:.1f}", *fixed, *inflight, over])
        out.append(f"\n{name}:\n")
        out.append(_table(["link GB/s", "compute eff.", *(f"mb {m}" for m in micros), "in flight 1024",
                           "in flight 16384", "mb 4096, all-reduce overlapped"], rows))

    # 4. assumption sets that give the seeds' +20% / +31%
    out.append("\n### Assumption sets reproducing the seeds' figures (fixed micro-batch per plan, within 2%)\n")
    rows = []
    for link in (900e9, 450e9):
        for eff in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
            for m in (2 ** k for k in range(6, 19)):
                rd = _estimate("paper-dense", micro=m, eff=eff, link=link, compare="tp8pp2").ratios()["tp8pp2"]["throughput"]
                rm = _estimate("paper-moe", micro=m, eff=eff, link=link, compare="tp8pp2").ratios()["tp8pp2"]["throughput"]
                hit_d = abs(rd - 1.20) <= 0.02 * 1.20
                hit_m = abs(rm - 1.31) <= 0.02 * 1.31
                if hit_d or hit_m:
                    rows.append([f"{link / 1e9:.0f}", f"{eff:.1f}", m, f"{rd:.2f}" + (" *" if hit_d else ""),
                                 f"{rm:.2f}" + (" *" if hit_m else ""), "both" if hit_d and hit_m else ""])
    out.append(_table(["link GB/s", "compute eff.", "micro-batch (tokens)", "dense ratio", "MoE ratio", ""], rows))

    # 5. paper-dense-30b: prefill-shaped (128 sequences x 10,000 tokens)
    out.append("\n### paper-dense-30b (fused attention), per micro-batch of sequences\n")
    rows = []
    for m in (1, 8, 128):
        rep = _estimate("paper-dense-30b", micro=m, fused=True)
        tp = next(b for b in rep.baselines if b.name == "tp8pp2")
        s = rep.plan.stages[rep.plan.bottleneck_stage]
        rows.append([m, f"{m * 10000:,}", format_bytes(s.footprint.total_bytes), _ms(rep.plan.bottleneck_s),
                     _ms(tp.bottleneck_s), f"{rep.ratios()['tp8pp2']['throughput']:.2f}x",
                     "yes" if any("cannot run" in n for n in rep.notes) else "no"])
    out.append(_table(["sequences per micro-batch", "tokens", "cachefit stage footprint", "cachefit stage ms",
                       "tp8pp2 stage ms", "cachefit tokens/s ratio", "over 80 GB HBM"], rows))

    # 6. residency: what it could buy
    out.append("\n### What on-chip residency can buy on an H100: the same plan resident (50 MB) or spilling (1 MB)\n")
    rows = []
    for m in (1, 16, 64, 256, 1024):
        p = resolve("dense", layers=16, hidden=1024, heads=8, ffn=4096, seq=1, batch=m, dtype="bfloat16")
        recs = transformer_records(p)
        tok = p["batch"] * p["seq"]
        groups = [(i, i) for i in range(16)]
        big = estimate_layers(recs, hardware="h100", devices=16, tokens_per_batch=tok, groups=groups)
        small = estimate_layers(recs, hardware=get_hardware("h100").with_usable_fraction(0.02), devices=16,
                                tokens_per_batch=tok, groups=groups)
        s = big.plan.stages[1]
        rows.append([m, format_bytes(recs[0].weight_bytes), format_bytes(s.footprint.total_bytes),
                     f"{big.plan.resident_stages}/16", _ms(s.compute_s), _ms(big.plan.bottleneck_s),
                     _ms(small.plan.bottleneck_s), f"{small.plan.bottleneck_s / big.plan.bottleneck_s:.2f}x"])
    out.append(_table(["micro-batch", "layer weights", "stage footprint", "resident at 50 MB", "compute ms",
                       "stage ms resident", "stage ms spilling", "gain"], rows))
    return "\n".join(out)


# --- calibration on this CPU ------------------------------------------------------------------------


def cpu(stages: list[int], repeat: int, model: str, method: str, diagnose: bool = False) -> str:
    """Compile ``model`` into k stages, calibrate, time each stage alone on one core, compare.

    Order: every k-stage artifact is compiled first (no timing), then ``cachefit calibrate``'s
    measurements run (generic kernels only; nothing of ``model`` is compiled or timed there), then
    all stages are timed, interleaved: calibration and stage timings are close in time on this
    shared machine.
    """
    from cachefit.analysis import analyze_onnx
    from cachefit.models import export
    from cachefit.perf.calibrate import measure_cpu
    from cachefit.perf.costmodel import CostModel, estimate_pipeline
    from cachefit.perf.flops import module_kernels

    load0 = Path("/proc/loadavg").read_text().split()[:3]
    tmp = Path(tempfile.mkdtemp(prefix="cachefit-bench-"))
    path = export(model, tmp / f"{model}.onnx")
    analysis = analyze_onnx(path)
    layers = analysis.layers
    pipes = {k: _compile(path, tmp / f"k{k}", k) for k in stages}

    t_cal = time.perf_counter()
    hw, meas = measure_cpu(method=method)
    t_cal = time.perf_counter() - t_cal
    table = hw.kernels
    lines = [f"calibrated ({t_cal:.0f} s): block peak {hw.flops_for('float32') / 1e9:.2f} GFLOP/s, on-chip "
             f"{hw.onchip_bw / 1e9:.1f} GB/s, off-chip {hw.offchip_bw / 1e9:.1f} GB/s, link {hw.link_bw / 1e9:.2f} GB/s"
             f" + {hw.link_latency * 1e6:.0f} us, compute/memory overlap {hw.memory_overlap:.2f}, matmul grid median "
             f"{meas['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"]
    if table is not None:
        rates = sorted(table.matmul_flops_per_s)
        lines.append(
            f"kernel table: matmul grid {len(table.matmul_m)}x{len(table.matmul_n)}x{len(table.matmul_k)} shapes, "
            f"{rates[0] / 1e9:.1f}..{rates[-1] / 1e9:.1f} GFLOP/s; per element (ns): "
            + ", ".join(f"{c} {v * 1e9:.3f}" for c, v in table.per_element.items())
            + "; fused: " + ", ".join(f"{c} {v * 1e9:.3f}" for c, v in table.fused_per_element.items())
            + f"; per kernel {table.per_kernel_s * 1e6:.2f} us, VM call {table.call_s * 1e6:.2f} us")
    blk, chain = meas.get("block", {}), meas.get("spill_matmul", {})
    if "spill" in blk:
        sp = blk["spill"]
        lines.append(
            f"overlap: {sp['layers']} calibration blocks (hidden 128, {format_bytes(sp['weight_bytes'])} of weights) "
            f"in one stage, {sp['seconds_per_layer'] * 1e3:.3f} ms per block against the model's compute "
            f"{sp['compute_s'] * 1e3:.3f} ms (one resident block measured {blk['seconds'] * 1e3:.3f} ms) and memory "
            f"{sp['memory_s'] * 1e3:.3f} ms: {sp['memory_overlap']:.2f}; matmul chain: {chain.get('memory_overlap', 0):.2f}")
    timed = _time_stages(pipes, repeat)
    load1 = Path("/proc/loadavg").read_text().split()[:3]

    per_kernel = CostModel(hw, kernels=module_kernels(analysis.mod))
    per_peak = CostModel(hw)
    rows, errors, errors_peak = [], [], []
    for k in stages:
        groups, stage_times = timed[k]
        est = estimate_pipeline(layers, groups, per_kernel, tokens_per_microbatch=analysis.tokens_per_batch)
        old = estimate_pipeline(layers, groups, per_peak, tokens_per_microbatch=analysis.tokens_per_batch)
        for s, o, measured in zip(est.stages, old.stages, stage_times):
            predicted = s.layers_s  # compute/memory part; the stage's own run excludes the hand-off
            err, err_old = predicted / measured - 1, o.layers_s / measured - 1
            errors.append(abs(err))
            errors_peak.append(abs(err_old))
            rows.append([k, s.index, f"{s.first_layer}..{s.last_layer}", format_bytes(s.footprint.total_bytes),
                         "yes" if s.resident else "no", _ms(measured), _ms(s.compute_s), _ms(predicted),
                         f"{err:+.0%}", _ms(o.layers_s), f"{err_old:+.0%}"])
    lines.append(_table(["stages", "stage", "layers", "footprint", "resident", "measured ms", "kernels ms",
                         "predicted ms", "error", "flops/peak ms", "error"], rows))
    lines.append(f"\nper-kernel model: median |error| {statistics.median(errors):.0%}, max |error| {max(errors):.0%} "
                 f"over {len(errors)} stages; flops / block peak: median {statistics.median(errors_peak):.0%}, "
                 f"max {max(errors_peak):.0%}")
    lines.append(f"load average (1, 5, 15 min): {' '.join(load0)} at the start, {' '.join(load1)} at the end")
    if diagnose and table is not None:
        lines.append(_diagnose(analysis, per_kernel, repeat))
    return "\n".join(lines)


def _diagnose(analysis, cost_model, repeat: int) -> str:
    """For the analysis only (the model never sees it): layer 0 compiled alone (weights pre-packed as
    in a stage), each of its kernel calls timed on its own from Python (best of ``repeat`` x 10 calls,
    operands warm; a Python call adds about a microsecond), against the kernels the cost model
    predicts for that layer."""
    import numpy as np
    import tvm

    from cachefit.perf.calibrate import _build_many
    from cachefit.passes import layering

    _, fn = layering.layer_functions(analysis.mod)[0]
    n_in = len(fn.params) - int(fn.attrs["cachefit.num_weights"])
    func = fn.with_attr("global_symbol", "main").with_attr("num_input", n_in)
    vm, dev, pack = _build_many({"main": lambda bb, name: bb.add_func(func, name)})
    rng = np.random.default_rng(0)
    args = pack("main", [tvm.runtime.tensor(rng.standard_normal([int(v) for v in p.ty.shape.values])
                                            .astype("float32"), dev) for p in fn.params])
    vm["main"](*args)
    whole = float(vm.time_evaluator("main", dev, number=20, repeat=max(repeat, 10))(*args).min)
    calls = []

    def instrument(func, symbol, before, _ret, *call_args):
        if before and not symbol.startswith("vm.builtin"):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(10):
                    func(*call_args)
                best = min(best, (time.perf_counter() - t0) / 10)
            calls.append((symbol, best))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*args)
    table = cost_model.hardware.kernels
    profile = cost_model.kernels[analysis.layers[0].name]
    predicted = [(k, k.seconds(table)) for k in profile.kernels]
    rows = []
    for i in range(max(len(calls), len(predicted))):
        c = calls[i] if i < len(calls) else ("", 0.0)
        p = predicted[i] if i < len(predicted) else (None, 0.0)
        spec = p[0]
        what = "" if spec is None else (
            f"matmul {spec.batch:g} x {spec.m:g}x{spec.k:g}x{spec.n:g}" if spec.kind == "matmul"
            else f"{spec.kind} {spec.elements:g}") + (f" + {len(spec.fused)} fused" if spec and spec.fused else "")
        rows.append([c[0], f"{c[1] * 1e6:.1f}" if c[0] else "", what, f"{p[1] * 1e6:.1f}" if spec else ""])
    out = [f"\nlayer 0 compiled alone: {whole * 1e3:.3f} ms per call; kernel calls timed one by one "
           f"(sum {sum(t for _, t in calls) * 1e3:.3f} ms) against the cost model's kernels "
           f"(sum {sum(t for _, t in predicted) * 1e3:.3f} ms); rows paired in order, not matched:"]
    out.append(_table(["compiled kernel", "measured us", "model kernel", "predicted us"], rows))
    mm_meas = sum(t for name, t in calls if "matmul" in name)
    mm_pred = sum(t for k, t in predicted if k.kind == "matmul")
    out.append(f"matmul kernels: measured {mm_meas * 1e6:.1f} us, predicted {mm_pred * 1e6:.1f} us; others: measured "
               f"{(sum(t for _, t in calls) - mm_meas) * 1e6:.1f} us, predicted "
               f"{(sum(t for _, t in predicted) - mm_pred) * 1e6:.1f} us")
    return "\n".join(out)


def _compile(model_path: Path, out: Path, k: int):
    """Compile with cachefit into k CPU stages (one thread each, balanced split); the loaded pipeline."""
    from cachefit import runtime
    from cachefit.compiler import compile_model

    compile_model(str(model_path), out_dir=str(out), target="llvm", devices=k, strategy="balanced",
                  cache="1GB", threads=1)
    return runtime.load(str(out))


def _time_stages(pipes: dict, repeat: int) -> dict:
    """Time every stage of every pipeline alone on the previous stage's real outputs, with the
    calibration's protocol (:func:`cachefit.perf.calibrate.time_calls`): ``repeat`` round-robin
    passes over all stages, each stage warm and then timed call by call for 25 ms per pass; the
    minimum over all its calls. Returns ``k -> (groups, seconds per stage)``."""
    import numpy as np
    import tvm

    from cachefit.perf.calibrate import time_calls

    calls = {}
    for k, pipe in pipes.items():
        rng = np.random.default_rng(0)
        current = [tvm.runtime.tensor(rng.standard_normal(d["shape"]).astype(d["dtype"]), pipe.stages[0].device)
                   for d in pipe.inputs]
        for i, stage in enumerate(pipe.stages):
            calls[(k, i)] = (lambda st, a: lambda: st(a))(stage, current)
            current = stage(current)
    best = time_calls(calls, passes=repeat, per_pass=0.025)
    out = {}
    for k, pipe in pipes.items():
        groups = [(int(s["first_layer"]), int(s["last_layer"])) for s in pipe.manifest["plan"]["stages"]]
        out[k] = (groups, [best[(k, i)] for i in range(len(pipe.stages))])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("paper")
    c = sub.add_parser("cpu")
    c.add_argument("--stages", default="1,2,3,4")
    c.add_argument("--repeat", type=int, default=20)
    c.add_argument("--model", default="dense-tiny")
    c.add_argument("--method", default="tvm", choices=["tvm", "numpy"])
    c.add_argument("--diagnose", action="store_true",
                   help="also time layer 0's compiled kernels one by one against the model's (analysis only)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd == "paper":
        print(paper())
    else:
        print(cpu([int(x) for x in args.stages.split(",")], args.repeat, args.model, args.method, args.diagnose))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
