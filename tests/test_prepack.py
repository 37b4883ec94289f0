"""Compile-time weight pre-packing (cachefit.codegen.prepack): marked packs lifted, the rest left alone."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.sym
import tvm_ffi
from tvm import relax, s_tir, te, tirx

from cachefit.codegen import cpu_refmodels as ref
from cachefit.codegen.cpu_schedule import gemm_form
from cachefit.codegen.pipeline import compile_relax
from cachefit.codegen.prepack import (
    LAYOUT_ATTR,
    TRANSFORM_SUFFIX,
    LiftWeightPacks,
    PackedParam,
    mark_weight_pack,
    matmul_pack_func,
    packed_matmul_func,
    packed_params,
    panel_width,
)

LLVM = tvm.target.Target({"kind": "llvm"})


def _transpose_func(rows: int, cols: int, marked: bool) -> tirx.PrimFunc:
    w = te.placeholder((rows, cols), "float32", "w")
    wt = te.compute((cols, rows), lambda i, j: w[j, i], name="wt")
    func = te.create_prim_func([w, wt], index_dtype_override="int64").without_attr("global_symbol")
    return mark_weight_pack(func) if marked else func


def _pack_module(marked: bool, extra_use: bool = False) -> tvm.IRModule:
    """main(x, w, b) = x @ t(w) + b, with t a call_tir transposing w (marked as a pack or not);
    with ``extra_use`` w is also read directly (x @ w)."""
    bb = relax.BlockBuilder()
    gv = bb.add_func(_transpose_func(16, 16, marked), "transpose_w")
    x = relax.Var("x", relax.TensorType((4, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 16), "float32"))
    b = relax.Var("b", relax.TensorType((16,), "float32"))
    with bb.function("main", [x, w, b], {"num_input": 1}):
        with bb.dataflow():
            wt = bb.emit(relax.call_tir(gv, [w], relax.TensorType((16, 16), "float32")))
            y = bb.emit(relax.op.add(relax.op.matmul(x, wt), b))
            if extra_use:
                y = bb.emit(relax.op.add(y, relax.op.matmul(x, w)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _call_tir_names(func: relax.Function) -> list[str]:
    call_tir = tvm.ir.Op.get("relax.call_tir")
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return names


def _legalized(mod):
    return relax.transform.LegalizeOps()(mod)


def test_marked_pack_is_lifted_into_a_transform_function():
    """A call_tir of a marked PrimFunc on a weight leaves main: main takes its output (same type)
    in place of the weight, main_transform_params computes it, the layout attribute says so."""
    lifted = LiftWeightPacks()(_legalized(_pack_module(marked=True)))
    main = lifted["main"]
    assert [p.name for p in main.params] == ["x", "w_packed", "b"]
    assert "transpose_w" not in _call_tir_names(main)
    assert [[int(a), str(b)] for a, b in main.attrs[LAYOUT_ATTR]] == [[0, "transpose_w"], [1, ""]]
    assert packed_params(lifted) == [PackedParam(0, "transpose_w", (16, 16), "float32"),
                                     PackedParam(1, None, (16,), "float32")]
    transform = lifted["main" + TRANSFORM_SUFFIX]
    assert [p.name for p in transform.params] == ["w", "b"]
    assert _call_tir_names(transform) == ["transpose_w"]


def test_unmarked_relayout_is_not_lifted():
    """The same transpose without the attribute stays in main, which keeps taking the weight."""
    mod = _legalized(_pack_module(marked=False))
    lifted = LiftWeightPacks()(mod)
    assert [p.name for p in lifted["main"].params] == ["x", "w", "b"]
    assert "transpose_w" in _call_tir_names(lifted["main"])
    assert packed_params(lifted) is None
    assert "main" + TRANSFORM_SUFFIX not in [gv.name_hint for gv in lifted.get_global_vars()]


def test_weight_read_elsewhere_stays_a_parameter_next_to_its_pack():
    lifted = LiftWeightPacks()(_legalized(_pack_module(marked=True, extra_use=True)))
    assert [p.name for p in lifted["main"].params] == ["x", "w", "w_packed", "b"]
    assert [(p.source, p.pack) for p in packed_params(lifted)] == [(0, None), (0, "transpose_w"), (1, None)]


@pytest.mark.parametrize("extra_use", [False, True])
def test_lifted_pack_gives_the_same_outputs(extra_use):
    """compile_relax(prepack=True) + pack(weights) computes what the module computes with its packs
    run on every call (prepack=False)."""
    mod = _pack_module(marked=True, extra_use=extra_use)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16)).astype("float32")
    w = rng.standard_normal((16, 16)).astype("float32")
    b = rng.standard_normal(16).astype("float32")
    plain = relax.VirtualMachine(compile_relax(mod, LLVM, threads=1), tvm.cpu())["main"]
    compiled = compile_relax(mod, LLVM, threads=1, prepack=True)
    packed = compiled.pack([w, b])
    assert [tuple(t.shape) for t in packed] == [p.shape for p in compiled.params()]
    fn = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"]
    want = x @ w.T + b + (x @ w if extra_use else 0)
    got = fn(tvm.runtime.tensor(x), *packed).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain(*[tvm.runtime.tensor(a) for a in (x, w, b)]).numpy(), got, rtol=1e-5, atol=1e-5)


def _dequant_module(k=64, n=64) -> tvm.IRModule:
    """x @ w0 (float) then @ (wq * scale) (an INT8 weight dequantized in the graph)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, k), "float32"))
    w0 = relax.Var("w0", relax.TensorType((k, n), "float32"))
    wq = relax.Var("wq", relax.TensorType((n, n), "int8"))
    s = relax.Var("s", relax.TensorType((1, n), "float32"))
    with bb.function("main", [x, w0, wq, s], {"num_input": 1}):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, w0))
            deq = bb.emit(relax.op.multiply(relax.op.astype(wq, "float32"), s))
            out = bb.emit_output(relax.op.matmul(h, deq))
        bb.emit_func_output(out)
    return bb.get()


