"""cachefit's CPU compile pipeline: schedules, conv2d as im2col + GEMM, weight prologues, vector math.

Every numeric test compares a compiled module with numpy or onnxruntime (relative error 1e-4 of the
output's largest magnitude); structural tests check that the rules really took the kernels
(scheduled, vectorised, parallel when asked, no transposed weight copy).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper
from tvm import relax, s_tir, te, tirx

import tvm.relax.frontend.onnx as rx_onnx

from cachefit.codegen import cpu_refmodels as ref
from cachefit.codegen.cpu_fastmath import VectorMath, fast_erf, fast_exp, fast_sigmoid, fast_tanh
from cachefit.codegen.cpu_legalize import padded_columns
from cachefit.codegen.cpu_schedule import CPUSpec, gemm_form, target_vector_bits
from cachefit.codegen.pipeline import compile_relax, cpu_passes, host_llvm_target
from cachefit.errors import CachefitError

RTOL = 1e-4
LLVM = tvm.target.Target({"kind": "llvm"})


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _run_onnx_both(model: onnx.ModelProto, threads: int = 1, seed: int = 1):
    """(cachefit output, onnxruntime output) of ``model`` on one random input."""
    mod = rx_onnx.from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    ex = compile_relax(mod, LLVM, threads=threads)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(p.numpy()) for p in params.get("main", [])]
    out = vm["main"](*args)
    out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = sess.run(None, {inp.name: x})[0]
    return out, want


def _scheduled(mod: tvm.IRModule, threads: int = 1) -> tvm.IRModule:
    target = host_llvm_target(LLVM)
    with target:
        return tvm.transform.Sequential(cpu_passes(target, CPUSpec.for_target(target, threads)))(mod)


def _loop_kinds(func) -> set:
    kinds = set()
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda f: kinds.add(f.kind)), order="post")
    return kinds


def _matmul_module(m, n, k, *, transposed=False, epilogue=True, batch=None):
    """main(x, w, b) = relu(x @ w + b) (``w`` given as [n, k] and transposed when ``transposed``)."""
    xs = (m, k) if batch is None else (batch, m, k)
    x = relax.Var("x", relax.TensorType(xs, "float32"))
    w = relax.Var("w", relax.TensorType((n, k) if transposed else (k, n), "float32"))
    b = relax.Var("b", relax.TensorType((n,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(w, [1, 0])) if transposed else w
            y = bb.emit(relax.op.matmul(x, wt))
            if epilogue:
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, b)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run_vm(mod, args, threads=1):
    ex = compile_relax(mod, LLVM, threads=threads)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


# ---------------------------------------------------------------------------------------------
# vector math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,fn,ref_fn,lo,hi",
    [
        ("exp", fast_exp, np.exp, -87.0, 88.0),
        ("erf", fast_erf, np.vectorize(math.erf), -6.0, 6.0),
        ("tanh", fast_tanh, np.tanh, -12.0, 12.0),
        ("sigmoid", fast_sigmoid, lambda v: 1.0 / (1.0 + np.exp(-v)), -40.0, 40.0),
    ],
)
def test_vector_math_matches_libm(name, fn, ref_fn, lo, hi):
    """The polynomial exp/erf/tanh/sigmoid are within 1e-6 relative of libm over their range and
    compile without a single libm call (so they vectorise)."""
    n = 1 << 15
    a = te.placeholder((n,), name="a")
    c = te.compute((n,), lambda i: fn(a[i]), name="c")
    sch = s_tir.Schedule(te.create_prim_func([a, c]))
    (loop,) = sch.get_loops(sch.get_sblock("c"))
    _, inner = sch.split(loop, [None, 16])
    sch.vectorize(inner)
    target = host_llvm_target(LLVM)
    lib = tvm.compile(sch.mod, target)
    asm = lib.mod.inspect_source("asm")
    assert not any(f in asm for f in ("expf", "erff", "tanhf")), f"{name} still calls libm"
    for x in (np.linspace(lo, hi, n), np.linspace(-1e-3, 1e-3, n), np.geomspace(1e-6, 1.0, n)):
        x = x.astype(np.float32)
        out = tvm.runtime.tensor(np.zeros(n, np.float32))
        lib(tvm.runtime.tensor(x), out)
        want = ref_fn(x.astype(np.float64))
        rel = np.abs(out.numpy() - want) / np.maximum(np.abs(want), 1e-30)
        assert rel.max() < 1e-6, f"{name}: max relative error {rel.max():.2e} on [{x.min()}, {x.max()}]"


def test_vector_math_pass_rewrites_only_float32():
    """VectorMath replaces float32 exp; a float64 exp keeps its intrinsic."""
    a32 = te.placeholder((8,), "float32", name="a")
    a64 = te.placeholder((8,), "float64", name="b")
    c = te.compute((8,), lambda i: te.exp(a32[i]), name="c")
    d = te.compute((8,), lambda i: te.exp(a64[i]), name="d")
    mod = tvm.IRModule({"f32": te.create_prim_func([a32, c]), "f64": te.create_prim_func([a64, d])})
    out = VectorMath()(mod)
    assert "T.exp" not in out["f32"].script()
    assert "T.exp" in out["f64"].script()
    assert "T.exp" in mod["f32"].script(), "the input module must not be modified"


def test_exp_saturates_instead_of_overflowing():
    """exp clamps its input: exp(-inf) and exp(-1e4) are exactly 0 (no denormals downstream, as
    in a masked softmax) and exp(1000) is finite."""
    a = te.placeholder((4,), name="a")
    c = te.compute((4,), lambda i: fast_exp(a[i]), name="c")
    lib = tvm.compile(te.create_prim_func([a, c]), host_llvm_target(LLVM))
    out = tvm.runtime.tensor(np.zeros(4, np.float32))
    lib(tvm.runtime.tensor(np.array([-np.inf, -1e4, 1e3, 0.0], np.float32)), out)
    got = out.numpy()
    assert got[0] == 0.0 and got[1] == 0.0
    assert np.isfinite(got[2]) and got[2] > 1e38
    assert got[3] == pytest.approx(1.0, rel=1e-7)


# ---------------------------------------------------------------------------------------------
# recognising matmul-like blocks
# ---------------------------------------------------------------------------------------------


def _form_of(out: te.Tensor, *ins):
    sch = s_tir.Schedule(te.create_prim_func([*ins, out]))
    return gemm_form(sch, sch.get_sblock(out.op.name))


def test_gemm_form_nn_nt_batched_and_not_a_gemm():
    """x @ W is an outer-product GEMM, x @ W.T a dot-product one, x[b, s, k] @ W folds b into the
    rows; an element-wise block and a plain sum are not GEMMs."""
    x = te.placeholder((8, 32), name="x")
    w = te.placeholder((32, 64), name="w")
    wt = te.placeholder((64, 32), name="wt")
    k = te.reduce_axis((0, 32), name="k")
    nn = _form_of(te.compute((8, 64), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="mm"), x, w)
    assert nn.kind == "nn" and nn.m == 8 and nn.extents[nn.j] == 64
    k = te.reduce_axis((0, 32), name="k")
    nt = _form_of(te.compute((8, 64), lambda i, j: te.sum(x[i, k] * wt[j, k], axis=k), name="mm"), x, wt)
    assert nt.kind == "nt"
    x3 = te.placeholder((2, 16, 32), name="x3")
    k = te.reduce_axis((0, 32), name="k")
    b3 = _form_of(te.compute((2, 16, 64), lambda b, i, j: te.sum(x3[b, i, k] * w[k, j], axis=k), name="mm"),
                  x3, w)
    assert b3.kind == "nn" and b3.m == 32 and b3.batch == []
    # attention: both operands batched, the batch stays a batch
    q = te.placeholder((4, 16, 8), name="q")
    kt = te.placeholder((4, 8, 16), name="kt")
    r = te.reduce_axis((0, 8), name="r")
    att = _form_of(te.compute((4, 16, 16), lambda h, i, j: te.sum(q[h, i, r] * kt[h, r, j], axis=r), name="s"),
                   q, kt)
    assert att.kind == "nn" and att.batch and att.m == 16
    ew = te.compute((8, 32), lambda i, j: x[i, j] * 2.0, name="ew")
    assert _form_of(ew, x) is None
    k = te.reduce_axis((0, 32), name="k")
    assert _form_of(te.compute((8,), lambda i: te.sum(x[i, k], axis=k), name="s"), x) is None


# ---------------------------------------------------------------------------------------------
# matmul kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,n,k", [(8, 256, 256), (7, 48, 33), (1, 1000, 64), (130, 64, 72), (16, 512, 2048)])
def test_matmul_bias_relu_matches_numpy(m, n, k, transposed):
    """relu(x @ W + b) (W stored [k, n] or, as ONNX Gemm(transB=1) keeps it, [n, k]) for shapes with
    and without divisible tiles, with the epilogue on the register tile."""
    rng = np.random.default_rng(m * 7 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    mod = _matmul_module(m, n, k, transposed=transposed)
    got = _run_vm(mod, [x, np.ascontiguousarray(w.T) if transposed else w, b])
    want = np.maximum(x @ w + b, 0)
    assert _rel_err(got, want) < RTOL


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_schedule_vectorised_and_parallel_when_asked(threads):
    """The matmul kernel is scheduled and vectorised; it has parallel loops exactly when the stage
    owns more than one thread; its numbers do not depend on the thread count."""
    m, n, k = 64, 256, 256
    mod = _matmul_module(m, n, k)
    low = _scheduled(mod, threads)
    funcs = [f for _, f in low.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert funcs and all(int(f.attrs["tirx.is_scheduled"]) == 1 for f in funcs)
    mm = [f for f in funcs if "matmul" in f.script()]
    kinds = _loop_kinds(mm[0])
    assert tirx.ForKind.VECTORIZED in kinds and tirx.ForKind.UNROLLED in kinds
    assert (tirx.ForKind.PARALLEL in kinds) == (threads > 1)
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    assert _rel_err(_run_vm(mod, [x, w, b], threads), np.maximum(x @ w + b, 0)) < RTOL


def test_batched_matmul_without_epilogue():
    """x[b, s, k] @ W[k, n] with the output written straight from the register tile."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 24, 96)).astype(np.float32)
    w = rng.standard_normal((96, 80)).astype(np.float32)
    mod = _matmul_module(24, 80, 96, epilogue=False, batch=2)
    got = _run_vm(mod, [x, w, np.zeros(80, np.float32)])
    assert _rel_err(got, x @ w) < RTOL


