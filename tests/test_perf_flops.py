"""FLOPs and bytes counted on Relax functions, against hand counts."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from cachefit.perf.analytic import transformer_records  # noqa: E402
from cachefit.perf.flops import count_function  # noqa: E402


@I.ir_module
class OneMatmul:
    @R.function
    def main(x: R.Tensor((8, 256), "float32"), w: R.Tensor((256, 128), "float32")) -> R.Tensor((8, 128), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.relu(y)
            r = R.reshape(z, R.shape([4, 256]))
            R.output(r)
        return r


def test_single_matmul():
    """matmul 8x256x128: 2*8*128*256 = 524,288 FLOPs; reads 8,192 + 131,072 bytes, writes 4,096.
    relu: 1,024 FLOPs, reads and writes 4,096 bytes. reshape is a view: nothing."""
    c = count_function(OneMatmul["main"], OneMatmul)
    assert c.flops == 524_288 + 1_024
    assert c.bytes_moved == (8_192 + 131_072 + 4_096) + 2 * 4_096
    assert c.weight_bytes_read == 131_072
    assert c.unknown_ops == ()


@I.ir_module
class Layered:
    @R.function(private=True)
    def layer_0(x: R.Tensor((2, 3, 16, 16), "float16"), w: R.Tensor((8, 3, 3, 3), "float16")) -> R.Tensor((2, 8, 14, 14), "float16"):
        R.func_attr({"cachefit.layer": 0})
        with R.dataflow():
            y = R.nn.conv2d(x, w)
            R.output(y)
        return y

    @R.function(private=True)
    def layer_1(y: R.Tensor((2, 8, 14, 14), "float16")) -> R.Tensor((2, 8), "float16"):
        R.func_attr({"cachefit.layer": 1})
        with R.dataflow():
            s = R.sum(y, axis=[2, 3])
            t = R.nn.softmax(s)
            R.output(t)
        return t

    @R.function
    def main(x: R.Tensor((2, 3, 16, 16), "float16"), w: R.Tensor((8, 3, 3, 3), "float16")) -> R.Tensor((2, 8), "float16"):
        R.func_attr({"num_input": 1})
        cls = Layered
        with R.dataflow():
            a = cls.layer_0(x, w)
            b = cls.layer_1(a)
            R.output(b)
        return b


def test_conv_reduction_softmax_through_layer_calls():
    """conv2d 3->8, 3x3, no padding, 16x16 -> 14x14: 2 * (2*8*14*14) * (3*3*3) = 169,344 FLOPs;
    sum over 2*8*14*14 = 3,136 inputs; softmax 5 x 16. Bytes (fp16): conv reads 3,072 + 432, writes
    6,272; sum reads 6,272, writes 32; softmax reads and writes 32."""
    c = count_function(Layered["main"], Layered)
    assert c.flops == 169_344 + 3_136 + 80
    assert c.bytes_moved == (3_072 + 432 + 6_272) + (6_272 + 32) + (32 + 32)
    assert c.weight_bytes_read == 432
    layer0 = count_function(Layered["layer_0"], Layered, num_input=1)
    assert layer0.flops == 169_344 and layer0.weight_bytes_read == 432


@pytest.mark.parametrize("preset", ["dense-tiny", "moe-tiny"])
def test_ir_counts_agree_with_the_hand_model(preset):
    """The imported reference transformer and the analytic op-by-op count agree on FLOPs within 1%
    and on weight bytes exactly (up to the importer's scalar constants); the IR's unfused traffic is
    higher (GELU is five element-wise ops there, one in the hand model) but within 1.5x."""
    from cachefit.frontends.onnx import import_onnx
    from cachefit.models import build
    from cachefit.models.presets import resolve

    imported = import_onnx(build(preset, layers=1))
    c = count_function(imported.mod["main"], imported.mod)
    rec = transformer_records(resolve(preset, layers=1), sparse_moe=False)[0]
    assert c.flops == pytest.approx(rec.flops, rel=0.01)
    assert 0 <= c.weight_bytes_read - rec.weight_bytes <= 64
    assert rec.bytes_moved <= c.bytes_moved <= 1.5 * rec.bytes_moved



# ---------------------------------------------------------------------------------------------
# Convolutions that cachefit's CPU codegen runs as Winograd (cachefit.codegen.cpu_conv)
# ---------------------------------------------------------------------------------------------


def _conv_func(ci, co, hw, k=3, stride=1, pad=1, dilation=1, dtype="float32", relu=False):
    """``main(x[1, ci, hw, hw], w[co, ci, k, k])``: one conv2d (and a relu)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, ci, hw, hw], dtype))
    w = relax.Var("w", relax.TensorType([co, ci, k, k], dtype))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad, dilation=dilation))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()["main"]