def test_matmul_weights_are_packed_and_the_dequantize_prologue_is_not():
    """prepack packs the float weight into column panels; the INT8 weight and its scale stay as
    they are (1 byte per weight), dequantized inside the kernel; outputs match numpy."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 64)).astype("float32")
    w0 = rng.standard_normal((64, 64)).astype("float32")
    wq = rng.integers(-127, 128, (64, 64)).astype("int8")
    s = (rng.random((1, 64)) / 64).astype("float32")
    compiled = compile_relax(_dequant_module(), LLVM, threads=1, prepack=True)
    layout = compiled.params()
    assert [(p.source, p.pack is not None, p.dtype) for p in layout] == [(0, True, "float32"), (1, False, "int8"),
                                                                          (2, False, "float32")]
    panel = layout[0].shape[2]
    assert layout[0].shape == (64 // panel, 64, panel)
    packed = compiled.pack([w0, wq, s])
    np.testing.assert_array_equal(packed[0].numpy(), w0.reshape(64, 64 // panel, panel).transpose(1, 0, 2))
    assert packed[1].numpy().dtype == np.int8
    fn = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"]
    got = fn(tvm.runtime.tensor(x), *packed).numpy()
    want = (x @ w0) @ (wq.astype("float32") * s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_mlp_matches_unpacked(gemm, threads):
    """An MLP (MatMul, or Gemm with transB: x @ W.T) compiled with packed weights gives the
    unpacked build's outputs within 1e-5."""
    import tvm.relax.frontend.onnx as rx_onnx

    model = ref.mlp(batch=8, width=128, layers=3, gemm=gemm)
    mod, params = relax.frontend.detach_params(rx_onnx.from_onnx(model, keep_params_in_input=True))
    weights = [p.numpy() for p in params["main"]]
    x = np.random.default_rng(2).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
                                                 ).astype("float32")
    plain = relax.VirtualMachine(compile_relax(mod, LLVM, threads=threads), tvm.cpu())["main"]
    compiled = compile_relax(mod, LLVM, threads=threads, prepack=True)
    assert sum(p.pack is not None for p in compiled.params()) == 3
    packed = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"]
    want = plain(tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    got = packed(tvm.runtime.tensor(x), *compiled.pack(weights)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_two_thread_streamed_mlp_uses_the_k_chunk_order_and_matches_numpy():
    """32 rows against 512 x 512 weights (1 MiB each, over a quarter of a 2 MiB L2), two threads:
    the scheduled kernel computes k-chunks outside the row tiles with prefetches (checked on the
    TIR before codegen), and the compiled stage with packed weights gives numpy's outputs."""
    import tvm.relax.frontend.onnx as rx_onnx
    from onnx import numpy_helper as onnx_numpy

    from cachefit.codegen.cpu_schedule import CPUSpec, target_vector_bits
    from cachefit.codegen.pipeline import cpu_passes, host_llvm_target

    model = ref.mlp(batch=32, width=512, layers=2)
    mod, params = relax.frontend.detach_params(rx_onnx.from_onnx(model, keep_params_in_input=True))
    weights = [p.numpy() for p in params["main"]]
    target = host_llvm_target(LLVM)
    if target_vector_bits(target) == 512:
        spec = CPUSpec(vector_bits=512, l2_bytes=2 * 1024 * 1024, threads=2)
        with target:
            lowered = tvm.transform.Sequential(cpu_passes(target, spec, prepack=True))(mod)
        gemms = [f for gv, f in lowered.functions.items()
                 if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("fused_matmul_packed")]
        assert gemms and all(len(_prefetch_loops(f)) == 1 for f in gemms)
        assert all(any(n.kind == tirx.ForKind.PARALLEL and int(n.extent) == 2 for n in _nodes(f.body, tirx.For))
                   for f in gemms)
    compiled = compile_relax(mod, LLVM, threads=2, prepack=True)
    x = np.random.default_rng(4).standard_normal((32, 512)).astype("float32")
    got = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](
        tvm.runtime.tensor(x), *compiled.pack(weights)).numpy()
    init = {i.name: onnx_numpy.to_array(i) for i in model.graph.initializer}
    h = x
    for i in range(2):
        h = np.maximum(h @ init[f"fc{i}.weight"] + init[f"fc{i}.bias"], 0)
    np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-4 * np.abs(h).max())


