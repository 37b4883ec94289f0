"""Accuracy (and size, speed) of weight-only quantization and pruning on the reference models.

    python bench/quantization.py [--models dense-tiny,moe-tiny] [--seeds 3] [--repeat 20]

For each model and scheme: compile with ``cachefit.compiler.compile_model`` (one CPU stage, one
thread), run on random inputs N(0, 1) and compare with the float model run by onnxruntime. The
error is ``||y - y_ref|| / ||y_ref||`` (relative to the output's norm), averaged / maxed over
``--seeds`` input draws; ``weight err`` is the same ratio on the quantized weights themselves
(dequantized vs float, all quantized matrices together). ``bytes`` is the sum of the stage weight
files over the float32 ones; ``ms`` the median time of one call of the stage (this CPU, 1 thread).
Prints Markdown tables (the numbers of BENCHMARKS.md, "Quantization accuracy").
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
from cachefit.passes.quantize_weights import dequantize_array  # noqa: E402
from cachefit.runtime import load  # noqa: E402

SCHEMES = [
    ("float32", {}),
    ("int8 per-channel", dict(quantize="int8")),
    ("int8 g128", dict(quantize="int8", group_size=128)),
    ("int4 per-channel", dict(quantize="int4")),
    ("int4 g128", dict(quantize="int4", group_size=128)),
    ("int4 g64", dict(quantize="int4", group_size=64)),
    ("int4 g32", dict(quantize="int4", group_size=32)),
    ("prune 25%", dict(prune=0.25)),
    ("prune 50%", dict(prune=0.5)),
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


def run_model(name: str, seeds: int, repeat: int, work: Path) -> str:
    import onnx

    model = build(name)
    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    analysis = analyze_onnx(path)
    float_bytes = sum(np.asarray(v).nbytes for v in analysis.params.values())
    in_desc = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    inputs = []
    for s in range(seeds):
        rng = np.random.default_rng(100 + s)
        inputs.append({n: rng.standard_normal(shape).astype(np.float32) for n, shape in in_desc})
    refs = [next(iter(reference_outputs(path, x).values())) for x in inputs]
    rows = []
    for label, opts in SCHEMES:
        t0 = time.perf_counter()
        res = compile_model(path, out_dir=work / f"{name}-{label.replace(' ', '_')}", cache="1GB", threads=1,
                            analysis=analysis, **opts)
        compile_s = time.perf_counter() - t0
        pipe = load(res.artifact_dir)
        errs = []
        for x, ref in zip(inputs, refs):
            y = next(iter(pipe.run(x).values()))
            errs.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
        files = sum(st["weights"]["bytes"] for st in pipe.manifest["stages"])
        quantized = res.fit.quantized if res.fit is not None else []
        # against the float weights (with pruning the quantized matrices are the pruned ones: not computed)
        w_err = _weight_error(analysis, res.analysis.params, quantized) if quantized and not opts.get("prune") else None
        ms = _time(pipe, inputs[0], repeat) * 1e3
        rows.append([label, f"{100 * statistics.mean(errs):.2f}%", f"{100 * max(errs):.2f}%",
                     f"{100 * w_err:.2f}%" if w_err is not None else "-", f"{files / float_bytes:.3f}",
                     f"{files:,}", f"{ms:.2f}", f"{compile_s:.1f}"])
        print(f"{name} {label}: {rows[-1]}", file=sys.stderr)
    head = ["scheme", "output err (mean)", "output err (max)", "weight err", "bytes / fp32", "weight file bytes",
            "ms / call", "compile s"]
    return f"### {name} ({seeds} input draws)\n\n" + _table(head, rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense-tiny,moe-tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        out = [run_model(m.strip(), args.seeds, args.repeat, Path(d)) for m in args.models.split(",") if m.strip()]
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