# (ci, co, size, conv options) -> (FLOPs on a CPU target, direct FLOPs)
WINOGRAD_CASES = {
    # 56x56: F(4x4), alpha^2 = 36 GEMMs over 14 x 14 tiles: 2 * 36 * 196 * 64 * 64
    "f4x4_64ch_56": ((64, 64, 56, {}), 2 * 36 * 196 * 64 * 64, 2 * 64 * 56 * 56 * 64 * 9),
    # 14x14 (< 16): F(2x2), 16 GEMMs over 7 x 7 tiles
    "f2x2_32ch_14": ((32, 32, 14, {}), 2 * 16 * 49 * 32 * 32, 2 * 32 * 14 * 14 * 32 * 9),
    # 13x13: F(2x2) on 7 x 7 tiles (the output rounded up to 14 x 14)
    "f2x2_32ch_13": ((32, 32, 13, {}), 2 * 16 * 49 * 32 * 32, 2 * 32 * 13 * 13 * 32 * 9),
    # not eligible: direct on every target
    "stride2": ((64, 64, 56, {"stride": 2}), None, 2 * 64 * 28 * 28 * 64 * 9),
    "dilation2": ((64, 64, 56, {"dilation": 2, "pad": 2}), None, 2 * 64 * 56 * 56 * 64 * 9),
    "1x1": ((64, 64, 56, {"k": 1, "pad": 0}), None, 2 * 64 * 56 * 56 * 64),
    "7x7_output": ((64, 64, 7, {}), None, 2 * 64 * 7 * 7 * 64 * 9),
    "one_block_f2x2": ((16, 32, 14, {}), None, 2 * 32 * 14 * 14 * 16 * 9),   # F(4x4) only with one block
    "rgb_stem": ((3, 64, 56, {}), None, 2 * 64 * 56 * 56 * 3 * 9),
    "float16": ((64, 64, 56, {"dtype": "float16"}), None, 2 * 64 * 56 * 56 * 64 * 9),
}


@pytest.mark.parametrize("case", sorted(WINOGRAD_CASES))
def test_winograd_convs_count_their_gemms_on_cpu_only(case):
    """On an llvm target a 3x3 stride-1 convolution that the CPU codegen runs as Winograd F(m x m,
    3x3) counts the multiplications of its alpha^2 GEMMs, 2 * alpha^2 * tiles * Cin * Cout (tiles:
    the output rounded up to m); CUDA, no target, and every ineligible convolution (stride 2,
    dilation, 1x1, a 7x7 output, one input block with F(2x2), an RGB input, float16) count the
    direct 2 * prod(out) * Cin * k * k."""
    from cachefit.perf.flops import count_function

    (ci, co, hw, opts), cpu, direct = WINOGRAD_CASES[case]
    func = _conv_func(ci, co, hw, **opts)
    assert count_function(func, target="llvm").flops == (cpu if cpu is not None else direct)
    assert count_function(func, target=tvm.target.Target({"kind": "llvm"})).flops == (cpu or direct)
    assert count_function(func, target="cuda").flops == direct
    assert count_function(func).flops == direct
    # an AVX2 core (8 lanes) blocks by 8: 16 input channels are two blocks there
    if case == "one_block_f2x2":
        assert count_function(func, target="llvm", lanes=8).flops == 2 * 16 * 49 * 16 * 32
    # fewer than 8 lanes: no channel-blocked path, no Winograd
    assert count_function(func, target="llvm", lanes=4).flops == direct