def test_transposed_weight_is_read_in_place():
    """A Gemm(transB=1) weight is not copied into a transposed tensor at run time: the transpose
    is fused into the matmul kernel (no PrimFunc of main is a lone transpose)."""
    low = _scheduled(_matmul_module(8, 64, 32, transposed=True))
    call_tir = tvm.ir.Op.get("relax.call_tir")
    callees = []
    relax.analysis.post_order_visit(
        low["main"].body,
        lambda e: callees.append(e.args[0].name_hint) if isinstance(e, relax.Call) and e.op.same_as(call_tir) else None,
    )
    assert len(callees) == 1, callees
    assert "transpose" in callees[0] and "matmul" in callees[0]


def test_dequantized_weight_fuses_into_matmul():
    """matmul(x, dequantize(int8 W, scale)) keeps W as int8 (one kernel, weight decoded on the fly)."""
    m, n, k = 8, 64, 128
    rng = np.random.default_rng(5)
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    q = relax.Var("q", relax.TensorType((k, n), "int8"))
    s = relax.Var("s", relax.TensorType((n,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, q, s]):
        with bb.dataflow():
            w = bb.emit(relax.op.dequantize(q, s, relax.const(0, "int8"), axis=1, out_dtype="float32"))
            y = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
        bb.emit_func_output(y)
    mod = bb.get()
    low = _scheduled(mod)
    call_tir = tvm.ir.Op.get("relax.call_tir")
    calls = []
    relax.analysis.post_order_visit(
        low["main"].body, lambda e: calls.append(e) if isinstance(e, relax.Call) and e.op.same_as(call_tir) else None
    )
    assert len(calls) == 1
    xv = rng.standard_normal((m, k)).astype(np.float32)
    qv = rng.integers(-127, 128, (k, n)).astype(np.int8)
    sv = rng.uniform(0.001, 0.01, n).astype(np.float32)
    got = _run_vm(mod, [xv, qv, sv])
    assert _rel_err(got, xv @ (qv.astype(np.float32) * sv)) < RTOL


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------


def test_padded_columns():
    """The conv GEMM's column count is at least P and a multiple of the vector width."""
    for p in list(range(1, 300)) + [3025, 3136, 12321, 12544]:
        for lanes in (4, 8, 16):
            q = padded_columns(p, lanes)
            assert q >= p and q % lanes == 0 and q - p < 4 * lanes


def _conv_model(cin, cout, size, kernel, stride, pad, dilation, bias, seed=0):
    rng = np.random.default_rng(seed)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [cout, cin, kernel, kernel],
                                (rng.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel))
                                .astype(np.float32).ravel())]
    ins = ["x", "w"]
    if bias:
        inits.append(helper.make_tensor("b", TensorProto.FLOAT, [cout], rng.standard_normal(cout).astype(np.float32)))
        ins.append("b")
    node = helper.make_node("Conv", ins, ["c"], strides=[stride, stride], pads=[pad] * 4,
                            dilations=[dilation, dilation])
    relu = helper.make_node("Relu", ["c"], ["y"])
    h_out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    graph = helper.make_graph(
        [node, relu], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, h_out, h_out])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize(
    "cin,cout,size,kernel,stride,pad,dilation,bias",
    [
        (3, 16, 17, 3, 1, 1, 1, True),     # odd spatial size: padded GEMM columns
        (8, 24, 16, 3, 2, 1, 1, False),    # stride 2
        (16, 32, 14, 1, 1, 0, 1, True),    # 1x1
        (4, 8, 15, 3, 1, 2, 2, True),      # dilation 2
        (5, 7, 12, 5, 2, 2, 1, True),      # 5x5, channel counts without good divisors
        (3, 64, 224, 7, 2, 3, 1, False),   # a ResNet stem (K = 147, P = 12544)
    ],
)
def test_conv2d_im2col_matches_onnxruntime(cin, cout, size, kernel, stride, pad, dilation, bias):
    """conv2d (+ bias + relu) through im2col + GEMM agrees with onnxruntime."""
    got, want = _run_onnx_both(_conv_model(cin, cout, size, kernel, stride, pad, dilation, bias))
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL


@pytest.mark.parametrize("stride,kind,blocks", [
    (1, "conv2d_direct", ("cachefit_dconv_gemm_update", "cachefit_dconv_pad")),
    (2, "conv2d_im2col", ("cachefit_conv_gemm_update", "cachefit_im2col")),
])
def test_conv2d_is_a_scheduled_gemm(stride, kind, blocks):
    """A stride-1 convolution becomes an implicit GEMM over the padded input (no column matrix),
    a strided one im2col + GEMM; either way one kernel whose GEMM block the matmul rule tiles."""
    mod = rx_onnx.from_onnx(_conv_model(16, 32, 14, 3, stride, 1, 1, True), keep_params_in_input=True)
    mod, _ = relax.frontend.detach_params(mod)
    low = _scheduled(mod)
    convs = [f for g, f in low.functions_items() if kind in g.name_hint]
    assert len(convs) == 1
    text = convs[0].script()
    assert all(b in text for b in blocks)
    kinds = _loop_kinds(convs[0])
    assert tirx.ForKind.VECTORIZED in kinds and tirx.ForKind.UNROLLED in kinds


def test_grouped_conv_falls_back_to_topi():
    """A depthwise convolution (groups > 1) keeps TOPI's loop nest and still agrees with onnxruntime."""
    rng = np.random.default_rng(2)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 3, 3], rng.standard_normal(72).astype(np.float32))
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    got, want = _run_onnx_both(model)
    assert _rel_err(got, want) < RTOL


