"""Hand-written layered Relax modules shared by several test files (import as ``relax_fixtures``:
``tests/conftest.py`` puts the tests folder on ``sys.path``)."""

from tvm.script import ir as I
from tvm.script import relax as R


@I.ir_module
class ConvLayer:
    """One layer ``relu(conv2d(x, w))``: x [1, 3, 8, 8], w [4, 3, 3, 3] OIHW (a weight of main),
    output [1, 4, 6, 6]; float32."""

    @R.function(private=True)
    def layer_0(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "conv"})
        with R.dataflow():
            gv = R.nn.relu(R.nn.conv2d(x, w))
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        R.func_attr({"num_input": 1})
        cls = ConvLayer
        with R.dataflow():
            gv = cls.layer_0(x, w)
            R.output(gv)
        return gv


@I.ir_module
class HeadsLeave:
    """One attention-like layer whose heads leave it: ``permute_dims(reshape(x @ wq))`` splits 2
    heads of 4 and returns the [B, H, S, D] tensor [1, 2, 4, 4] as the layer's output, so a head
    tracer cannot follow the head axis; x [1, 4, 8] (input), wq [8, 8] (a weight); float32."""

    @R.function(private=True)
    def layer_0(x: R.Tensor((1, 4, 8), "float32"), wq: R.Tensor((8, 8), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            q = R.matmul(x, wq)
            h = R.reshape(q, R.shape([1, 4, 2, 4]))
            gv = R.permute_dims(h, axes=[0, 2, 1, 3])
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((1, 4, 8), "float32"), wq: R.Tensor((8, 8), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
        R.func_attr({"num_input": 1})
        cls = HeadsLeave
        with R.dataflow():
            gv = cls.layer_0(x, wq)
            R.output(gv)
        return gv