def test_panel_width_and_the_packed_gemm_form():
    """Panels are 4, 3, 2 or 1 vectors wide; GemmRule reads Bp[j // P, k, j % P] as an outer-product
    GEMM on packed panels (nothing left to pack per call)."""
    assert panel_width(512, 16) == 64 and panel_width(48, 16) == 48 and panel_width(32, 16) == 32
    assert panel_width(16, 16) == 16 and panel_width(40, 16) is None
    func = packed_matmul_func([2, 8, 32], 128, 64, "float32", "float32")
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul_packed")
    form = gemm_form(sch, block)
    assert form is not None and form.kind == "nn" and form.packed == 64 and form.b_buffers == []
    assert form.m == 16  # the batch axis folds into the rows: the weight does not read it
    pack = matmul_pack_func(32, 128, 64, "float32", transposed=False)
    assert bool(pack.attrs["cachefit.weight_pack"])


def _nodes(root, kind) -> list:
    found: list = []
    tvm_ffi.structural_walk(root, (kind, found.append), order="pre")
    return found


def _prefetch_loops(func: tirx.PrimFunc) -> list:
    """The loops whose body starts with ``llvm.prefetch`` calls, outermost first."""
    found = []

    def visit(node):
        if isinstance(node, tirx.For) and isinstance(node.body, tirx.SeqStmt):
            first = node.body[0]
            if isinstance(first, tirx.Evaluate) and "llvm.prefetch" in str(first):
                found.append(node)

    tvm_ffi.structural_walk(func.body, visit, order="post")
    return found


