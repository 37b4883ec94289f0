"""Pipelined runtime benchmark: 2 CPU stages on 2 cores against the unpartitioned model on one core.

    python bench/pipeline.py                                   # dense-s128, 2 stages, 5 rounds
    python bench/pipeline.py --model mlp-tiny --requests 400
    python bench/pipeline.py --model dense-s128 --batch 4 --micro-batch 1 --json out.json

The model is exported next to its artifact (so ``cachefit bench`` finds it by sha256), compiled into
``--stages`` CPU stages for one thread each (``compile_model(..., devices=stages, threads=1)``), then
measured by ``cachefit.bench.bench_artifact`` exactly as ``cachefit bench`` does: the pipeline (one
pinned worker per stage), the same ONNX compiled as one stage on one core, and onnxruntime with the
pipeline's thread count, in interleaved rounds (best round reported). The goals of issue 6 are checked
at the end: throughput >= 1.8x and single-request (batch-1) latency <= 1.05x the unpartitioned model.

Models (``--model``): ``dense-s128`` (4 pre-norm transformer blocks, hidden 256, 4 heads, ffn 1024, one
sequence of 128 tokens per request), ``mlp-tiny`` (6 x 512x512 Linear+ReLU, batch 8), ``mlp-wide``
(8 x 1024x1024 Linear+ReLU, batch 1), or any cachefit.models preset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefit import models  # noqa: E402
from cachefit.bench import bench_artifact  # noqa: E402
from cachefit.compiler import compile_model  # noqa: E402

MODELS = {
    "dense-s128": ("dense", dict(layers=4, hidden=256, heads=4, ffn=1024, seq=128, batch=1)),
    "mlp-wide": ("mlp", dict(layers=8, hidden=1024, batch=1)),
}


def build(model: str, stages: int, work: Path) -> Path:
    family, overrides = MODELS.get(model, (model, {}))
    onnx_path = models.export(family, work / f"{model}.onnx", **overrides)
    out = work / f"{model}-k{stages}"
    compile_model(onnx_path, target="llvm", out_dir=out, cache="1TB", strategy="balanced", devices=stages,
                  threads=1, progress=lambda line: print(line, file=sys.stderr))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dense-s128")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="rows per request (default: the model's batch)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--latency-requests", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--in-flight", type=int, default=None, help="requests queued in the pipeline")
    ap.add_argument("--cores", default="auto")
    ap.add_argument("--work", default=None, help="directory for the model and builds (default: a temporary one)")
    ap.add_argument("--timeline", default=None, help="PNG of 20 pipelined requests")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args()

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cachefit-bench-pipeline-")
        work = Path(tmp.name)
    artifact = build(args.model, args.stages, work)
    report = bench_artifact(artifact, batch=args.batch, micro_batch=args.micro_batch, requests=args.requests,
                            latency_requests=args.latency_requests, in_flight=args.in_flight, rounds=args.rounds,
                            cores=args.cores,
                            baseline_dir=work / f"{args.model}-k1", timeline=args.timeline,
                            progress=lambda line: print(line, file=sys.stderr))
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (after the run)")
    print(report.format_table())
    r = report.ratios().get("unpartitioned")
    if r:
        print(f"goal: throughput >= 1.8x unpartitioned: {r['throughput']:.2f}x "
              f"{'met' if r['throughput'] >= 1.8 else 'NOT met'}")
        print(f"goal: batch-1 latency <= 1.05x unpartitioned: p50 {r['single_latency_p50']:.3f}x "
              f"{'met' if r['single_latency_p50'] <= 1.05 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "loadavg": os.getloadavg(),
                                               **report.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