# ---------------------------------------------------------------------------------------------
# whole models against onnxruntime
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: ref.mlp(), id="mlp-matmul"),
        pytest.param(lambda: ref.mlp(batch=4, width=96, layers=2, gemm=True), id="mlp-gemm-transB"),
        pytest.param(lambda: ref.transformer_block(layers=1, style="gpt2"), id="gpt2-block"),
        pytest.param(lambda: ref.transformer_block(layers=1, style="llama"), id="llama-block"),
        pytest.param(lambda: ref.small_convnet(), id="small-convnet"),
    ],
)
def test_models_match_onnxruntime(build, caplog):
    """MLPs, GPT-2 / Llama style attention blocks (layer norm, RMS norm, softmax, GELU, SiLU) and a
    small conv net (conv + batch norm + residual + pooling + Gemm) agree with onnxruntime, and no
    schedule rule raised on their kernels (a raising rule falls back to the next one silently:
    correct, slower)."""
    import logging

    caplog.set_level(logging.DEBUG, logger="cachefit.codegen.cpu_schedule")
    got, want = _run_onnx_both(build())
    assert _rel_err(got, want) < RTOL
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert not failures, failures


def test_two_threads_same_numbers():
    """A stage compiled for two threads computes the same output as onnxruntime."""
    got, want = _run_onnx_both(ref.transformer_block(layers=1, seq=32, d_model=128, style="gpt2"), threads=2)
    assert _rel_err(got, want) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "resnet50"])
