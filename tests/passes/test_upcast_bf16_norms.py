"""UpcastBf16Norms: bfloat16 layer norms computed in float32 (TVMScript Before/Expected)."""

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.passes.upcast_bf16_norms import UpcastBf16Norms


def test_bf16_layer_norm_is_wrapped_in_casts():
    """The statistics of a bf16 layer norm are computed in float32, the result cast back."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "bfloat16"), g: R.Tensor((8,), "bfloat16"), b: R.Tensor((8,), "bfloat16")) -> R.Tensor((2, 8), "bfloat16"):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "bfloat16"), g: R.Tensor((8,), "bfloat16"), b: R.Tensor((8,), "bfloat16")) -> R.Tensor((2, 8), "bfloat16"):
            with R.dataflow():
                x32 = R.astype(x, "float32")
                g32 = R.astype(g, "float32")
                b32 = R.astype(b, "float32")
                y32 = R.nn.layer_norm(x32, g32, b32, axes=[-1])
                y = R.astype(y32, "bfloat16")
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(Expected, UpcastBf16Norms()(Before))


def test_float32_norm_is_unchanged():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), g: R.Tensor((8,), "float32"), b: R.Tensor((8,), "float32")) -> R.Tensor((2, 8), "float32"):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(Before, UpcastBf16Norms()(Before))


def test_result_legalizes_and_runs():
    """After the rewrite TVM can legalize and run the bf16 norm (before it refuses)."""
    import numpy as np
    import ml_dtypes

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((2, 8), "bfloat16"), g: R.Tensor((8,), "bfloat16"), b: R.Tensor((8,), "bfloat16")) -> R.Tensor((2, 8), "bfloat16"):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                R.output(y)
            return y

    ex = tvm.compile(UpcastBf16Norms()(Mod), tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8)).astype(ml_dtypes.bfloat16)
    g = np.ones(8, ml_dtypes.bfloat16)
    b = np.zeros(8, ml_dtypes.bfloat16)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(g), tvm.runtime.tensor(b)).numpy().astype(np.float32)
    xf = x.astype(np.float32)
    want = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5)
    assert np.abs(got - want).max() < 0.05