@pytest.mark.parametrize("m, threads", [(8, 1), (32, 2)])
def test_streamed_packed_weight_is_prefetched_and_correct(m, threads):
    """A packed weight larger than a quarter of L2 (256 KiB here, a 256 KiB L2) gets software
    prefetches (not a smaller weight, not when a tuning record says ``"prefetch": false``); a panel
    (64 KiB) over a quarter of L2 gets them only in the k-chunk order of several threads, which
    fetches one chunk ahead instead of a whole panel; results match numpy either way."""
    from cachefit.codegen.cpu_schedule import CPUSpec, GemmRule, target_vector_bits, workload_key
    from cachefit.codegen.pipeline import host_llvm_target

    target = host_llvm_target(LLVM)
    k, n = 256, 256
    rng = np.random.default_rng(3)
    a = rng.standard_normal((m, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    lanes = target_vector_bits(target) // 32
    panel = panel_width(n, lanes)
    func = packed_matmul_func([m, k], n, panel, "float32", "float32")
    packed = w.reshape(k, n // panel, panel).transpose(1, 0, 2).copy()
    cases = [(256 * 1024, None, True), (64 * 1024 * 1024, None, False),
             (256 * 1024, {workload_key(func): {"prefetch": False}}, False), (128 * 1024, None, threads > 1)]
    for l2, records, prefetched in cases:
        spec = CPUSpec(vector_bits=target_vector_bits(target), l2_bytes=l2, threads=threads)
        sch = GemmRule(spec, records).apply(func, target, False)
        assert sch is not None
        assert ("llvm.prefetch" in str(sch.mod["main"])) == prefetched
        lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target)
        out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), out)
        np.testing.assert_allclose(out.numpy(), a @ w, rtol=1e-5, atol=1e-4)


def _loop_path(root, target) -> list:
    """The ``For`` loops from ``root`` down to ``target`` (included), outermost first."""
    path: list = []

    def down(node, trail):
        if node.same_as(target):
            path.extend(trail + [node])
            return True
        if isinstance(node, tirx.For):
            trail = trail + [node]
        children = []
        if isinstance(node, tirx.SeqStmt):
            children = list(node)
        elif hasattr(node, "body"):
            children = [node.body]
        elif hasattr(node, "block"):
            children = [node.block]
        return any(down(child, trail) for child in children if isinstance(child, tirx.Stmt))

    down(root, [])
    return path


def _flat_prefetch_index(body, shape) -> tirx.PrimExpr:
    """The element (in memory order of the panels ``shape``) the first prefetch reads."""
    load = _nodes(body, tvm.ir.TensorLoad)[0]
    _, kk, p = shape
    panel, k, col = load.indices
    return (panel * kk + k) * p + col