def test_light_zoo_cnn_matches_onnxruntime(name):
    """The onnx package's light zoo CNNs, with random weights in place of their constant ones."""
    got, want = _run_onnx_both(ref.light_model(name, seed=0))
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL


# ---------------------------------------------------------------------------------------------
# entry point, targets, options
# ---------------------------------------------------------------------------------------------


def test_host_target_gets_mcpu_and_explicit_mcpu_is_kept():
    """A bare llvm target is compiled for this host's CPU (SIMD width); an explicit mcpu stays."""
    host = host_llvm_target(LLVM)
    assert host.attrs.get("mcpu")
    assert target_vector_bits(host) >= 128
    explicit = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert host_llvm_target(explicit).attrs["mcpu"] == "haswell"
    assert target_vector_bits(explicit) == 256
    assert CPUSpec(vector_bits=512).lanes("float32") == 16
    assert CPUSpec(vector_bits=256).lanes("float16") == 16


def test_bad_arguments_are_user_errors(tmp_path):
    mod = _matmul_module(4, 16, 16)
    with pytest.raises(CachefitError, match="threads"):
        compile_relax(mod, LLVM, threads=0)
    with pytest.raises(CachefitError, match="not supported"):
        compile_relax(mod, tvm.target.Target({"kind": "c"}))
    with pytest.raises(CachefitError, match="tuning records"):
        compile_relax(mod, LLVM, tuning_records=str(tmp_path / "nothing"))


def test_cuda_pipeline_builds_without_a_gpu():
    """For CUDA the pipeline applies dlight's GPU rules: every kernel gets thread bindings, so the
    build succeeds (it fails on unscheduled TIR)."""
    from cachefit.codegen import cuda as cuda_tools

    # as codegen builds CUDA: device code by the installed nvcc (TVM's default, NVRTC, needs the
    # cuda-bindings package, which cachefit does not depend on)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    with cuda_tools.nvcc_device_code("sm_80"), target:
        ex = compile_relax(_matmul_module(8, 64, 64), target)
    assert ex is not None


# ---------------------------------------------------------------------------------------------
# tuning records
# ---------------------------------------------------------------------------------------------


def _unrolled_extents(func) -> set:
    ext = set()
    tvm_ffi.structural_walk(
        func.body,
        (tirx.For, lambda f: ext.add(int(f.extent)) if f.kind == tirx.ForKind.UNROLLED else None),
        order="post",
    )
    return ext


