"""``cachefit calibrate``: measure this CPU (one core as one device) and store it as the ``cpu`` preset.

What is measured, single-threaded (one pipeline stage owns one core):

* **kernel table** (``method="tvm"``): the per-shape, per-class kernel speeds the cost model sums a
  layer's kernels with (:class:`~cachefit.perf.hardware.KernelTable`): float32 matmuls
  ``[M, K] x [K, N]`` on a grid of shapes (M, N and K every power of two, M 4..256, N and K 32..512:
  operands within a 2 MB L2) compiled together in one module; per output element, the standalone
  kernels of each non-matmul class (binary add, erf, layer norm, softmax, a 4-D transpose) at two
  sizes on chip (the slope); per element, one more add or erf fused into a chain (the cost of an
  epilogue op); the fixed cost of one more kernel call (a chain of softmaxes, which never fuse)
  and of one VM call. Generic shapes only: nothing of the model to be predicted is compiled.
  Weights (matmul right operands, norm scales) are marked as such (``num_input``) and pre-packed
  at compile time as a stage's build packs them (``compile_relax(prepack=True)``, when the
  pipeline has it), so the kernels timed are the kernels a stage runs.
* **FLOP/s** (the ``flops / peak`` fallback): float32 matmuls of a few transformer-like shapes (their median is recorded) and, with
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
* **compute/memory overlap**: with TVM kernels, a chain of 16x512x512 matmuls through distinct
  weights (2.5x L2 in all) against the same chain through one resident weight (compute) and the
  weights' bytes at the off-chip bandwidth (memory); with numpy, one matmul whose weights (2.5x L2)
  stream from beyond the L2 against the matmul rate. Timed against ``max(compute, memory)``
  (overlap 1) and ``compute + memory`` (overlap 0). A matmul chain streams its packed weights with
  the prefetchers' help and hides them almost fully; a real layer's kernel mix does not, so the
  full (non-quick) TVM calibration takes the preset's overlap from the transformer block below: a
  stack of blocks whose weights are 2.5x L2 in one stage, per block, against one resident block.
* **launch overhead**: part of the kernel table (``per_kernel_s``); the preset's per-layer
  ``launch_overhead`` stays 0.
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
from .hardware import GB, Hardware, KernelTable, cpu_preset, cpu_preset_path, format_bytes, save_hardware

logger = logging.getLogger(__name__)

MATMUL_SHAPES = [(32, 160, 160), (32, 160, 640), (32, 640, 160), (64, 256, 256), (128, 512, 512)]
"""(m, k, n) of the bare-matmul figure of ``method="numpy"`` (and the quick TVM fallback figure)."""

# the kernel table's matmul grid (m, n, k); quick: a 2 x 2 x 2 corner of it
GRID_M = (4, 8, 16, 32, 64, 128, 256)
GRID_NK = (32, 64, 128, 256, 512)
QUICK_GRID_M = (16, 64)
QUICK_GRID_NK = (32, 128)
# element counts of the per-element measurements (both on chip: at most 768 KB for an add)
ELEMENTS = (4096, 65536)


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


def time_calls(calls: dict, *, passes: int, per_pass: float) -> dict:
    """Best time of one call of each ``name -> fn()``: ``passes`` round-robin passes over all of
    them; in each pass a function runs once untimed (warm, as a steady pipeline runs its stage
    over and over), then timed call by call for about ``per_pass`` seconds (at least 3 calls). The
    minimum over every timed call: a shared machine only ever adds time, and spreading each
    function's calls over the whole run keeps a busy moment from spoiling one function's figure."""
    best = {name: float("inf") for name in calls}
    for _ in range(passes):
        for name, fn in calls.items():
            fn()
            start = time.perf_counter()
            n = 0
            while n < 3 or time.perf_counter() - start < per_pass:
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
                n += 1
    return best


def _compile(mod, *, prepack: bool = False):
    """Compile as cachefit compiles a one-thread CPU stage (its codegen pipeline and schedules);
    TVM's default pipeline where that pipeline is not available. Returns ``(executable, packer)``:
    with ``prepack`` and a pipeline that pre-packs weights as the stages' builds do
    (``compile_relax(prepack=True)``), ``packer`` is the compiled module whose ``pack(weights,
    func)`` gives the weights a function takes; else None (the functions take their weights as they
    are)."""
    import inspect

    import tvm

    target = tvm.target.Target({"kind": "llvm"})
    try:
        from ..codegen.pipeline import compile_relax
    except ImportError:
        logger.warning("cachefit.codegen.pipeline not available: calibrating TVM's default CPU pipeline")
        return tvm.compile(mod, target), None
    if prepack and "prepack" in inspect.signature(compile_relax).parameters:
        compiled = compile_relax(mod, target, threads=1, prepack=True)
        return compiled.executable, compiled
    return compile_relax(mod, target, threads=1), None


def _tvm_build(func_builder) -> tuple[object, object]:
    """Compile a one-function Relax module for the host CPU; returns (vm, device)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    func_builder(bb)
    ex, _ = _compile(bb.get())
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