@pytest.mark.parametrize("korder", [True, False])
def test_parallel_prefetch_stays_out_of_the_fma_loop_and_inside_the_thread_share(korder):
    """With two threads the panels are split in two contiguous shares (a parallel loop of 2
    iterations) and the prefetches sit in a loop that holds the FMA loop, never in it (in the FMA
    loop they kept LLVM from holding the accumulators in registers: the weight pointers of a
    parallel closure are not ``noalias``). Default (k-chunks outside the row tiles): every
    (chunk, row tile) iteration fetches its slice of the chunk one ahead along the thread's share,
    clamped to its end. With a record ``"korder": false, "prefetch": true`` every pass over a panel
    fetches its slice of the next panel of its own share (the last one of a share re-fetches itself, never the other
    thread's). Results match numpy either way."""
    from cachefit.codegen.cpu_schedule import CPUSpec, GemmRule, target_vector_bits, workload_key
    from cachefit.codegen.pipeline import host_llvm_target

    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    m, k, n = 32, 256, 512  # 8 panels of 64 columns, 4 per thread; 8 row tiles of 4 rows
    func = packed_matmul_func([m, k], n, 64, "float32", "float32")
    spec = CPUSpec(vector_bits=target_vector_bits(target), l2_bytes=256 * 1024, threads=2)
    records = None if korder else {workload_key(func): {"korder": False, "prefetch": True}}
    body = GemmRule(spec, records).apply(func, target, False).mod["main"]
    par = [node for node in _nodes(body.body, tirx.For) if node.kind == tirx.ForKind.PARALLEL]
    assert len(par) == 1 and int(par[0].extent) == 2
    loops = _prefetch_loops(body)
    assert len(loops) == 1
    path = _loop_path(body.body, loops[0])
    assert path[0].same_as(par[0])
    share = path[1]
    assert int(share.extent) == 4  # column tiles (= panels) per thread
    fma_loops = [lp for lp in _nodes(loops[0].body, tirx.For) if "matmul_packed_update" in str(lp.body)]
    assert fma_loops and not any("llvm.prefetch" in str(lp.body) for lp in fma_loops)
    flat = _flat_prefetch_index(loops[0].body[0], (8, k, 64))
    panel_elems = k * 64
    if korder:
        chunk_loop, row_loop = path[2], path[3]
        kc = k // int(chunk_loop.extent)
        assert row_loop.same_as(loops[0]) and int(row_loop.extent) == 8 and 1 < kc < k
        for t in range(2):
            for jo in range(4):
                for ko in range(k // kc):
                    for io in range(8):
                        ana = tvm.sym.Analyzer()
                        for var, val in ((par[0], t), (share, jo), (chunk_loop, ko), (row_loop, io)):
                            ana.bind(var.loop_var, tirx.const(val, str(var.loop_var.ty)))
                        want = min((jo * k + (ko + 1) * kc) * 64 + io * kc * 64 // 8, 4 * panel_elems - 1)
                        assert int(ana.simplify(flat)) == t * 4 * panel_elems + want
    else:
        panel_expr = _nodes(loops[0].body[0], tvm.ir.TensorLoad)[0].indices[0]
        for t in range(2):
            for jo in range(4):
                ana = tvm.sym.Analyzer()
                ana.bind(par[0].loop_var, tirx.const(t, str(par[0].loop_var.ty)))
                ana.bind(share.loop_var, tirx.const(jo, str(share.loop_var.ty)))
                assert int(ana.simplify(panel_expr)) == t * 4 + min(jo + 1, 3)
    if target_vector_bits(host_llvm_target(LLVM)) < 512:
        return  # the schedule above is for AVX-512; this host cannot run it
    rng = np.random.default_rng(5)
    a = rng.standard_normal((m, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": body.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w.reshape(k, 8, 64).transpose(1, 0, 2).copy()), out)
    np.testing.assert_allclose(out.numpy(), a @ w, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Packs of several weights (batch norm folded into a convolution)
# ---------------------------------------------------------------------------------------------

EPS = 1e-5


def _bn_fold_module(const_arg: bool = False) -> tvm.IRModule:
    """main(x, w, beta, gamma, mean, var) = conv2d(x, fold_w(w, gamma, var)) + fold_b(beta, gamma,
    mean, var): the batch-norm fold of cpu_legalize as two marked packs of several weights; with
    ``const_arg`` the weight fold reads a constant in place of ``var``."""
    from cachefit.codegen.cpu_legalize import bn_fold_bias_func, bn_fold_weight_func

    bb = relax.BlockBuilder()
    fw = bb.add_func(bn_fold_weight_func([8, 4, 3, 3], EPS, True), "fold_w")
    fb = bb.add_func(bn_fold_bias_func(8, EPS, True, True, False), "fold_b")
    f32 = "float32"
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), f32))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), f32))
    vecs = [relax.Var(n, relax.TensorType((8,), f32)) for n in ("beta", "gamma", "mean", "var")]
    beta, gamma, mean, var = vecs
    with bb.function("main", [x, w, *vecs], {"num_input": 1}):
        with bb.dataflow():
            v = relax.const(np.full(8, 0.5, f32)) if const_arg else var
            wf = bb.emit(relax.call_tir(fw, [w, gamma, v], relax.TensorType((8, 4, 3, 3), f32)))
            shift = bb.emit(relax.call_tir(fb, [beta, gamma, mean, var], relax.TensorType((1, 8, 1, 1), f32)))
            y = bb.emit(relax.op.add(relax.op.nn.conv2d(x, wf, padding=[1, 1, 1, 1]), shift))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _bn_weights(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4, 3, 3)).astype("float32")
    beta, mean = (rng.standard_normal(8).astype("float32") for _ in range(2))
    gamma, var = (rng.uniform(0.5, 1.5, 8).astype("float32") for _ in range(2))
    return w, beta, gamma, mean, var