def test_tuning_records_change_the_tile(tmp_path):
    """A record for a kernel (keyed by its structural hash) replaces the default register tile;
    kernels without a record keep the default; the numbers stay right."""
    import json

    from cachefit.codegen.cpu_schedule import workload_key
    from cachefit.codegen.cpu_tuning import FORMAT, RECORDS_FILE, schedulable_module

    mod = _matmul_module(8, 64, 64)
    ready = schedulable_module(mod, LLVM, threads=1)
    keys = [workload_key(f) for _, f in ready.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(keys) == 1
    (tmp_path / RECORDS_FILE).write_text(json.dumps({
        "format": FORMAT, "version": 1,
        "records": {keys[0]: {"name": "mm", "config": {"mr": 2, "nr": 1, "pack": False, "stream": False}}},
    }))
    target = host_llvm_target(LLVM)
    spec = CPUSpec.for_target(target, 1)
    with target:
        tuned = tvm.transform.Sequential(cpu_passes(target, spec, str(tmp_path)))(mod)
        default = tvm.transform.Sequential(cpu_passes(target, spec))(mod)
    f_tuned = [f for _, f in tuned.functions_items() if isinstance(f, tirx.PrimFunc)][0]
    f_default = [f for _, f in default.functions_items() if isinstance(f, tirx.PrimFunc)][0]
    assert _unrolled_extents(f_tuned) == {1, 2}  # 2 rows x 1 vector
    assert _unrolled_extents(f_default) != {2}
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((8, 64), (64, 64), (64,)))
    ex = compile_relax(mod, LLVM, threads=1, tuning_records=str(tmp_path))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in (x, w, b)]).numpy()
    assert _rel_err(got, np.maximum(x @ w + b, 0)) < RTOL


def test_tune_relax_writes_records_compile_reads(tmp_path):
    """tune_relax measures candidates for each matmul kernel and writes a records file that
    compile_relax accepts; a file of another format is refused with a user error."""
    import json

    from cachefit.codegen.cpu_tuning import RECORDS_FILE, load_records, tune_relax

    mod = _matmul_module(16, 128, 128)
    tune_relax(mod, LLVM, tmp_path, max_trials=3, threads=1, min_gain=-1.0)
    data = json.loads((tmp_path / RECORDS_FILE).read_text())
    assert data["format"] == "cachefit-cpu-tuning" and len(data["records"]) == 1
    rec = next(iter(data["records"].values()))
    assert {"mr", "nr"} <= set(rec["config"]) and rec["best_ms"] > 0
    assert load_records(tmp_path) == {k: v["config"] for k, v in data["records"].items()}
    assert compile_relax(mod, LLVM, threads=1, tuning_records=str(tmp_path)) is not None
    (tmp_path / RECORDS_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CachefitError, match="not a cachefit tuning file"):
        compile_relax(mod, LLVM, tuning_records=str(tmp_path))


@pytest.mark.parametrize("threads", [1, 2])
def test_mean_over_rows_and_columns_is_vectorised_along_the_lanes(threads):
    """A mean over the rows and columns of an NCHWc tensor (global average pooling) reduces with
    the channel block's 16 lanes as the vector (the row-reduction rule would read one strided
    scalar at a time), runs its channel blocks in parallel with two threads (the loop is made
    parallel before the init is split off, which would forbid it), and matches numpy."""
    shape = (1, 8, 32, 32, 16)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.mean(x, axis=[2, 3], keepdims=True)))
        bb.emit_func_output(out)
    mod = bb.get()
    low = _scheduled(mod, threads)
    (func,) = [f for _, f in low.functions_items() if isinstance(f, tirx.PrimFunc)]
    vec = []
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda f: vec.append(f) if f.kind == tirx.ForKind.VECTORIZED else None),
                            order="post")
    update = [f for f in vec if "red" in str(f.body) and "T.init" not in str(f.body)]
    assert update and all(int(f.extent) == 16 for f in update)
    assert (tirx.ForKind.PARALLEL in _loop_kinds(func)) is (threads == 2)
    a = np.random.default_rng(0).standard_normal(shape).astype("float32")
    np.testing.assert_allclose(_run_vm(mod, [a], threads), a.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)


def test_row_softmax_keeps_the_row_reduction_schedule():
    """A softmax over the last axis (its reductions read the innermost axis: not a reduction over
    outer axes) stays with the row-reduction rule: vector partial sums (rfactor) per row."""
    x = relax.Var("x", relax.TensorType((8, 256), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(x, axis=-1)))
        bb.emit_func_output(out)
    low = _scheduled(bb.get(), 1)
    (func,) = [f for _, f in low.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert "_rf" in func.script()