def _build_many(builders: dict):
    """Compile several one-output Relax functions into one module, weights pre-packed as a stage's
    build packs them. Each function's ``num_input`` attribute tells its activations (the rest are
    weights). Returns ``(vm, device, args)``: ``args(name, tensors)`` turns a function's original
    arguments into the ones it takes (inputs, then its weights as packed)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    for name, build in builders.items():
        build(bb, name)
    mod = bb.get()
    inputs = {}
    for name in builders:
        attrs = mod[name].attrs
        inputs[name] = int(attrs["num_input"]) if attrs is not None and "num_input" in attrs else None
    ex, packer = _compile(mod, prepack=True)
    dev = tvm.cpu()

    def args(name: str, tensors: list) -> list:
        n = inputs[name]
        if packer is None or n is None or n >= len(tensors):
            return list(tensors)
        return list(tensors[:n]) + list(packer.pack(list(tensors[n:]), name))

    return relax.VirtualMachine(ex, dev), dev, args


def _time_interleaved(vm, dev, items: dict, *, passes: int, per_pass: float) -> dict:
    """Best time of one call of each function ``name -> args`` of ``vm``: ``passes`` round-robin
    passes over all of them, each timing a function for about ``per_pass`` seconds in short batches
    (about 0.3 ms each), and the minimum over every batch of every pass. On a shared machine other
    processes only ever add time, and spreading each function's batches over the whole run keeps a
    busy moment from spoiling one function's figure."""
    numbers = {}
    for name, args in items.items():
        probe = float(vm.time_evaluator(name, dev, number=1, repeat=3)(*args).min)
        numbers[name] = (max(1, int(3e-4 / max(probe, 1e-9))), probe)
    best = {name: float("inf") for name in items}
    for _ in range(passes):
        for name, args in items.items():
            number, probe = numbers[name]
            repeat = max(3, min(200, int(per_pass / max(probe * number, 1e-9))))
            f = vm.time_evaluator(name, dev, number=number, repeat=repeat)
            best[name] = min(best[name], float(f(*args).min))
    return best


def _unary(op_name: str, shape: tuple, chain: int = 1, *, params: tuple = (), weights: bool = False):
    """A builder of ``main(a, *params) = op(op(...op(a)))`` (``chain`` times); ``params`` are
    weights (``num_input`` 1: a norm's scale and shift) or, by default, activations."""
    from tvm import relax

    def build(bb, name):
        a = relax.Var("a", relax.TensorType(shape, "float32"))
        extra = [relax.Var(f"p{i}", relax.TensorType(s, "float32")) for i, s in enumerate(params)]
        with bb.function(name, [a, *extra], attrs={"num_input": 1 if weights else 1 + len(extra)}):
            with bb.dataflow():
                y = a
                for _ in range(chain):
                    y = bb.emit(_apply(op_name, y, extra))
                out = bb.emit_output(y)
            bb.emit_func_output(out)

    return build


def _apply(op_name: str, y, extra):
    from tvm import relax

    op = relax.op
    if op_name == "add":
        return op.add(y, extra[0])
    if op_name == "erf":
        return op.erf(y)
    if op_name == "layer_norm":
        return op.nn.layer_norm(y, extra[0], extra[1], axes=[-1])
    if op_name == "softmax":
        return op.nn.softmax(y, axis=-1)
    if op_name == "transpose":
        return op.permute_dims(y, [0, 2, 1, 3])
    raise CachefitError(f"internal: no calibration kernel {op_name!r}")