def test_pack_of_several_weights_is_lifted_with_all_its_sources():
    """A marked pack whose arguments are all weights is lifted like a pack of one: main takes its
    output in place of its first argument; the weights read only by lifted packs leave main; the
    layout attribute and packed_params list every source, in argument order."""
    lifted = LiftWeightPacks()(_legalized(_bn_fold_module()))
    main = lifted["main"]
    assert [p.name for p in main.params] == ["x", "w_packed", "beta_packed"]
    assert not {"fold_w", "fold_b"} & set(_call_tir_names(main))
    assert packed_params(lifted) == [
        PackedParam(0, "fold_w", (8, 4, 3, 3), "float32", (0, 2, 4)),
        PackedParam(1, "fold_b", (1, 8, 1, 1), "float32", (1, 2, 3, 4)),
    ]
    # a pack of one weight keeps its single source
    assert PackedParam(3, "p", (1,), "float32").sources == (3,)
    transform = lifted["main" + TRANSFORM_SUFFIX]
    assert [p.name for p in transform.params] == ["w", "beta", "gamma", "mean", "var"]


def test_pack_with_a_constant_argument_is_not_lifted():
    """Every argument of a lifted pack must be a weight: a fold that also reads a constant stays in
    main (which keeps the weights it reads); the pack of weights only next to it is lifted."""
    lifted = LiftWeightPacks()(_legalized(_bn_fold_module(const_arg=True)))
    main = lifted["main"]
    assert "fold_w" in _call_tir_names(main) and "fold_b" not in _call_tir_names(main)
    assert [p.name for p in main.params] == ["x", "w", "beta_packed", "gamma"]
    assert [(p.source, p.pack, p.sources) for p in packed_params(lifted)] == [
        (0, None, (0,)), (1, "fold_b", (1, 2, 3, 4)), (2, None, (2,))]


