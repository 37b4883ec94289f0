"""MergeLayers: merge adjacent layers into N (TVMScript Before/Expected) and balanced grouping."""

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.errors import CachefitError
from cachefit.passes import run_pass
from cachefit.partition import partition
from cachefit.passes.merge_layers import MergeLayers


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


def merge_groups(sizes, k):
    """The grouping MergeLayers(k) takes for layers of ``sizes`` weight elements."""
    return partition(sizes, sum(sizes), "balanced", devices=k, tie_break="late")


@pytest.mark.parametrize("sizes,k", [([5, 1, 1, 1, 5], 2), ([1] * 7, 3), ([9, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2), ([3], 1),
                                     ([1, 1, 1, 1, 1, 5], 3), ([1] * 6, 4), ([0, 0, 0], 2)])
def test_merge_grouping_is_optimal_with_every_cut_earliest(sizes, k):
    """Against brute force over every split into k contiguous non-empty groups: the largest group
    is the smallest possible, and among the splits reaching it every cut is as early as in any of
    them (later groups hold as many layers as the optimum allows)."""
    import itertools

    groups = merge_groups(sizes, k)
    assert len(groups) == k and groups[0][0] == 0 and groups[-1][1] == len(sizes) - 1
    got = max(sum(sizes[a:b + 1]) for a, b in groups)
    splits = [(0,) + cuts + (len(sizes),) for cuts in itertools.combinations(range(1, len(sizes)), k - 1)]
    best = min(max(sum(sizes[a:b]) for a, b in zip(c, c[1:])) for c in splits)
    assert got == best
    optimal = [c for c in splits if max(sum(sizes[a:b]) for a, b in zip(c, c[1:])) == best]
    cuts = tuple(a for a, _ in groups) + (len(sizes),)
    assert all(x <= y for c in optimal for x, y in zip(cuts, c))


def test_merge_six_equal_layers_into_four_puts_the_pairs_last():
    """Six layers of 16 elements into four: the largest group must hold two layers; the late tie
    break gives 1, 1, 2, 2 (the pinned mlp-tiny grouping of tests/test_layer_discovery.py)."""
    assert merge_groups([16] * 6, 4) == [(0, 0), (1, 1), (2, 3), (4, 5)]
