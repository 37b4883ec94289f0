"""MergeLayers: merge adjacent layers into N (TVMScript Before/Expected) and balanced grouping."""

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.errors import CachefitError
from cachefit.passes import run_pass
from cachefit.passes.merge_layers import MergeLayers, balanced_groups


@I.ir_module
class ThreeLayers:
    @R.function(private=True)
    def layer_0(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            a = R.matmul(x, w0)
            R.output(a)
        return a

    @R.function(private=True)
    def layer_1(a: R.Tensor((2, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.1"})
        with R.dataflow():
            b = R.matmul(a, w1)
            R.output(b)
        return b

    @R.function(private=True)
    def layer_2(b: R.Tensor((2, 4), "float32"), w2: R.Tensor((4, 8), "float32")) -> R.Tensor((2, 8), "float32"):
        R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "layers.2"})
        with R.dataflow():
            c = R.matmul(b, w2)
            R.output(c)
        return c

    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32"), w2: R.Tensor((4, 8), "float32")) -> R.Tensor((2, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = ThreeLayers
        with R.dataflow():
            a = cls.layer_0(x, w0)
            b = cls.layer_1(a, w1)
            c = cls.layer_2(b, w2)
            R.output(c)
        return c


def test_merge_three_into_two_balances_weights():
    """Weight elements are 16, 16, 32: the best split into two is {0, 1} | {2} (32 | 32, where
    {0} | {1, 2} gives 16 | 48); the merged layer is named after its first and last layers."""

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def layer_0(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0..layers.1"})
            with R.dataflow():
                a = R.matmul(x, w0)
                b = R.matmul(a, w1)
                R.output(b)
            return b

        @R.function(private=True)
        def layer_1(b: R.Tensor((2, 4), "float32"), w2: R.Tensor((4, 8), "float32")) -> R.Tensor((2, 8), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.2"})
            with R.dataflow():
                c = R.matmul(b, w2)
                R.output(c)
            return c

        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"), w1: R.Tensor((4, 4), "float32"), w2: R.Tensor((4, 8), "float32")) -> R.Tensor((2, 8), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                b = cls.layer_0(x, w0, w1)
                c = cls.layer_1(b, w2)
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(Expected, MergeLayers(2)(ThreeLayers))


def test_same_count_is_unchanged_and_too_many_is_an_error():
    tvm.ir.assert_structural_equal(ThreeLayers, MergeLayers(3)(ThreeLayers))
    with pytest.raises(CachefitError, match="more layers than the model has"):
        run_pass(MergeLayers(4), ThreeLayers)


def test_explicit_groups():
    out = MergeLayers(groups=[(0, 0), (1, 2)])(ThreeLayers)
    names = sorted(str(f.attrs["cachefit.layer_name"]) for gv, f in out.functions.items() if "cachefit.layer" in (f.attrs or {}))
    assert names == ["layers.0", "layers.1..layers.2"]


@pytest.mark.parametrize("sizes,k", [([5, 1, 1, 1, 5], 2), ([1] * 7, 3), ([9, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2), ([3], 1)])
def test_balanced_groups_is_optimal(sizes, k):
    """Against brute force over every split into k contiguous non-empty groups."""
    import itertools

    groups = balanced_groups(sizes, k)
    assert len(groups) == k and groups[0][0] == 0 and groups[-1][1] == len(sizes) - 1
    got = max(sum(sizes[a:b + 1]) for a, b in groups)
    best = min(
        max(sum(sizes[a:b]) for a, b in zip((0,) + cuts, cuts + (len(sizes),)))
        for cuts in itertools.combinations(range(1, len(sizes)), k - 1)
    )
    assert got == best