def test_stored_bn_fold_equals_numpy_folding_and_outputs_agree():
    """compile_relax(prepack=True).pack computes the folded weight ``w * gamma / sqrt(var + eps)``
    and shift ``beta - mean * scale`` as numpy does, and main on them gives the output of the
    module whose folds run on every call."""
    mod = _bn_fold_module()
    w, beta, gamma, mean, var = _bn_weights()
    compiled = compile_relax(mod, LLVM, threads=1, prepack=True)
    packed = compiled.pack([w, beta, gamma, mean, var])
    scale = gamma / np.sqrt(var + np.float32(EPS))
    np.testing.assert_allclose(packed[0].numpy(), w * scale[:, None, None, None], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(packed[1].numpy(), (beta - mean * scale).reshape(1, 8, 1, 1), rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype("float32")
    got = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x), *packed).numpy()
    plain = relax.VirtualMachine(compile_relax(mod, LLVM, threads=1), tvm.cpu())["main"]
    want = plain(*[tvm.runtime.tensor(a) for a in (x, w, beta, gamma, mean, var)]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.1


def _scalar_weight_module() -> tvm.IRModule:
    """main(x, w, s) = (x @ w) * s: a matmul weight (packed into panels) and a 0-d weight."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 16), "float32"))
    s = relax.Var("s", relax.TensorType((), "float32"))
    with bb.function("main", [x, w, s], {"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.multiply(relax.op.matmul(x, w), s))
        bb.emit_func_output(out)
    return bb.get()


def test_scalar_weight_keeps_its_rank_through_pack():
    """pack() hands a 0-d weight over as a 0-d tensor (``np.ascontiguousarray`` would make it
    ``(1,)``, which the compiled function rejects) and a non-contiguous weight by value; main on
    the packed weights computes ``(x @ w) * s``."""
    compiled = compile_relax(_scalar_weight_module(), LLVM, threads=1, prepack=True)
    assert [(p.pack is None, p.shape) for p in compiled.params()] == [(False, (1, 16, 16)), (True, ())]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16)).astype("float32")
    w = np.asfortranarray(rng.standard_normal((16, 16)).astype("float32"))
    s = np.array(1.5, dtype="float32")
    packed = compiled.pack([w, s])
    assert [tuple(t.shape) for t in packed] == [(1, 16, 16), ()]
    got = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x), *packed).numpy()
    np.testing.assert_allclose(got, (x @ w) * s, rtol=1e-5, atol=1e-5)


def test_pack_refuses_weights_the_module_was_not_compiled_for():
    """A weight of another shape than the one main takes it with, or a missing weight, is a
    ShapeError naming the function and the numbers, not a VM error at call time."""
    from cachefit.errors import ShapeError

    compiled = compile_relax(_scalar_weight_module(), LLVM, threads=1, prepack=True)
    w = np.zeros((16, 16), "float32")
    with pytest.raises(ShapeError, match=r"main: weight #1 .* is \(1,\) float32, the compiled function takes \(\)"):
        compiled.pack([w, np.zeros(1, "float32")])
    with pytest.raises(ShapeError, match="main: 1 weights given, the module was compiled for 2"):
        compiled.pack([w])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert_dynamo.onnx", "gpt2_dynamo.onnx"])
def test_whole_exported_transformer_compiles_with_prepack(name):
    """An exported transformer's whole layered module (not split by prepare_stage; its scalar
    weights such as the attention scale included) compiled with prepack=True and run on
    ``pack(original weights)`` matches onnxruntime within 1e-5 of the output's scale."""
    from pathlib import Path

    from cachefit.analysis import analyze_onnx
    from cachefit.codegen import compile_stage
    from cachefit.compiler import reference_outputs

    path = Path(__file__).parent / "data" / name
    analysis = analyze_onnx(path)
    mod = relax.transform.InlinePrivateFunctions()(analysis.mod)
    main = mod["main"]
    n_in = int(main.attrs["num_input"])
    compiled = compile_stage(mod, "llvm", prepack=True)
    layout = compiled.params()
    assert any(p.pack for p in layout) and any(p.pack is None and p.shape == () for p in layout)
    packed = compiled.pack([analysis.params[p.name] for p in main.params[n_in:]])
    rng = np.random.default_rng(0)
    inputs = {p.name: rng.integers(0, 50, [int(d) for d in p.ty.shape]).astype(str(p.ty.dtype))
              for p in main.params[:n_in]}
    res = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](
        *[tvm.runtime.tensor(a) for a in inputs.values()], *packed)
    got = [res.numpy()] if isinstance(res, tvm.runtime.Tensor) else [r.numpy() for r in res]
    want = list(reference_outputs(path, inputs).values())
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        err = float(np.abs(g.astype("float64") - r).max() / np.abs(r).max())
        assert err <= 1e-5, f"{name}: error {err:.2e} vs onnxruntime"
