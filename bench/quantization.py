"""Accuracy (and size, speed) of weight-only quantization and pruning on the reference models.

    python bench/quantization.py [--models dense-tiny,moe-tiny,tests/data/gpt2_legacy.onnx] [--inits default,gpt2] [--seeds 3]
                                 [--repeat 5] [--calibrate 32]

For each model, weight initialisation (``cachefit.models`` ``init=``: ``default`` unit-gain
N(0, 1/sqrt(fan_in)) matrices, ``gpt2`` GPT-2 / Megatron's N(0, 0.02) with residual projections
scaled by 1/sqrt(2 * layers)) and scheme: compile with ``cachefit.compiler.compile_model`` (one CPU
stage, one thread), run on random inputs N(0, 1) and compare with the float model run by
onnxruntime. ``output err`` is ``||y - y_ref|| / ||y_ref||`` (relative to the output's norm),
averaged / maxed over ``--seeds`` input draws; ``err / branches`` is ``||y - y_ref|| / ||y_ref - x||``,
the error relative to what the blocks add to the residual stream (scale-free: it does not shrink
when the branches do); ``weight err`` is the output-err ratio on the quantized weights themselves
(dequantized vs float, all quantized matrices together). The heading of each table gives the
branch-to-output norm ratio ``||y_ref - x|| / ||y_ref||`` of that init. ``gptq`` schemes calibrate on
``--calibrate`` random batches (other draws than the evaluation inputs); ``int8 routers`` keeps the
MoE routers at INT8 (``SENSITIVE_INT8``); ``attention int8`` keeps the attention projections and
routers at INT8 and quantizes the MLPs / experts to INT4 (mixed precision: see the bytes column);
``head int8`` keeps the LM head (layer ``head``) at INT8, the blocks INT4. ``bytes`` is the sum of the stage weight files over the
float32 ones; ``ms`` the median time of one call of the stage (this CPU, 1 thread). Prints
Markdown tables (the numbers of BENCHMARKS.md, "Quantization accuracy").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefit.analysis import analyze_onnx  # noqa: E402
from cachefit.compiler import compile_model, reference_outputs  # noqa: E402
from cachefit.models import build  # noqa: E402
from cachefit.passes.calibrate_weights import random_inputs  # noqa: E402
from cachefit.passes.quantize_weights import SENSITIVE_INT8, dequantize_array  # noqa: E402
from cachefit.runtime import load  # noqa: E402

CALIBRATE = "calibrate"   # placeholder replaced by --calibrate
#: mixed precision kept at INT8: attention projections (and routers); the MLPs / experts in INT4
ATTENTION_INT8 = ("*attn*",) + SENSITIVE_INT8
SCHEMES = [
    ("float32", {}),
    ("int8 per-channel", dict(quantize="int8")),
    ("int8 g128", dict(quantize="int8", group_size=128)),
    ("int4 per-channel", dict(quantize="int4")),
    ("int4 g128", dict(quantize="int4", group_size=128)),
    ("int4 g32", dict(quantize="int4", group_size=32)),
    ("int4 g128 gptq", dict(quantize="int4", group_size=128, quantize_calibration=CALIBRATE)),
    ("int4 g32 gptq", dict(quantize="int4", group_size=32, quantize_calibration=CALIBRATE)),
    ("int4 g128 int8 routers", dict(quantize="int4", group_size=128, quantize_int8_weights=SENSITIVE_INT8)),
    ("int4 g128 gptq int8 routers", dict(quantize="int4", group_size=128, quantize_calibration=CALIBRATE,
                                         quantize_int8_weights=SENSITIVE_INT8)),
    ("int4 g128 gptq, attention int8", dict(quantize="int4", group_size=128, quantize_calibration=CALIBRATE,
                                            quantize_int8_weights=ATTENTION_INT8)),
    ("int4 g128 gptq, head int8", dict(quantize="int4", group_size=128, quantize_calibration=CALIBRATE,
                                       quantize_int8_weights=("@head",) + SENSITIVE_INT8)),
    ("prune 25%", dict(prune=0.25)),
    ("prune heads 50%", dict(prune_heads=0.5)),
    ("int8 + prune 25%", dict(quantize="int8", prune=0.25)),
]


def _table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _weight_error(analysis, new_params, quantized) -> float:
    num = den = 0.0
    for q in quantized:
        w = np.asarray(analysis.params[q["name"]], np.float64)
        if q["kind"] == "nk":
            w = w.T
        elif q["kind"] == "oihw":
            w = w.reshape(w.shape[0], -1).T
        d = dequantize_array(new_params[q["q_name"]], new_params[q["scale_name"]], q["bits"], q["k"], q["group_size"])
        num += float(np.square(d - w).sum())
        den += float(np.square(w).sum())
    return (num / den) ** 0.5 if den else 0.0


def _time(pipe, inputs, repeat: int) -> float:
    pipe.run(inputs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        pipe.run(inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_model(name: str, init: str, seeds: int, repeat: int, calibrate: int, work: Path) -> str:
    import onnx

    exported = name.endswith(".onnx")
    if exported:   # a real export as it is (its own weights: ``init`` does not apply)
        model = onnx.load(name)
        path = Path(name)
    else:
        model = build(name, init=init)
        path = work / f"{name}-{init}.onnx"
        onnx.save(model, str(path))
    analysis = analyze_onnx(path)
    float_bytes = sum(np.asarray(v).nbytes for v in analysis.params.values())
    inputs = [random_inputs(model, 1, seed=100 + s)[0] for s in range(seeds)]
    refs = [next(iter(reference_outputs(path, x).values())) for x in inputs]
    residual = [next(iter(x.values())) for x in inputs]
    if exported:   # token ids in, logits out: no residual stream to compare with
        residual = [None] * len(inputs)
        branch = None
    else:
        branch = statistics.mean(float(np.linalg.norm(r - x) / np.linalg.norm(r)) for r, x in zip(refs, residual))
    rows = []
    for label, opts in SCHEMES:
        if "routers" in label and not any("router" in n for n in analysis.params):
            continue
        if "head int8" in label and not any(r.name == "head" for r in analysis.layers):
            continue
        opts = {k: (calibrate if v == CALIBRATE else v) for k, v in opts.items()}
        t0 = time.perf_counter()
        res = compile_model(path, out_dir=work / f"{name}-{init}-{label.replace(' ', '_')}", cache="1GB", threads=1,
                            analysis=analysis, **opts)
        compile_s = time.perf_counter() - t0
        pipe = load(res.artifact_dir)
        errs, rel = [], []
        for x, ref, x0 in zip(inputs, refs, residual):
            y = next(iter(pipe.run(x).values()))
            errs.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
            if x0 is not None:
                rel.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref - x0)))
        files = sum(st["weights"]["bytes"] for st in pipe.manifest["stages"])
        quantized = res.fit.quantized if res.fit is not None else []
        # against the float weights (with pruning the quantized matrices are the pruned ones: not computed)
        pruned = opts.get("prune") or opts.get("prune_heads")
        w_err = _weight_error(analysis, res.analysis.params, quantized) if quantized and not pruned else None
        ms = _time(pipe, inputs[0], repeat) * 1e3
        rows.append([label, f"{100 * statistics.mean(errs):.2f}%", f"{100 * max(errs):.2f}%",
                     f"{100 * statistics.mean(rel):.1f}%" if rel else "-",
                     f"{100 * w_err:.2f}%" if w_err is not None else "-", f"{files / float_bytes:.3f}",
                     f"{files:,}", f"{ms:.2f}", f"{compile_s:.1f}"])
        print(f"{name} {init} {label}: {rows[-1]}", file=sys.stderr, flush=True)
    head = ["scheme", "output err (mean)", "output err (max)", "err / branches", "weight err", "bytes / fp32",
            "weight file bytes", "ms / call", "compile s"]
    title = (f"### {Path(name).name} as exported ({seeds} input draws of random token ids)" if exported else
             f"### {name}, init {init} ({seeds} input draws; branches ||y - x|| / ||y|| = {branch:.3f})")
    return title + "\n\n" + _table(head, rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense-tiny,moe-tiny",
                    help="presets, or paths of exported .onnx files (run as exported, random token ids)")
    ap.add_argument("--inits", default="default,gpt2")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calibrate", type=int, default=32, help="random input batches for the gptq schemes")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        runs = [(m.strip(), i.strip()) for m in args.models.split(",") if m.strip()
                for i in (["as exported"] if m.strip().endswith(".onnx") else args.inits.split(",")) if i.strip()]
        out = [run_model(m, i, args.seeds, args.repeat, args.calibrate, Path(d)) for m, i in runs]
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
