"""The NCHWc convolution path (cachefit.codegen.cpu_conv): layout pass, weight packs, kernel rule.

Numeric tests compile ONNX graphs with ``compile_relax`` and compare with onnxruntime (relative
error 1e-4 of the output's largest magnitude); structural tests check that the blocked path really
took the convolutions (and left the cases it does not cover to the NCHW path).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper
from tvm import relax, tirx
import tvm.relax.frontend.onnx as rx_onnx

from cachefit.codegen import cpu_refmodels as ref
from cachefit.codegen.cpu_conv import WEIGHT_PACK_ATTR, BlockConvLayout, choose_tile, flat_conv_ok
from cachefit.codegen.cpu_schedule import CPUSpec
from cachefit.codegen.pipeline import compile_relax, cpu_passes, host_llvm_target

RTOL = 1e-4
LLVM = tvm.target.Target({"kind": "llvm"})


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _import(model):
    mod = rx_onnx.from_onnx(model, keep_params_in_input=True)
    return relax.frontend.detach_params(mod)


def _run_both(model: onnx.ModelProto, threads: int = 1, prepack: bool = False):
    """(cachefit output, onnxruntime output) on one random input."""
    mod, params = _import(model)
    weights = [p.numpy() for p in params.get("main", [])]
    compiled = compile_relax(mod, LLVM, threads=threads, prepack=prepack)
    if prepack:
        ex, args_w = compiled.executable, compiled.pack(weights)
    else:
        ex, args_w = compiled, [tvm.runtime.tensor(w) for w in weights]
    vm = relax.VirtualMachine(ex, tvm.cpu())
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x), *args_w)
    out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return out, sess.run(None, {inp.name: x})[0]


class _Graph:
    """A small ONNX graph builder: convolutions with random weights, batch norm, pooling."""

    def __init__(self, cin: int, size: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = [1, cin, size, size]
        self.x = "x"
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)]
        self.n = 0

    def _name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def _init(self, arr):
        name = self._name("w")
        self.inits.append(helper.make_tensor(name, TensorProto.FLOAT, list(arr.shape), arr.astype(np.float32).ravel()))
        return name

    def conv(self, cout, k, stride=1, pad=0, bias=True, src=None):
        src = src or self.x
        cin = self.shape[1]
        w = self._init(self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k))
        ins = [src, w] + ([self._init(self.rng.standard_normal(cout) * 0.1)] if bias else [])
        out = self._name("c")
        self.nodes.append(helper.make_node("Conv", ins, [out], strides=[stride, stride], pads=[pad] * 4,
                                           kernel_shape=[k, k]))
        size = (self.shape[2] + 2 * pad - k) // stride + 1
        self.shape = [1, cout, size, size]
        self.x = out
        return out

    def bn(self):
        c = self.shape[1]
        names = [self._init(self.rng.uniform(0.5, 1.5, c)), self._init(self.rng.standard_normal(c) * 0.1),
                 self._init(self.rng.standard_normal(c) * 0.1), self._init(self.rng.uniform(0.5, 1.5, c))]
        out = self._name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [self.x] + names, [out], epsilon=1e-5))
        self.x = out
        return out

    def op(self, kind, *ins, **attrs):
        out = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, list(ins) or [self.x], [out], **attrs))
        self.x = out
        return out

    def model(self, out_shape=None):
        graph = helper.make_graph(
            self.nodes, "g", self.inputs,
            [helper.make_tensor_value_info(self.x, TensorProto.FLOAT, out_shape or self.shape)],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 9
        return model


def _conv_chain(cin, cout, size, kernel, stride, pad, seed=0, mid=None):
    """conv(3x3, cin -> mid) + relu, then the convolution under test + relu: a chain of two."""
    g = _Graph(cin, size, seed)
    g.conv(mid or 32, 3, 1, 1)
    g.op("Relu")
    g.conv(cout, kernel, stride, pad)
    g.op("Relu")
    return g.model()


def _blocked_calls(model, threads=1, prepack=False):
    """Names of the call_tir targets in ``main`` after the CPU pipeline's passes (up to scheduled
    TIR), and the module."""
    mod, _ = _import(model)
    target = host_llvm_target(LLVM)
    with target:
        low = tvm.transform.Sequential(cpu_passes(target, CPUSpec.for_target(target, threads), prepack=prepack))(mod)
    return _main_call_names(low), low


def test_choose_tile_fits_registers_and_the_problem():
    """A tile has at most 16 accumulators (1 KiB: on the stack, in registers), its channel vectors
    divide the channel blocks, and the computed width covers the output in whole tiles."""
    for ow in list(range(1, 120)) + [224]:
        for cob in (1, 2, 3, 4, 8, 62, 128):
            owt, ocr, owp = choose_tile(ow, cob)
            assert owt * ocr <= 16 and cob % ocr == 0
            assert owp >= ow and owp % owt == 0 and owp - ow < owt
    assert choose_tile(56, 8) == (4, 4, 56)


@pytest.mark.parametrize(
    "cin,cout,size,kernel,stride,pad",
    [
        (16, 32, 14, 1, 1, 0),     # 1x1
        (32, 48, 13, 3, 1, 1),     # 3x3, odd width (a padded tile)
        (16, 32, 12, 5, 1, 2),     # 5x5
        (32, 16, 15, 7, 2, 3),     # 7x7, stride 2
        (32, 64, 14, 3, 2, 1),     # 3x3 stride 2
        (16, 32, 14, 1, 2, 0),     # 1x1 stride 2 (a ResNet shortcut)
        (3, 32, 23, 3, 2, 0),      # an RGB stem (cb = 1 input blocks), no padding, width 11
        (256, 32, 14, 1, 1, 0),    # many input channels: reduction in L1-sized chunks
    ],
)
def test_blocked_conv_chain_matches_onnxruntime(cin, cout, size, kernel, stride, pad):
    """Two chained convolutions (+ bias + relu) on the NCHWc path agree with onnxruntime."""
    model = _conv_chain(cin, cout, size, kernel, stride, pad, mid=cin if cin >= 64 else 32)
    names, _ = _blocked_calls(model)
    assert sum("conv2d_nchwc" in n for n in names) == 2
    got, want = _run_both(model)
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL


def test_flat_conv_only_where_flattened_pixels_waste_less():
    """A 1x1 stride-1 unpadded convolution runs over flattened pixels when the register tile
    does not divide its width and the flattened row wastes less (13x13: 15 columns of 5 per row,
    195 computed, against 170 flat); never for a width the tile divides, a 3x3, a stride or a
    single row."""
    assert choose_tile(13, 63)[2] == 15 and choose_tile(169, 63)[2] < 13 * 15
    assert flat_conv_ok(1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 13, 13, 63)
    assert flat_conv_ok(1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 13, 13, 4)
    assert not flat_conv_ok(1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 14, 14, 4)    # 14 = 7 x 2: no waste
    assert not flat_conv_ok(3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 13, 13, 4)
    assert not flat_conv_ok(1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 13, 13, 4)
    assert not flat_conv_ok(1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 13, 4)


@pytest.mark.parametrize("cin,cout,threads", [(64, 1000, 1), (64, 1000, 2), (48, 48, 2), (64, 16, 1)])
def test_flat_1x1_conv_matches_onnxruntime(cin, cout, threads):
    """A 1x1 convolution at 13x13 (SqueezeNet's conv10, its squeeze layers: many, few or one
    channel slab) computed over flattened pixels, bias + relu on the flattened tile, agrees with
    onnxruntime; the flat kernel is the one scheduled."""
    model = _conv_chain(cin, cout, 13, 1, 1, 0, mid=cin)
    _, low = _blocked_calls(model, threads=threads, prepack=True)
    scripts = [f.script() for _, f in low.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # the flat kernel reads pixel p at row p // 13 (the row kernel reads rows and columns)
    assert any("cachefit_nchwc_conv" in sc and "// T.int64(13)" in sc for sc in scripts) is (cout > 16)
    got, want = _run_both(model, threads=threads, prepack=True)
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL


def test_residual_batchnorm_relu_pooling_chain_matches_onnxruntime():
    """A ResNet-like block (conv + BN + relu, conv + BN, a 1x1 projection shortcut, residual add,
    relu), max pooling, a concatenation of two branches, global average pooling, then Flatten and
    Gemm (back to NCHW) agree with onnxruntime, with the blocked layout kept between them."""
    g = _Graph(16, 16, seed=3)
    g.conv(32, 3, 1, 1, bias=False)
    g.bn()
    stem = g.op("Relu")
    g.conv(32, 3, 1, 1, bias=False, src=stem)
    g.bn()
    a = g.op("Relu")
    g.shape = [1, 32, 16, 16]
    g.conv(64, 3, 1, 1, bias=False, src=a)
    b = g.bn()
    g.shape = [1, 32, 16, 16]
    g.conv(64, 1, 1, 0, bias=False, src=stem)
    s = g.bn()
    g.op("Add", b, s)
    y = g.op("Relu")
    g.op("MaxPool", y, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    p = g.x
    g.shape = [1, 64, 8, 8]
    g.conv(32, 1, src=p)
    c1 = g.op("Relu")
    g.shape = [1, 64, 8, 8]
    g.conv(32, 3, 1, 1, src=p)
    c2 = g.op("Relu")
    g.op("Concat", c1, c2, axis=1)
    g.op("AveragePool", kernel_shape=[2, 2], strides=[2, 2])
    g.op("GlobalAveragePool")
    g.op("Flatten")
    w = g._init(g.rng.standard_normal((10, 64)) * 0.1)
    bias = g._init(g.rng.standard_normal(10))
    g.op("Gemm", g.x, w, bias, transB=1)
    model = g.model([1, 10])
    names, low = _blocked_calls(model)
    assert sum("conv2d_nchwc" in n for n in names) == 6
    # one transform into the blocked layout is fused into the first conv; one out, before Flatten
    assert not any("conv2d_direct" in n or "conv2d_im2col" in n for n in names)
    for threads in (1, 2):
        got, want = _run_both(model, threads=threads)
        assert _rel_err(got, want) < RTOL


def test_weight_pack_is_a_marked_call_of_one_parameter():
    """Each blocked convolution's weight is re-laid out by a separate call_tir of one parameter,
    whose PrimFunc carries ``cachefit.weight_pack`` (the compile-time pre-packing contract)."""
    mod, _ = _import(_conv_chain(16, 32, 10, 3, 1, 1))
    out = BlockConvLayout(16)(mod)
    call_tir = tvm.ir.Op.get("relax.call_tir")
    params = set(out["main"].params)
    packs = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            func = out[e.args[0]]
            if func.attrs is not None and WEIGHT_PACK_ATTR in func.attrs:
                packs.append(list(e.args[1].fields))

    relax.analysis.post_order_visit(out["main"].body, visit)
    assert len(packs) == 2
    assert all(len(args) == 1 and args[0] in params for args in packs)
    # the pass is idempotent: nothing left to convert
    assert tvm_ffi.structural_equal(BlockConvLayout(16)(out), out)


def test_prepacked_weights_match_onnxruntime():
    """With ``prepack=True`` the packs run at compile time (the stage takes packed weights) and
    the output still agrees with onnxruntime."""
    model = _conv_chain(16, 32, 14, 3, 1, 1)
    mod, _ = _import(model)
    compiled = compile_relax(mod, LLVM, threads=1, prepack=True)
    assert compiled.params() is not None
    got, want = _run_both(model, prepack=True)
    assert _rel_err(got, want) < RTOL


def test_lone_or_grouped_convs_keep_the_nchw_path():
    """A single convolution (two layout transforms for one kernel) keeps the NCHW implicit-GEMM
    path; a depthwise convolution between blocked ones keeps TOPI's loop nest on an NCHW copy."""
    g = _Graph(16, 12)
    g.conv(32, 3, 1, 1)
    g.op("Relu")
    names, _ = _blocked_calls(g.model())
    assert not any("nchwc" in n for n in names)
    assert sum("conv2d_direct" in n for n in names) == 1
    g = _Graph(16, 12, seed=5)
    g.conv(32, 3, 1, 1)
    g.op("Relu")
    dw = g._init(g.rng.standard_normal((32, 1, 3, 3)) * 0.3)
    g.op("Conv", g.x, dw, group=32, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    g.conv(32, 1)
    g.conv(16, 3, 1, 1)
    g.op("Relu")
    model = g.model()
    names, _ = _blocked_calls(model)
    assert sum("conv2d_nchwc" in n for n in names) == 2      # the two after the depthwise one
    got, want = _run_both(model)
    assert _rel_err(got, want) < RTOL


def test_channels_not_a_multiple_of_the_block_are_padded():
    """Output channels that are not a multiple of the block (squeezenet's 1000 classes, here 40
    and 24) run blocked with zero-padded weights; batch norm, relu, pooling and the mean see the
    padding channels, the conversion back to NCHW drops them."""
    g = _Graph(16, 12, seed=7)
    g.conv(40, 3, 1, 1, bias=False)
    g.bn()
    g.op("Relu")
    g.conv(24, 3, 2, 1)
    g.op("Relu")
    g.op("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    g.op("GlobalAveragePool")
    g.shape = [1, 24, 1, 1]
    model = g.model()
    names, _ = _blocked_calls(model)
    assert sum("conv2d_nchwc" in n for n in names) == 2
    got, want = _run_both(model)
    assert _rel_err(got, want) < RTOL


def test_blocked_kernels_are_scheduled_with_a_register_tile():
    """The conv kernel's inner loops are vectorised (output-channel lanes) and unrolled (tile),
    and parallel when the stage owns two threads."""
    _, low = _blocked_calls(_conv_chain(16, 32, 14, 3, 1, 1), threads=2)
    convs = [f for g, f in low.functions_items() if "conv2d_nchwc" in g.name_hint and isinstance(f, tirx.PrimFunc)]
    assert convs
    for f in convs:
        kinds = set()
        tvm_ffi.structural_walk(f.body, (tirx.For, lambda s: kinds.add(s.kind)), order="post")
        assert {tirx.ForKind.VECTORIZED, tirx.ForKind.UNROLLED, tirx.ForKind.PARALLEL} <= kinds


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "resnet50"])
def test_light_zoo_cnn_blocked_matches_onnxruntime(name):
    """The light zoo's squeezenet / resnet50 (random weights) on the blocked path, packs at
    compile time, agree with onnxruntime."""
    model = ref.light_model(name, seed=0)
    names, _ = _blocked_calls(model)
    assert sum("conv2d_nchwc" in n for n in names) >= 20
    got, want = _run_both(model, prepack=True)
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL


def _front(model, prepack: bool):
    """``main`` after the CPU pipeline's front passes (with ``prepack``: packs lifted)."""
    from cachefit.codegen.pipeline import cpu_front_passes  # pylint: disable=import-outside-toplevel

    mod, _ = _import(model)
    target = host_llvm_target(LLVM)
    with target:
        return tvm.transform.Sequential(cpu_front_passes(target, CPUSpec.for_target(target, 1), prepack))(mod)


def _conv_bn_net():
    """conv(+bias) + BN + relu, conv + BN + relu, 1x1 conv + BN: a blocked chain."""
    g = _Graph(16, 12, seed=11)
    g.conv(32, 3, 1, 1, bias=True)
    g.bn()
    g.op("Relu")
    g.conv(48, 3, 1, 1, bias=False)
    g.bn()
    g.op("Relu")
    g.conv(40, 1, 1, 0, bias=False)
    g.bn()
    return g.model()


def _main_call_names(low) -> list:
    names = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(low["main"].body, visit)
    return names


def test_batchnorm_after_conv_is_folded_into_the_packed_weights():
    """With prepack, conv + BN (+ relu) takes the folded weight (one pack that folds the scale and
    re-lays out, from the weight, gamma and var) and a folded shift (from bias, beta, gamma, mean,
    var): the compiled stage runs no batch-norm math (no square root, no per-channel multiply), no
    BN parameter reaches it, and the output agrees with onnxruntime, packs lifted or not."""
    model = _conv_bn_net()
    low = _front(model, prepack=True)
    names = _main_call_names(low)
    # the 3x3 32 -> 48 convolution (two input blocks) runs as Winograd, its weight transformed
    # with the batch norm folded in by the same pack
    assert sum("conv2d_nchwc" in n for n in names) == 2 and sum("conv2d_winograd" in n for n in names) == 1
    assert not any("rsqrt" in n or "sqrt" in n or "multiply" in n or "bn_fold" in n or "pack" in n for n in names)
    from cachefit.codegen.prepack import packed_params  # pylint: disable=import-outside-toplevel

    params = packed_params(low)
    assert [len(p.sources) for p in params] == [3, 5, 3, 4, 3, 4]
    assert all(p.pack is not None for p in params)   # the BN parameters are no parameters of main
    assert "cachefit_pack_conv_weight" in params[0].pack and "bn_fold_bias" in params[1].pack
    assert "cachefit_pack_wino_weight" in params[2].pack
    for prepack in (False, True):
        got, want = _run_both(model, prepack=prepack)
        assert _rel_err(got, want) < RTOL


