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
