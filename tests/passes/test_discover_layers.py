"""DiscoverLayers: cut-point layer discovery on a flat main (TVMScript Before/Expected)."""

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.passes import layering
from cachefit.passes.discover_layers import DiscoverLayers


def test_residual_block_stays_whole_and_light_tail_merges():
    """Cuts go where one activation is live; the residual input x stays live until the add, so the
    block a-b-c is one layer; the lone relu after the second matmul joins that matmul's layer."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                a = R.matmul(x, w0)
                b = R.nn.relu(a)
                c = R.add(b, x)
                d = R.matmul(c, w1)
                e = R.nn.relu(d)
                R.output(e)
            return e

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def layer_0(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "cut.0"})
            with R.dataflow():
                a = R.matmul(x, w0)
                b = R.nn.relu(a)
                c = R.add(b, x)
                R.output(c)
            return c

        @R.function(private=True)
        def layer_1(c: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "cut.1"})
            with R.dataflow():
                d = R.matmul(c, w1)
                e = R.nn.relu(d)
                R.output(e)
            return e

        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                lv = cls.layer_0(x, w0)
                gv = cls.layer_1(lv, w1)
                R.output(gv)
            return gv

    After = DiscoverLayers()(Before)
    tvm.ir.assert_structural_equal(Expected, After)


def test_model_input_read_late_is_passed_to_the_later_layer():
    """When the smallest live count is 2 (x is read by the last op), the cut still falls where two are
    live; the model input x goes straight from main to the layer that reads it, activations first
    and then weights in the layer's signature."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                a = R.matmul(x, w0)
                b = R.matmul(a, w1)
                c = R.add(b, x)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def layer_0(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "cut.0"})
            with R.dataflow():
                a = R.matmul(x, w0)
                R.output(a)
            return a

        @R.function(private=True)
        def layer_1(a: R.Tensor((2, 4), "float32"), x: R.Tensor((2, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "cut.1"})
            with R.dataflow():
                b = R.matmul(a, w1)
                c = R.add(b, x)
                R.output(c)
            return c

        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                lv = cls.layer_0(x, w0)
                gv = cls.layer_1(lv, x, w1)
                R.output(gv)
            return gv

    After = DiscoverLayers()(Before)
    tvm.ir.assert_structural_equal(Expected, After)


def test_layered_module_passes_through_unchanged():
    """A module that already has layer functions is returned as it is."""

    @I.ir_module
    class Layered:
        @R.function(private=True)
        def layer_0(x: R.Tensor((2, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
            with R.dataflow():
                y = R.nn.relu(x)
                R.output(y)
            return y

        @R.function
        def main(x: R.Tensor((2, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = Layered
            with R.dataflow():
                y = cls.layer_0(x)
                R.output(y)
            return y

    After = DiscoverLayers()(Layered)
    tvm.ir.assert_structural_equal(Layered, After)


def test_live_counts_of_a_chain_with_residual():
    """The analysis itself: live activations after each binding (weights never count)."""

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                a = R.matmul(x, w0)
                b = R.nn.relu(a)
                c = R.add(b, x)
                d = R.nn.relu(c)
                R.output(d)
            return d

    flat = layering.flatten(Mod)
    assert DiscoverLayers().live_counts(flat) == [2, 2, 1, 1]


def test_outline_returns_a_tuple_when_two_tensors_cross_the_cut():
    """The outlining machinery: a residual produced inside layer 0 and read in layer 1 crosses the cut
    with the layer's main result; layer 0 returns both as a tuple and main unpacks them."""

    @I.ir_module
    class Flat:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                a = R.matmul(x, w0)
                m = R.nn.relu(a)
                b = R.matmul(m, w1)
                c = R.add(b, a)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def layer_0(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32")) -> R.Tuple(R.Tensor((2, 4), "float32"), R.Tensor((2, 4), "float32")):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "first"})
            with R.dataflow():
                a = R.matmul(x, w0)
                m = R.nn.relu(a)
                gv = (a, m)
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_1(m: R.Tensor((2, 4), "float32"), a: R.Tensor((2, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "second"})
            with R.dataflow():
                b = R.matmul(m, w1)
                c = R.add(b, a)
                R.output(c)
            return c

        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                t = cls.layer_0(x, w0)
                a = t[0]
                m = t[1]
                gv = cls.layer_1(m, a, w1)
                R.output(gv)
            return gv

    After = layering.outline(layering.flatten(Flat), [(0, 1), (2, 3)], ["first", "second"])
    tvm.ir.assert_structural_equal(Expected, After)