def test_batchnorm_after_a_lone_conv_is_folded_on_the_nchw_path():
    """A lone convolution (NCHW path) followed by BN takes the folded weight and shift too."""
    model = _lone_conv_bn_net()
    low = _front(model, prepack=True)
    names = _main_call_names(low)
    assert sum("conv2d_direct" in n for n in names) == 1
    assert not any("sqrt" in n or "multiply" in n or "bn_fold" in n for n in names)
    from cachefit.codegen.prepack import packed_params  # pylint: disable=import-outside-toplevel

    assert [(p.pack, len(p.sources)) for p in packed_params(low)] == [
        ("cachefit_bn_fold_weight", 3), ("cachefit_bn_fold_bias", 4)]
    got, want = _run_both(model, prepack=True)
    assert _rel_err(got, want) < RTOL


def _lone_conv_bn_net():
    """conv (no bias) + BN + relu alone: the NCHW path."""
    g = _Graph(16, 10, seed=12)
    g.conv(32, 3, 1, 1, bias=False)
    g.bn()
    g.op("Relu")
    return g.model()


@pytest.mark.parametrize("net,channels,conv", [(_conv_bn_net, [32, 48, 40], "conv2d_nchwc"),
                                               (_lone_conv_bn_net, [32], "conv2d_direct")])
