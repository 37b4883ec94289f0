"""``cachefit calibrate``: measure this CPU (one core as one device) and store it as the ``cpu`` preset.

What is measured, single-threaded (one pipeline stage owns one core):

* **FLOP/s**: float32 matmuls of a few transformer-like shapes (their median is recorded) and, with
  ``method="tvm"``, one small transformer block (hidden 128, ffn 512, 2 x 16 tokens, 0.8 MB of
  weights; narrower than any reference preset) compiled by ``cachefit compile`` into a single-thread stage: its FLOPs over its
  time become the peak, since a layer's kernel mix (fused epilogues, norms, softmax, small batched
  matmuls) reaches well below a bare matmul.
  With ``method="tvm"`` (default) the kernels are compiled by cachefit's own codegen pipeline for
  a one-thread stage (``cachefit.codegen.pipeline.compile_relax``), as the CPU stages are, so the
  figure is what *those* kernels reach; ``method="numpy"`` times numpy instead.
* **bandwidth**: an element-wise ``c = a + b`` over float32 vectors whose three arrays together
  are a given working set: below the per-core L2 (on-chip), at 8x L2 (off-chip: the shared L3
  here) and at 64x L2 (DRAM, recorded for information).
* **compute/memory overlap**: a matmul whose weights (2.5x L2) stream from beyond the L2, timed
  against ``max(compute, memory)`` (overlap 1) and ``compute + memory`` (overlap 0).
* **launch overhead**: the extra time of one more tiny kernel in a VM function (per kernel; fused
  element-wise chains make it 0 with cachefit's pipeline, reported for information).
* **link**: a stage-to-stage transfer on one machine is a memory copy handed to another thread:
  numpy copy bandwidth of a 4 MiB buffer, and the latency of a thread hand-off through a queue.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CachefitError
from .hardware import GB, Hardware, cpu_preset, cpu_preset_path, format_bytes, save_hardware

logger = logging.getLogger(__name__)

MATMUL_SHAPES = [(32, 160, 160), (32, 160, 640), (32, 640, 160), (64, 256, 256), (128, 512, 512)]


def _best_time(fn: Callable[[], object], *, min_time: float = 0.05, repeats: int = 5) -> float:
    """The best over ``repeats`` of the mean time of ``fn`` over at least ``min_time`` seconds (the
    minimum, not the median: on a shared machine other processes only ever add time)."""
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        samples.append(elapsed / n)
    return min(samples)


def _compile(mod):
    """Compile as cachefit compiles a one-thread CPU stage (its codegen pipeline and schedules);
    TVM's default pipeline where that pipeline is not available."""
    import tvm

    target = tvm.target.Target({"kind": "llvm"})
    try:
        from ..codegen.pipeline import compile_relax
    except ImportError:
        logger.warning("cachefit.codegen.pipeline not available: calibrating TVM's default CPU pipeline")
        return tvm.compile(mod, target)
    return compile_relax(mod, target, threads=1)