def test_winograd_kernels_for_the_cpu_cost_model():
    """A Winograd convolution is three kernels on a CPU target: the input transform (alpha^2 *
    tiles * Cin elements), alpha^2 batched GEMMs [tiles, Cin] x [Cin, Cout], and the output
    transform (the output's elements, reading the GEMMs' alpha^2 * tiles * Cout as a fused pass)
    into which the relu fuses; on CUDA it is one implicit GEMM with the relu fused."""
    from cachefit.perf.costmodel import KernelSpec
    from cachefit.perf.flops import layer_kernels

    func = _conv_func(64, 64, 56, relu=True)
    out = 64 * 56 * 56
    assert layer_kernels(func, target="llvm") == (
        KernelSpec("elementwise", elements=36 * 196 * 64),
        KernelSpec("matmul", m=196, n=64, k=64, batch=36),
        KernelSpec("elementwise", elements=out, fused=(("elementwise", 36 * 196 * 64), ("elementwise", out))),
    )
    direct = (KernelSpec("matmul", m=56 * 56, n=64, k=64 * 9, batch=1, fused=(("elementwise", out),)),)
    assert layer_kernels(func, target="cuda") == direct
    assert layer_kernels(_conv_func(64, 64, 56, stride=2, relu=True), target="llvm")[0].k == 64 * 9


@I.ir_module
class ConvChain:
    @R.function
    def main(x: R.Tensor((1, 3, 32, 32), "float32"), w0: R.Tensor((16, 3, 3, 3), "float32"),
             w1: R.Tensor((32, 16, 3, 3), "float32"), w2: R.Tensor((32, 32, 3, 3), "float32"),
             w3: R.Tensor((32, 32, 3, 3), "float32"), w4: R.Tensor((64, 32, 1, 1), "float32"),
             w5: R.Tensor((64, 64, 3, 3), "float32"), w6: R.Tensor((64, 64, 3, 3), "float32"),
             w7: R.Tensor((64, 64, 3, 3), "float32")) -> R.Tensor((1, 64, 6, 6), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            a = R.nn.relu(R.nn.conv2d(x, w0, padding=[1, 1, 1, 1]))           # RGB stem: direct
            b = R.nn.relu(R.nn.conv2d(a, w1, padding=[1, 1, 1, 1]))           # 16 -> 32 @32: F(4x4)
            c = R.nn.conv2d(b, w2, strides=[2, 2], padding=[1, 1, 1, 1])      # stride 2: direct
            d = R.nn.conv2d(c, w3, padding=[1, 1, 1, 1])                      # 16x16: F(4x4)
            e = R.nn.conv2d(d, w4)                                            # 1x1: direct
            f = R.nn.conv2d(e, w5)                                            # 14x14: F(2x2)
            g = R.nn.conv2d(f, w6, dilation=[2, 2])                           # dilated: direct, 10x10
            h = R.nn.conv2d(g, w7, padding=[0, 0, 0, 0])                      # 8x8: F(2x2)
            i = R.nn.conv2d(h, w7)                                            # 6x6 (< 8): direct
            R.output(i)
        return i


def test_winograd_conv_agrees_with_the_layout_pass():
    """winograd_conv predicts, convolution by convolution, what cachefit's CPU layout pass
    (BlockConvLayout with Winograd, as compile runs it for a 16-lane CPU) emits: a
    ``cachefit_conv2d_winograd`` call with (m + 2)^2 transformed weight planes, or a direct kernel."""
    from tvm import relax

    from cachefit.codegen.cpu_conv import BlockConvLayout
    from cachefit.perf.flops import winograd_conv

    convs = []
    relax.analysis.post_order_visit(
        ConvChain["main"].body,
        lambda e: convs.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d"
        else None)
    predicted = [winograd_conv(c, "llvm", 16) for c in convs]
    assert predicted == [None, 4, None, 4, None, 2, None, 2, None]

    done = BlockConvLayout(16, winograd=True)(ConvChain)
    emitted = []
    for block in done["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.name == "relax.call_tir":
                callee = v.args[0].name_hint
                if callee.startswith("cachefit_conv2d_winograd"):
                    planes = int(v.args[1].fields[1].ty.shape[0])
                    emitted.append(int(round(planes ** 0.5)) - 2)
                elif callee.startswith("cachefit_conv2d_nchwc"):
                    emitted.append(None)
    assert emitted == predicted