def test_batchnorm_without_prepack_stays_a_per_channel_epilogue(net, channels, conv):
    """Without prepack a batch-norm fold into the weights would run on every call (a square root
    per weight element), so FoldBatchNormScale keeps the batch norm as ``x * scale + shift``:
    ``main`` calls no bn-fold kernel and the module holds none, the only square roots it runs are
    over one channel vector ([C]) per batch norm, the multiply-add is fused into each
    convolution's kernel, and the output agrees with onnxruntime. With prepack the fold is still
    there, lifted out of ``main`` to compile time."""
    from cachefit.codegen.cpu_legalize import BN_FOLD_ATTR  # pylint: disable=import-outside-toplevel
    from cachefit.codegen.prepack import packed_params  # pylint: disable=import-outside-toplevel

    model = net()
    mod, _ = _import(model)
    target = host_llvm_target(LLVM)
    with target:
        low = tvm.transform.Sequential(cpu_passes(target, CPUSpec.for_target(target, 1), prepack=False))(mod)
    calls = []
    call_tir = tvm.ir.Op.get("relax.call_tir")
    relax.analysis.post_order_visit(low["main"].body, lambda e: calls.append((e.args[0].name_hint, e.ty))
                                    if isinstance(e, relax.Call) and e.op.same_as(call_tir) else None)
    names = [n for n, _ in calls]
    assert not any("bn_fold" in n for n in names)
    assert not any(isinstance(f, tirx.PrimFunc) and f.attrs is not None and BN_FOLD_ATTR in f.attrs
                   for _, f in low.functions_items())
    assert [[int(d) for d in ty.shape] for n, ty in calls if "sqrt" in n] == [[c] for c in channels]
    assert sum(conv in n and "multiply" in n for n in names) == len(channels)
    got, want = _run_both(model, prepack=False)
    assert _rel_err(got, want) < RTOL

    lifted = _front(model, prepack=True)
    assert not any("bn_fold" in n or "sqrt" in n for n in _main_call_names(lifted))
    assert sum("bn_fold" in (p.pack or "") for p in packed_params(lifted)) >= len(channels)


