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