def _class_shapes(elements: int) -> dict:
    """(op, input shape, parameter shapes) of each kernel class at ``elements`` output elements."""
    rows = elements // 256
    return {
        "elementwise": ("add", (rows, 256), ((rows, 256),)),
        "transcendental": ("erf", (rows, 256), ()),
        "norm": ("layer_norm", (rows, 256), ((256,), (256,))),  # scale and shift: weights
        "softmax": ("softmax", (rows, 256), ()),
        "move": ("transpose", (rows // 16, 16, 4, 64), ()),
    }


def measure_kernel_table(*, quick: bool = False, min_time: float = 0.1,
                         say: Callable[[str], None] = lambda msg: None) -> tuple[KernelTable, dict]:
    """Time the kernel table's kernels, as cachefit's pipeline compiles them for one thread."""
    import tvm

    rng = np.random.default_rng(0)
    meas: dict = {}

    def tensors(shapes):
        return [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32), dev) for s in shapes]

    # fixed costs: one VM call with one tiny kernel; one more kernel (softmaxes never fuse)
    builders = {"tiny": _unary("add", (1, 16), 1, params=((1, 16),)),
                "soft1": _unary("softmax", (1, 16), 1), "soft21": _unary("softmax", (1, 16), 21)}
    # per-element: each class alone at two sizes; one more add / erf fused into a chain
    n2 = ELEMENTS[1]
    for elements in ELEMENTS:
        for cls, (op, shape, params) in _class_shapes(elements).items():
            builders[f"{cls}_{elements}"] = _unary(op, shape, 1, params=params, weights=cls == "norm")
    chain = 4 if quick else 8
    builders["add_chain"] = _unary("add", (n2 // 256, 256), 1 + chain, params=((n2 // 256, 256),))
    builders["erf_chain"] = _unary("erf", (n2 // 256, 256), 1 + chain)
    # the matmul grid
    gm, gnk = (QUICK_GRID_M, QUICK_GRID_NK) if quick else (GRID_M, GRID_NK)
    shapes = [(m, n, k) for m in gm for n in gnk for k in gnk]
    for m, n, k in shapes:
        builders[f"mm_{m}_{n}_{k}"] = _matmul_builder(m, n, k)
    say(f"compiling {len(builders)} calibration kernels")
    vm, dev, args = _build_many(builders)

    # every function's arguments, then all timed together, interleaved
    n1, n2 = ELEMENTS
    shape2 = (n2 // 256, 256)
    items = {"tiny": [(1, 16), (1, 16)], "soft1": [(1, 16)], "soft21": [(1, 16)],
             "add_chain": [shape2, shape2], "erf_chain": [shape2]}
    for elements in ELEMENTS:
        for cls, (op, shape, params) in _class_shapes(elements).items():
            items[f"{cls}_{elements}"] = [shape, *params]
    for m, n, k in shapes:
        items[f"mm_{m}_{n}_{k}"] = [(m, k), (k, n)]
    say(f"timing {len(items)} kernels ({3 if quick else 10} interleaved passes)")
    best = _time_interleaved(vm, dev, {name: args(name, tensors(shp)) for name, shp in items.items()},
                             passes=3 if quick else 10, per_pass=min_time / 5)

    t_tiny, t1, t21 = best["tiny"], best["soft1"], best["soft21"]
    per_kernel = max(0.0, (t21 - t1) / 20)
    call = max(0.0, t_tiny - per_kernel)
    meas.update(vm_call_seconds=t_tiny, per_kernel_seconds=per_kernel, call_seconds=call)

    per_element, rows = {}, []
    for cls in _class_shapes(n1):
        times = [best[f"{cls}_{elements}"] for elements in ELEMENTS]
        per_element[cls] = max((times[1] - times[0]) / (n2 - n1), 1e-15)
        rows.append({"class": cls, "op": _class_shapes(n1)[cls][0], "elements": list(ELEMENTS),
                     "seconds": times, "seconds_per_element": per_element[cls]})
    meas["kernels"] = rows

    t_add1, t_addc = best[f"elementwise_{n2}"], best["add_chain"]
    t_erf1, t_erfc = best[f"transcendental_{n2}"], best["erf_chain"]
    fused = {"elementwise": max((t_addc - t_add1) / (chain * n2), 0.0),
             "transcendental": max((t_erfc - t_erf1) / (chain * n2), 0.0)}
    meas["fused"] = {"chain": chain, "elements": n2, "add_seconds": [t_add1, t_addc],
                     "erf_seconds": [t_erf1, t_erfc], "seconds_per_element": fused}

    rates, grid = [], []
    for m, n, k in shapes:
        t = best[f"mm_{m}_{n}_{k}"]
        work = max(t - call - per_kernel, 0.5 * t)  # the kernel alone, as KernelSpec.seconds adds a call
        rate = 2 * m * n * k / work
        rates.append(rate)
        grid.append({"m": m, "n": n, "k": k, "seconds": t, "flops_per_s": rate})
    meas["matmul_grid"] = grid
    table = KernelTable(matmul_m=tuple(gm), matmul_n=tuple(gnk), matmul_k=tuple(gnk),
                        matmul_flops_per_s=tuple(rates), per_element=per_element, fused_per_element=fused,
                        per_kernel_s=per_kernel, call_s=call)
    return table, meas


def _matmul_builder(m: int, n: int, k: int):
    from tvm import relax

    def build(bb, name):
        x = relax.Var("x", relax.TensorType((m, k), "float32"))
        w = relax.Var("w", relax.TensorType((k, n), "float32"))
        with bb.function(name, [x, w], attrs={"num_input": 1}):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
            bb.emit_func_output(out)

    return build


def _spill_chain_tvm(l2: int, offchip: float, *, min_time: float, say) -> dict:
    """Time ``y = x @ W_1 @ W_2 ... @ W_n`` (16 x 512 x 512 each, ``n`` distinct 1 MB weights adding up
    to 2.5x the L2) and the same chain through one weight ``n`` times (resident). Compute: the
    resident chain; memory: the distinct weights read from off chip."""
    import math

    import tvm
    from tvm import relax

    rows, width = 16, 512
    count = max(2, math.ceil(2.5 * l2 / (4 * width * width)))
    say(f"spilling matmul chain {count} x {rows}x{width}x{width} "
        f"({format_bytes(count * 4 * width * width)} of weights)")

    def chain(distinct: bool):
        def build(bb, name):
            x = relax.Var("x", relax.TensorType((rows, width), "float32"))
            ws = [relax.Var(f"w{i}", relax.TensorType((width, width), "float32"))
                  for i in range(count if distinct else 1)]
            with bb.function(name, [x, *ws], attrs={"num_input": 1}):
                with bb.dataflow():
                    y = x
                    for i in range(count):
                        y = bb.emit(relax.op.matmul(y, ws[i if distinct else 0]))
                    out = bb.emit_output(y)
                bb.emit_func_output(out)

        return build

    vm, dev, args = _build_many({"spill": chain(True), "resident": chain(False)})
    rng = np.random.default_rng(0)
    scale = np.float32(1 / np.sqrt(width))  # keeps the chain's values finite

    def tensor(shape, s=1.0):
        return tvm.runtime.tensor((rng.standard_normal(shape) * s).astype(np.float32), dev)

    x = tensor((rows, width))
    ws = [tensor((width, width), scale) for _ in range(count)]
    items = {"spill": args("spill", [x, *ws]), "resident": args("resident", [x, ws[0]])}
    best = _time_interleaved(vm, dev, items, passes=10, per_pass=min_time / 2)
    return {"m": rows, "k": width, "n": width, "count": count, "seconds": best["spill"],
            "compute_s": best["resident"], "memory_s": count * 4 * width * width / offchip}


def _block_tvm(*, min_time: float, repeats: int, spill_l2: int | None = None,
               table: KernelTable | None = None) -> dict | None:
    """A small pre-norm transformer block (hidden 128, ffn 512, 2 x 16 tokens: not the size of any
    reference preset) compiled by ``cachefit compile`` into one single-thread stage: its effective
    FLOP/s (the ``flops / peak`` model's peak). With ``spill_l2`` (the L2 bytes) also a stack of such
    blocks whose weights add up to 2.5x that L2, compiled into one stage: a spilling stage, whose
    time per block against the resident block's gives the compute/memory overlap of a real kernel
    mix. Both stages are timed interleaved, Python call included. With ``table``, also the block's
    compute as the per-kernel cost model predicts it (its kernels from its Relax IR, timed with the
    table). None if that path is unavailable."""
    import math
    import tempfile

    try:
        import tvm

        from .. import runtime
        from ..compiler import compile_model
        from ..models import build
    except ImportError as exc:
        logger.warning("transformer-block calibration skipped: %s", exc)
        return None

    def model(layers: int):
        return build("dense", layers=layers, hidden=128, heads=4, ffn=512, seq=16, batch=2, dtype="float32")

    with tempfile.TemporaryDirectory(prefix="cachefit-calibrate-") as tmp:
        # 0.8 MB of weights: resident in any L2 of 1 MB or more
        result = compile_model(model(1), out_dir=f"{tmp}/one", target="llvm", devices=1, cache="1GB", threads=1)
        flops = sum(layer.flops for layer in result.analysis.layers)
        weights = sum(layer.weight_bytes for layer in result.analysis.layers)
        kernels_s = None
        if table is not None:
            from .flops import module_kernels

            kernels_s = sum(p.seconds(table) for p in module_kernels(result.analysis.mod).values())
        dirs = {"one": f"{tmp}/one"}
        count = 0
        if spill_l2:
            count = max(2, math.ceil(2.5 * spill_l2 / weights))
            compile_model(model(count), out_dir=f"{tmp}/spill", target="llvm", devices=1, cache="1GB", threads=1)
            dirs["spill"] = f"{tmp}/spill"
        calls = {}
        for key, path in dirs.items():
            pipe = runtime.load(path)
            stage = pipe.stages[0]
            rng = np.random.default_rng(0)
            args = [tvm.runtime.tensor(rng.standard_normal(d["shape"]).astype(d["dtype"]), stage.device)
                    for d in pipe.inputs]
            calls[key] = (lambda st, a: lambda: st(a))(stage, args)
        best = time_calls(calls, passes=max(repeats * 8, 40), per_pass=min_time / 4)
    t = best["one"]
    out = {"hidden": 128, "ffn": 512, "tokens": 32, "flops": flops, "weight_bytes": weights, "seconds": t,
           "flops_per_s": flops / t, "kernels_seconds": kernels_s}
    if spill_l2:
        out["spill"] = {"layers": count, "weight_bytes": count * weights, "seconds": best["spill"],
                        "seconds_per_layer": best["spill"] / count}
    return out


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

    table = None
    if method == "tvm":
        # per-shape, per-class kernel speeds: what the cost model sums a layer's kernels with
        table, kmeas = measure_kernel_table(quick=quick, min_time=min_time, say=say)
        meas.update(kmeas)

    # compute: matmul FLOP/s over a few shapes (numpy), or the kernel table's grid (tvm)
    if table is not None:
        rates = list(table.matmul_flops_per_s)
    else:
        rates = []
        for m, k, n in MATMUL_SHAPES[:3] if quick else MATMUL_SHAPES:
            say(f"matmul {m}x{k}x{n}")
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
        block = _block_tvm(min_time=min_time, repeats=repeats, spill_l2=None if quick else l2, table=table)
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

    # compute/memory overlap
    if method == "tvm":
        # a chain of 16x512x512 matmuls through distinct weights (2.5x L2 in all, cycled as a spilling
        # stage cycles its layers' weights) against the same chain through one weight (resident):
        # the same kernels, only the weights' residency differs
        spill = _spill_chain_tvm(l2, offchip, min_time=min_time, say=say)
        t_sp, c, m = spill["seconds"], spill["compute_s"], spill["memory_s"]
    else:
        # a matmul whose weights spill out of L2, against max(compute, memory)
        k_n = max(256, int((2.5 * l2 / 4) ** 0.5) // 64 * 64)
        say(f"spilling matmul 16x{k_n}x{k_n} ({format_bytes(4 * k_n * k_n)} of weights)")
        a16 = np.ones((16, k_n), np.float32)
        wbig = np.ones((k_n, k_n), np.float32)
        t_sp = _best_time(lambda: a16 @ wbig, min_time=min_time, repeats=repeats)
        c = 2 * 16 * k_n * k_n / meas["matmul_flops_per_s"]
        m = (4 * k_n * k_n) / offchip + (2 * 16 * k_n * 4) / onchip
        spill = {"k": k_n, "n": k_n, "m": 16, "seconds": t_sp, "compute_s": c, "memory_s": m}
    overlap = _overlap(t_sp, c, m, kernel_timed=table is not None)
    meas["spill_matmul"] = {**spill, "memory_overlap": overlap}
    if "spill" in meas.get("block", {}):
        # a real kernel mix hides less of the off-chip traffic than a matmul chain: a stack of
        # blocks (weights 2.5x L2), per block, against the block's compute sets the overlap. The
        # compute is the per-kernel model's own prediction for the block (with a kernel table),
        # so the overlap is what makes the model's spilling time right on this generic block;
        # the stage's fixed call cost is spread over its blocks.
        b, sp = meas["block"], meas["block"]["spill"]
        kernel_timed = table is not None and b.get("kernels_seconds")
        c = b["kernels_seconds"] if kernel_timed else b["seconds"]
        m = b["weight_bytes"] / offchip
        t_layer = sp["seconds_per_layer"] - (table.call_s / sp["layers"] if kernel_timed else 0.0)
        overlap = _overlap(t_layer, c, m, kernel_timed=bool(kernel_timed))
        sp.update(compute_s=c, memory_s=m, memory_overlap=overlap)

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
        kernels=table,
        source=f"calibrated ({method} kernels, {time.strftime('%Y-%m-%d %H:%M')})",
    )
    return hw, meas


def _overlap(t: float, compute: float, memory: float, *, kernel_timed: bool) -> float:
    """The ``memory_overlap`` for which the cost model's layer time equals the measured ``t``
    (clamped to [0, 1]): ``max(c, m) + (1 - o) min(c, m)``, or with kernel-timed compute (on-chip
    traffic inside, ``memory`` off-chip only) ``max(m, c + (1 - o) m)``
    (see :class:`cachefit.perf.costmodel.LayerCost`)."""
    if memory <= 0 or compute <= 0:
        return 1.0
    if kernel_timed:
        if t <= memory:
            return 1.0
        o = 1.0 - (t - compute) / memory
    else:
        o = 1.0 - (t - max(compute, memory)) / min(compute, memory)
    return min(1.0, max(0.0, o))


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
    table = hw.kernels
    if table is not None:
        nn, nk = len(table.matmul_n), len(table.matmul_k)
        lines.append("  kernel table: matmul GFLOP/s by M (rows) and (N, K): "
                     + " ".join(f"({n},{k})" for n in table.matmul_n for k in table.matmul_k))
        for i, m in enumerate(table.matmul_m):
            rates = table.matmul_flops_per_s[i * nn * nk:(i + 1) * nn * nk]
            lines.append(f"    M={m:<4d} " + " ".join(f"{r / 1e9:5.0f}" for r in rates))
        lines.append("  per output element (ns): " + ", ".join(
            f"{c} {v * 1e9:.3f}" for c, v in table.per_element.items()) + "; fused into a kernel: " + ", ".join(
            f"{c} {v * 1e9:.3f}" for c, v in table.fused_per_element.items()))
        lines.append(f"  VM call {table.call_s * 1e6:.2f} us, +{table.per_kernel_s * 1e6:.2f} us per kernel")
    if "spill_matmul" in meas:
        sp = meas["spill_matmul"]
        what = (f"{sp['count']} chained matmuls 16x{sp['k']}x{sp['n']}, distinct weights" if "count" in sp
                else f"matmul 16x{sp['k']}x{sp['n']}")
        lines.append(f"  {what} out of L2: {sp['seconds'] * 1e3:.3f} ms against "
                     f"compute {sp['compute_s'] * 1e3:.3f} ms, memory {sp['memory_s'] * 1e3:.3f} ms: "
                     f"overlap {sp['memory_overlap']:.2f}")
    if "block" in meas:
        b = meas["block"]
        lines.append(f"  transformer block ({b['flops'] / 1e6:.1f} MFLOP): {b['seconds'] * 1e3:.3f} ms = "
                     f"{b['flops_per_s'] / 1e9:.2f} GFLOP/s (the preset's peak)")
        if b.get("kernels_seconds"):
            lines.append(f"    its kernels as the per-kernel model times them: {b['kernels_seconds'] * 1e3:.3f} ms")
        if "spill" in b:
            sp = b["spill"]
            lines.append(f"  {sp['layers']} such blocks in one stage ({format_bytes(sp['weight_bytes'])} of weights): "
                         f"{sp['seconds_per_layer'] * 1e3:.3f} ms per block against compute {sp['compute_s'] * 1e3:.3f}"
                         f" ms, memory {sp['memory_s'] * 1e3:.3f} ms: overlap {sp['memory_overlap']:.2f} (the preset's)")
    lines.append(f"  copy {meas['copy_bytes_per_s'] / GB:.2f} GB/s, thread hand-off {meas['handoff_seconds'] * 1e6:.1f} us")
    lines.append(
        f"preset: peak {hw.flops_for('float32') / 1e9:.2f} GFLOP/s, on-chip {hw.onchip_bw / GB:.2f} GB/s, "
        f"off-chip {hw.offchip_bw / GB:.2f} GB/s, link {hw.link_bw / GB:.2f} GB/s + {hw.link_latency * 1e6:.1f} us"
    )
    return "\n".join(lines)