# --- Winograd F(2x2, 3x3) (3x3 stride-1 convolutions, with prepack) -------------------------------


def _calls_after_front(model, prepack: bool, threads: int = 1):
    return _blocked_calls(model, threads, prepack)[0]


@pytest.mark.parametrize(
    "cin,cout,size,pad,threads",
    [
        (32, 32, 14, 1, 1),    # even output: 7x7 tiles of 2x2
        (48, 64, 13, 1, 1),    # odd output: one extra row / column computed and dropped
        (40, 24, 12, 0, 1),    # channels not a multiple of 16 (zero-padded), no padding (10x10 out)
        (32, 48, 16, 1, 2),    # F(4x4, 3x3) (a 16x16 output), two threads
        (32, 32, 20, 1, 1),    # F(4x4, 3x3), 5x5 tiles
        (16, 32, 27, 1, 1),    # F(4x4, 3x3) on one input block, 27x27 cropped from 28x28
    ],
)
def test_winograd_conv_matches_onnxruntime(cin, cout, size, pad, threads):
    """With prepack, a 3x3 stride-1 convolution in a blocked chain runs as Winograd F(2x2, 3x3)
    (its weight transformed at compile time) and agrees with onnxruntime; without prepack (the
    transform would run on every call) it keeps the direct kernel."""
    model = _conv_chain(cin, cout, size, 3, 1, pad, mid=cin)
    names = _calls_after_front(model, prepack=True, threads=threads)
    assert sum("conv2d_winograd" in n for n in names) == 2, names
    assert not any("pack_wino_weight" in n for n in names)  # lifted to compile time
    assert not any("conv2d_winograd" in n for n in _calls_after_front(model, prepack=False))
    got, want = _run_both(model, threads=threads, prepack=True)
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL


def test_winograd_with_batchnorm_residual_and_relu_epilogue():
    """conv + BN (folded into the transformed weight) + residual add + relu on the Winograd
    kernel's output transform agrees with onnxruntime at one and two threads."""
    g = _Graph(32, 14, seed=5)
    g.conv(32, 3, 1, 1, bias=False)
    g.bn()
    a = g.op("Relu")
    g.conv(32, 3, 1, 1, bias=False, src=a)
    b = g.bn()
    g.op("Add", b, a)
    g.op("Relu")
    model = g.model()
    names = _calls_after_front(model, prepack=True)
    assert sum("conv2d_winograd" in n for n in names) == 2, names
    for threads in (1, 2):
        got, want = _run_both(model, threads=threads, prepack=True)
        assert _rel_err(got, want) < RTOL


def test_winograd_only_for_3x3_stride_1_with_two_channel_blocks():
    """Stride 2, dilation, 1x1, a 7x7 output, or a single 16-channel input block keep the direct kernel."""
    from cachefit.codegen.cpu_conv import winograd_eligible, winograd_tile  # pylint: disable=import-outside-toplevel

    assert winograd_eligible(3, 3, (1, 1), (1, 1), 2, 16, 16, 14, 14)
    assert winograd_eligible(3, 3, (1, 1), (1, 1), 2, 16, 16, 13, 27)
    assert not winograd_eligible(3, 3, (2, 2), (1, 1), 2, 16, 16, 14, 14)
    assert not winograd_eligible(3, 3, (1, 1), (2, 2), 2, 16, 16, 14, 14)
    assert not winograd_eligible(1, 1, (1, 1), (1, 1), 2, 16, 16, 14, 14)
    assert not winograd_eligible(3, 3, (1, 1), (1, 1), 2, 16, 16, 7, 7)
    assert not winograd_eligible(3, 3, (1, 1), (1, 1), 1, 16, 16, 14, 14)  # one input block and F(2x2)
    assert winograd_eligible(3, 3, (1, 1), (1, 1), 1, 16, 16, 55, 55)      # one input block and F(4x4)
    assert not winograd_eligible(3, 3, (1, 1), (1, 1), 3, 1, 16, 56, 56)  # an RGB stem read as 1-channel blocks
    # F(4x4, 3x3) for sides of 16 or more that round up to multiples of 4 with at most 8 % more
    # outputs, F(2x2, 3x3) otherwise
    assert [winograd_tile(s, s) for s in (56, 55, 28, 27, 16, 14, 13, 12, 8)] == [4, 4, 4, 4, 4, 2, 2, 2, 2]
    assert winograd_tile(28, 14) == 2
    # and in a compiled chain: the stride-2 convolution stays direct, the stride-1 one goes Winograd
    model = _conv_chain(32, 32, 14, 3, 2, 1, mid=32)
    names = _calls_after_front(model, prepack=True)
    assert sum("conv2d_winograd" in n for n in names) == 1, names
    assert sum("conv2d_nchwc" in n for n in names) == 1, names


def test_winograd_kernel_is_register_tiled():
    """The rule schedules the Winograd kernel: its 16 GEMMs accumulate in a local tile with the
    tile loops unrolled and the channel vector vectorised; the transforms' 16 elements unrolled."""
    from cachefit.codegen.cpu_conv import NCHWcConvRule, conv2d_winograd_func  # pylint: disable=import-outside-toplevel

    target = host_llvm_target(LLVM)
    for m, size in ((2, 14), (4, 16)):
        func = conv2d_winograd_func(1, 4, 16, size, size, 4, 16, (1, 1, 1, 1), ocr=2, m=m)
        sch = NCHWcConvRule(CPUSpec.for_target(target, 1)).apply(func, target, False)
        assert sch is not None
        text = sch.mod.script()
        assert '"local"' in text
        assert "T.unroll" in text and "T.vectorized" in text
        assert f"T.unroll(T.int64({(m + 2) ** 2}))" in text  # the transform's tile elements