def _tvm_build(func_builder) -> tuple[object, object]:
    """Compile a one-function Relax module for the host CPU; returns (vm, device)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    func_builder(bb)
    ex = _compile(bb.get())
    dev = tvm.cpu()
    return relax.VirtualMachine(ex, dev), dev


def _tvm_time(vm, dev, args, *, min_time: float, repeats: int) -> float:
    """Best time of one call: the minimum over many short batches of calls (a shared machine only
    ever adds time, and short batches find the quiet moments)."""
    import tvm

    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    probe = float(vm.time_evaluator("main", dev, number=1, repeat=3)(*tensors).min)
    number = max(1, int(0.002 / max(probe, 1e-9)))
    count = max(repeats * 8, int(min_time / max(probe * number, 1e-9)))
    f = vm.time_evaluator("main", dev, number=number, repeat=min(count, 400))
    return float(f(*tensors).min)


def _matmul_tvm(m: int, k: int, n: int, *, min_time: float, repeats: int) -> float:
    from tvm import relax

    def build(bb):
        x = relax.Var("x", relax.TensorType((m, k), "float32"))
        w = relax.Var("w", relax.TensorType((k, n), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
            bb.emit_func_output(out)

    vm, dev = _tvm_build(build)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)]
    return _tvm_time(vm, dev, args, min_time=min_time, repeats=repeats)


def _add_tvm(elems: int, chain: int = 1, *, min_time: float, repeats: int) -> float:
    from tvm import relax

    def build(bb):
        a = relax.Var("a", relax.TensorType((elems,), "float32"))
        b = relax.Var("b", relax.TensorType((elems,), "float32"))
        with bb.function("main", [a, b]):
            with bb.dataflow():
                y = bb.emit(relax.op.add(a, b))
                for _ in range(chain - 1):
                    y = bb.emit(relax.op.add(y, b))
                out = bb.emit_output(y)
            bb.emit_func_output(out)

    vm, dev = _tvm_build(build)
    args = [np.ones(elems, np.float32), np.ones(elems, np.float32)]
    return _tvm_time(vm, dev, args, min_time=min_time, repeats=repeats)


def _block_tvm(*, min_time: float, repeats: int) -> dict | None:
    """Effective FLOP/s of one pre-norm transformer block (not the size of any reference preset)
    compiled by ``cachefit compile`` into one single-thread stage; None if that path is unavailable."""
    import tempfile

    try:
        import tvm

        from .. import runtime
        from ..compiler import compile_model
        from ..models import build
    except ImportError as exc:
        logger.warning("transformer-block calibration skipped: %s", exc)
        return None
    # 0.8 MB of weights: resident in any L2 of 1 MB or more
    model = build("dense", layers=1, hidden=128, heads=4, ffn=512, seq=16, batch=2, dtype="float32")
    with tempfile.TemporaryDirectory(prefix="cachefit-calibrate-") as tmp:
        result = compile_model(model, out_dir=tmp, target="llvm", devices=1, cache="1GB", threads=1)
        flops = sum(layer.flops for layer in result.analysis.layers)
        pipe = runtime.load(tmp)
        stage = pipe.stages[0]
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.standard_normal(d["shape"]).astype(d["dtype"]), stage.device)
                for d in pipe.inputs]

        def call():
            stage(args)

        t = _best_time(call, min_time=min_time / 10, repeats=max(repeats * 8, 20))
    return {"hidden": 128, "ffn": 512, "tokens": 32, "flops": flops, "seconds": t, "flops_per_s": flops / t}


def _handoff_latency(rounds: int = 2000) -> float:
    """One-way latency of handing a message to another thread through a queue."""
    q_in: queue.Queue = queue.Queue()
    q_out: queue.Queue = queue.Queue()

    def echo():
        while True:
            item = q_in.get()
            if item is None:
                return
            q_out.put(item)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    start = time.perf_counter()
    for i in range(rounds):
        q_in.put(i)
        q_out.get()
    elapsed = time.perf_counter() - start
    q_in.put(None)
    t.join()
    return elapsed / rounds / 2


def measure_cpu(*, method: str = "tvm", quick: bool = False, progress: Callable[[str], None] | None = None
                ) -> tuple[Hardware, dict]:
    """Measure this CPU; returns the preset and the raw measurements."""
    if method not in ("tvm", "numpy"):
        raise CachefitError(f"unknown calibration method {method!r}: use tvm or numpy")
    say = progress or (lambda msg: logger.info("%s", msg))
    base = cpu_preset()
    l2 = base.onchip_bytes
    min_time, repeats = (0.02, 3) if quick else (0.1, 5)
    meas: dict = {"method": method, "l2_bytes": l2, "matmul": [], "bandwidth": []}

    # compute: matmul FLOP/s over a few shapes
    shapes = MATMUL_SHAPES[:3] if quick else MATMUL_SHAPES
    rates = []
    for m, k, n in shapes:
        say(f"matmul {m}x{k}x{n}")
        if method == "tvm":
            t = _matmul_tvm(m, k, n, min_time=min_time, repeats=repeats)
        else:
            a = np.ones((m, k), np.float32)
            b = np.ones((k, n), np.float32)
            t = _best_time(lambda: a @ b, min_time=min_time, repeats=repeats)
        rate = 2 * m * k * n / t
        rates.append(rate)
        meas["matmul"].append({"m": m, "k": k, "n": n, "seconds": t, "flops_per_s": rate})
    peak = statistics.median(rates)
    meas["matmul_flops_per_s"] = peak
    if method == "tvm":
        # the kernel mix of a real layer (fused epilogues, norms, softmax, small batched matmuls)
        # reaches less than a bare matmul: time one generic transformer block as cachefit compiles it
        say("transformer block (hidden 128, ffn 512, 2 x 16 tokens)")
        block = _block_tvm(min_time=min_time, repeats=repeats)
        if block is not None:
            meas["block"] = block
            peak = block["flops_per_s"]

    # memory: c = a + b at working sets below and above L2
    fractions = [0.125, 0.25, 0.5, 8, 64] if not quick else [0.25, 8]
    bw: dict[float, float] = {}
    for frac in fractions:
        ws = int(l2 * frac)
        elems = max(1024, ws // 12)  # three float32 arrays
        say(f"bandwidth at {format_bytes(12 * elems)}")
        if method == "tvm":
            t = _add_tvm(elems, min_time=min_time, repeats=repeats)
        else:
            a = np.ones(elems, np.float32)
            b = np.ones(elems, np.float32)
            c = np.empty_like(a)
            t = _best_time(lambda: np.add(a, b, out=c), min_time=min_time, repeats=repeats)
        rate = 12 * elems / t
        bw[frac] = rate
        meas["bandwidth"].append({"working_set_bytes": 12 * elems, "fraction_of_l2": frac, "seconds": t,
                                  "bytes_per_s": rate})
    onchip = statistics.median([v for f, v in bw.items() if f <= 0.5])
    offchip = bw[8]
    meas["dram_bytes_per_s"] = bw.get(64)

    # compute/memory overlap: a matmul whose weights spill out of L2, against max(compute, memory)
    k_n = max(256, int((2.5 * l2 / 4) ** 0.5) // 64 * 64)
    say(f"spilling matmul 16x{k_n}x{k_n} ({format_bytes(4 * k_n * k_n)} of weights)")
    if method == "tvm":
        t_sp = _matmul_tvm(16, k_n, k_n, min_time=min_time, repeats=repeats)
    else:
        a16 = np.ones((16, k_n), np.float32)
        wbig = np.ones((k_n, k_n), np.float32)
        t_sp = _best_time(lambda: a16 @ wbig, min_time=min_time, repeats=repeats)
    c = 2 * 16 * k_n * k_n / meas["matmul_flops_per_s"]
    m = (4 * k_n * k_n) / offchip + (2 * 16 * k_n * 4) / onchip
    overlap = 1.0 - (t_sp - max(c, m)) / min(c, m)
    overlap = min(1.0, max(0.0, overlap))
    meas["spill_matmul"] = {"k": k_n, "n": k_n, "m": 16, "seconds": t_sp, "compute_s": c, "memory_s": m,
                            "memory_overlap": overlap}

    # per-kernel overhead (TVM only): one more tiny kernel in the same VM function
    overhead = 0.0
    if method == "tvm":
        say("kernel launch overhead")
        t1 = _add_tvm(16, 1, min_time=min_time, repeats=repeats)
        t20 = _add_tvm(16, 21, min_time=min_time, repeats=repeats)
        overhead = max(0.0, (t20 - t1) / 20)
        meas["vm_call_seconds"] = t1
        meas["per_kernel_seconds"] = overhead

    # link: memory copy to another core + thread hand-off latency
    say("stage-to-stage copy")
    src = np.ones(1 << 20, np.float32)
    dst = np.empty_like(src)
    t_copy = _best_time(lambda: np.copyto(dst, src), min_time=min_time, repeats=repeats)
    link_bw = src.nbytes / t_copy
    latency = _handoff_latency(500 if quick else 2000)
    meas["copy_bytes_per_s"] = link_bw
    meas["handoff_seconds"] = latency

    hw = Hardware(
        name="cpu",
        onchip_bytes=l2,
        onchip_bw=onchip,
        offchip_bw=offchip,
        peak_flops={"float32": peak, "float16": peak, "bfloat16": peak},
        link_bw=link_bw,
        link_latency=latency,
        offchip_bytes=base.offchip_bytes,
        launch_overhead=0.0,
        memory_overlap=overlap,
        source=f"calibrated ({method} kernels, {time.strftime('%Y-%m-%d %H:%M')})",
    )
    return hw, meas


def calibrate(path=None, *, method: str = "tvm", quick: bool = False,
              progress: Callable[[str], None] | None = None) -> tuple[Hardware, Path, dict]:
    """Measure this CPU and store the preset where ``get_hardware("cpu")`` finds it (or at ``path``)."""
    hw, meas = measure_cpu(method=method, quick=quick, progress=progress)
    target = Path(path) if path else cpu_preset_path()
    try:
        out = save_hardware(hw, target, extra=meas)
    except OSError as exc:
        raise CachefitError(f"cannot write the CPU preset to {str(target)!r}: {exc.strerror}; pass -o PATH") from None
    return hw, out, meas


def format_calibration(hw: Hardware, meas: dict) -> str:
    lines = [f"CPU calibration ({meas.get('method')} kernels, one core), per-core L2 {format_bytes(hw.onchip_bytes)}"]
    for m in meas.get("matmul", []):
        lines.append(f"  matmul {m['m']}x{m['k']}x{m['n']}: {m['flops_per_s'] / 1e9:.2f} GFLOP/s")
    for b in meas.get("bandwidth", []):
        lines.append(f"  c = a + b over {format_bytes(b['working_set_bytes'])}: {b['bytes_per_s'] / GB:.2f} GB/s")
    if "per_kernel_seconds" in meas:
        lines.append(f"  VM call {meas['vm_call_seconds'] * 1e6:.1f} us, +{meas['per_kernel_seconds'] * 1e6:.2f} us per kernel")
    if "spill_matmul" in meas:
        sp = meas["spill_matmul"]
        lines.append(f"  matmul 16x{sp['k']}x{sp['n']} with weights out of L2: {sp['seconds'] * 1e3:.3f} ms against "
                     f"compute {sp['compute_s'] * 1e3:.3f} ms, memory {sp['memory_s'] * 1e3:.3f} ms: "
                     f"overlap {sp['memory_overlap']:.2f}")
    if "block" in meas:
        b = meas["block"]
        lines.append(f"  transformer block ({b['flops'] / 1e6:.1f} MFLOP): {b['seconds'] * 1e3:.3f} ms = "
                     f"{b['flops_per_s'] / 1e9:.2f} GFLOP/s (the preset's peak)")
    lines.append(f"  copy {meas['copy_bytes_per_s'] / GB:.2f} GB/s, thread hand-off {meas['handoff_seconds'] * 1e6:.1f} us")
    lines.append(
        f"preset: peak {hw.flops_for('float32') / 1e9:.2f} GFLOP/s, on-chip {hw.onchip_bw / GB:.2f} GB/s, "
        f"off-chip {hw.offchip_bw / GB:.2f} GB/s, link {hw.link_bw / GB:.2f} GB/s + {hw.link_latency * 1e6:.1f} us"
    )
    return "\n".join(lines)
